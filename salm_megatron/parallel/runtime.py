"""One entry point to bring up and tear down torch.distributed + Megatron's parallel state.

Launchers (torchrun, srun, our test harness) set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; :func:`initialize` reads them unless given explicitly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from ..config import ParallelConfig
from . import cpu_compat

log = logging.getLogger(__name__)


def initialize(
    parallel: ParallelConfig,
    seed: int = 1234,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    timeout_minutes: int = 30,
) -> None:
    """Start torch.distributed (nccl on GPU, gloo on CPU), Megatron parallel state and seeds.

    Safe to call when torch.distributed is already up (the existing group is used).
    """
    from megatron.core import parallel_state, tensor_parallel

    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        cpu_compat.apply()

    if not dist.is_initialized():
        rank = int(os.environ.get("RANK", 0)) if rank is None else rank
        world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
        parallel.validate_world(world_size)
        if use_cuda:
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(cuda_device(local_rank, torch.cuda.device_count()))
        rendezvous = {}
        if world_size == 1 and "MASTER_PORT" not in os.environ:
            # One process outside any launcher: an in-memory store, no port to collide with.
            rendezvous = {"store": dist.HashStore()}
        else:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(minutes=timeout_minutes),
            **rendezvous,
        )
    world_size = dist.get_world_size()
    parallel.validate_world(world_size)

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        expert_tensor_parallel_size=parallel.expert_tensor_parallel_size,
        distributed_timeout_minutes=timeout_minutes,
    )
    set_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    log.info(
        "parallel runtime up: world %d = tp %d x pp %d x cp %d x dp %d, ep %d (%s)",
        world_size,
        parallel.tensor_model_parallel_size,
        parallel.pipeline_model_parallel_size,
        parallel.context_parallel_size,
        parallel.data_parallel_size(world_size),
        parallel.expert_model_parallel_size,
        "nccl" if use_cuda else "gloo",
    )


def cuda_device(local_rank: int, visible: int) -> int:
    """The GPU of the process with ``local_rank`` among ``visible`` devices: its local rank, or
    the only one where the scheduler shows each task just its own (``srun --gpus-per-task=1``:
    one device in ``CUDA_VISIBLE_DEVICES``, local ranks 0..7)."""
    if visible == 1:
        return 0
    if not 0 <= local_rank < visible:
        raise RuntimeError(
            f"LOCAL_RANK={local_rank}, but this process sees {visible} GPUs "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}): "
            "start one process per visible GPU"
        )
    return local_rank


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch the same on every rank (model-parallel RNG is separate)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def max_over_ranks(value: int, group=None) -> int:
    """The largest ``value`` of the ranks of ``group`` (default: all), so that they agree."""
    return maxima_over_ranks([value], group)[0]


def maxima_over_ranks(values: list[int], group=None) -> list[int]:
    """Each of ``values``' largest over the ranks of ``group``, in one all-reduce."""
    device = "cuda" if torch.cuda.is_available() else "cpu"  # NCCL needs CUDA tensors
    tensor = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return tensor.tolist()


def is_initialized() -> bool:
    from megatron.core import parallel_state

    return dist.is_initialized() and parallel_state.model_parallel_is_initialized()


@contextlib.contextmanager
def single_process():
    """Megatron's parallel state (TP=PP=1) for a tool in one process, outside any launcher (the
    checkpoint converters: dist_checkpointing needs a process group). The group's store is in
    memory, so there is no port to collide with. Inside a running job: that job's state."""
    from megatron.core import parallel_state

    if is_initialized():
        yield
        return
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        initialize(ParallelConfig(), rank=0, world_size=1)
        yield
    finally:
        parallel_state.destroy_model_parallel()
        if own_group:
            dist.destroy_process_group()


def teardown() -> None:
    """Destroy Megatron's groups and the default process group; safe to call twice."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
