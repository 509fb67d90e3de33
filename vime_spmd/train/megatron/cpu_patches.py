"""The CPU shims megatron-core needs, in one place, each applied once.

Why: megatron-core assumes CUDA in a few places that have nothing to do with the maths: `device="cuda"` literals
for small bookkeeping tensors (optimizer scale, grad-norm accumulators, token counts), `torch.cuda.current_device()`
as a default device, and CUDA streams around gradient communication. On CPU (development, CI) we give exactly
those modules a view of `torch` in which CUDA device requests mean the CPU and streams are no-ops. Nothing else in
torch or Megatron changes, and nothing is patched on CUDA/NPU.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import types

import torch

logger = logging.getLogger(__name__)

# The megatron-core modules (0.16-0.19) with a hard-coded CUDA device, and what each uses it for.
CUDA_BOUND_MODULES = {
    "megatron.core.optimizer.optimizer": "loss-scale and found-inf tensors on 'cuda'",
    "megatron.core.optimizer.clip_grads": "grad-norm accumulators on 'cuda'",
    "megatron.core.distributed.param_and_grad_buffer": "buffers on current_device(); CUDA streams",
    "megatron.core.distributed.finalize_model_grads": "token-count tensors on current_device()",
    "megatron.core.models.common.embeddings.rotary_pos_embedding": "inv_freq moved to current_device()",
    "megatron.core.utils": "global memory buffer and local l2-norm on 'cuda'",
    "megatron.core.pipeline_parallel.schedules": "token-count accumulator on 'cuda'",
    "megatron.core.pipeline_parallel.p2p_communication": "receive buffers on current_device(); cuda.synchronize()",
    "megatron.core.optimizer.distrib_optimizer": "placeholder state shards on current_device() when loading",
    "megatron.core.tensor_parallel.mappings": "sequence-parallel gather/scatter outputs on current_device()",
    "megatron.core.tensor_parallel.layers": "sequence-parallel all-gather buffers on current_device()",
    "megatron.core.dist_checkpointing.strategies.filesystem_async": "cuda.synchronize() after staging tensors to host",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": "the write-failure flag on current_device()",
}

_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "randn", "rand")


def _cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int) or str(device).startswith("cuda"):
        return torch.device("cpu")
    return device


class _NullStream:
    def wait_stream(self, _stream) -> None:
        pass

    def synchronize(self) -> None:
        pass


class _CpuCuda:
    """`torch.cuda` as those modules see it on CPU: the current device is the CPU, streams do nothing."""

    def current_device(self) -> torch.device:
        return torch.device("cpu")

    def stream(self, _stream=None):
        return contextlib.nullcontext()

    def default_stream(self, _device=None) -> _NullStream:
        return _NullStream()

    current_stream = default_stream

    def Stream(self, *args, **kwargs) -> _NullStream:  # noqa: N802 (mirrors torch.cuda.Stream)
        return _NullStream()

    def empty_cache(self) -> None:
        pass

    def synchronize(self, _device=None) -> None:
        pass

    def __getattr__(self, name: str):
        return getattr(torch.cuda, name)


class _CpuTorch(types.ModuleType):
    """A stand-in for the `torch` module inside CUDA-bound Megatron modules."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _CpuCuda()
        for name in _FACTORIES:
            setattr(self, name, self._on_cpu(getattr(torch, name)))

    @staticmethod
    def _on_cpu(factory):
        def wrapped(*args, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = _cpu_device(kwargs["device"])
            return factory(*args, **kwargs)

        return wrapped

    def __getattr__(self, name: str):
        return getattr(torch, name)


def _clip_grad_by_total_norm(parameters, max_norm: float, total_norm: float, use_decoupled_grad: bool = False):
    """Megatron's `clip_grad_by_total_norm_fp32` asserts `grad.type() == 'torch.cuda.FloatTensor'`; this is the
    same scaling (grads *= max_norm / (total_norm + 1e-6) when that is < 1) without the device assertion."""
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr) for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


def _keep_tied_copy_on_cpu(setup):
    """With pipeline stages and tied embeddings, `LanguageModule.setup_embeddings_and_output_layer` moves the last
    stage's copy of the word embeddings with `weight.data.cuda()` before all-reducing it over the embedding group;
    on CPU that call raises. During that method only, `.cuda()` of a CPU tensor returns the tensor."""

    def setup_on_cpu(self, *args, **kwargs):
        cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda t, *a, **kw: t if t.device.type == "cpu" else cuda(t, *a, **kw)
        try:
            return setup(self, *args, **kwargs)
        finally:
            torch.Tensor.cuda = cuda

    return setup_on_cpu


def _cuda_type_names(build):
    """The distributed optimizer sorts parameters by `param.type()` and refuses any but 'torch.cuda.*Tensor'. During
    the wrapped call only, `Tensor.type()` (no arguments) names a CPU tensor as its CUDA counterpart."""

    def build_on_cpu(*args, **kwargs):
        type_of = torch.Tensor.type

        def cuda_name(t, *a, **kw):
            name = type_of(t, *a, **kw)
            return name.replace("torch.", "torch.cuda.", 1) if not a and not kw and t.device.type == "cpu" else name

        torch.Tensor.type = cuda_name
        try:
            return build(*args, **kwargs)
        finally:
            torch.Tensor.type = type_of

    return build_on_cpu


def _no_cuda_rng_state(device="cuda", clone=False, graph_safe=False):
    """Activation recompute saves and restores the CPU generator, the CUDA generator and the tracker's states
    around each recomputed block; without CUDA there is no CUDA generator, so its state is None."""
    return None


def _set_no_cuda_rng_state(new_state, device=-1, graph_safe=False) -> None:
    assert new_state is None, "a CUDA RNG state on CPU"


_applied = False


def apply_cpu_patches() -> None:
    """Route the CUDA-bound modules' `torch` to the CPU view, and replace the one CUDA-asserting helper.
    Idempotent; call only when training on CPU."""
    global _applied
    if _applied:
        return
    cpu_torch = _CpuTorch()
    for module_name, why in CUDA_BOUND_MODULES.items():
        module = importlib.import_module(module_name)
        if getattr(module, "torch", None) is torch:
            module.torch = cpu_torch
            logger.debug("cpu patch: %s (%s)", module_name, why)
    optimizer = importlib.import_module("megatron.core.optimizer.optimizer")
    optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm
    language_module = importlib.import_module("megatron.core.models.common.language_module.language_module")
    cls = language_module.LanguageModule
    cls.setup_embeddings_and_output_layer = _keep_tied_copy_on_cpu(cls.setup_embeddings_and_output_layer)
    distrib = importlib.import_module("megatron.core.optimizer.distrib_optimizer").DistributedOptimizer
    distrib._build_model_and_main_param_groups = classmethod(
        _cuda_type_names(distrib._build_model_and_main_param_groups.__func__))
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    random._get_cuda_rng_state, random._set_cuda_rng_state = _no_cuda_rng_state, _set_no_cuda_rng_state
    _applied = True
