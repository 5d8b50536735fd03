"""Training checkpoints that a crash never leaves half-written and any TP/PP layout can load.

``<output_dir>/checkpoints/``::

    step_0000200/             a complete checkpoint
      (dist_checkpointing)    model chunks + optimizer, resharded on load; ``common.pt`` holds
                              the step, counters, LR schedule and resolved config
      ranks/rank00003.pt      that rank's RNG and data-iterator state, with its coordinates
    latest                    name of the newest complete checkpoint (replaced atomically)
    .step_0000300.tmp/        being written; renamed to step_0000300 once every rank finished

A reader trusts only renamed folders, so a kill at any moment leaves the previous checkpoint as
the newest. RNG and data state are per rank: they are restored when the data-parallel size is
the same (data state is keyed by DP rank; RNG needs the very same layout, else it is reseeded
from the seed and step, with a warning).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.optimizer import distrib_optimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.transformer.utils import sharded_state_dict_default

log = logging.getLogger("salm.checkpoint")

_NAME = re.compile(r"^step_(\d{7,})$")
LATEST = "latest"
FORMAT = "salm-megatron/1"


def step_name(step: int) -> str:
    return f"step_{step:07d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (temporary folders never match)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint ``latest`` names, else the newest complete one, else None."""
    marker = root / LATEST
    if marker.is_file():
        named = root / marker.read_text().strip()
        if _NAME.match(named.name) and named.is_dir():
            return named
        log.warning("%s names %s, which is missing; using the newest folder", marker, named)
    found = complete_checkpoints(root)
    return found[-1] if found else None


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fault_point(where: str, step: int) -> None:
    """Fault injection for the crash tests: ``SALM_FAULT=<where>:<step>`` makes rank 0 kill
    itself with SIGKILL at that point (``step``: after the step; ``checkpoint``: after the
    checkpoint's files are written, before it is renamed complete)."""
    if os.environ.get("SALM_FAULT") == f"{where}:{step}" and dist.get_rank() == 0:
        log.warning("SALM_FAULT: killing rank 0 at %s of step %d", where, step)
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------- rank state


def layout() -> dict[str, int]:
    return {
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "vpp": parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1,
        "dp": parallel_state.get_data_parallel_world_size(),
        "world": dist.get_world_size(),
    }


def coordinates() -> dict[str, int]:
    return {
        "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
        "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
        "dp_rank": parallel_state.get_data_parallel_rank(),
    }


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _numpy_state() -> tuple:
    """NumPy's state as plain values (``torch.load(weights_only=True)`` reads them back)."""
    kind, keys, *rest = np.random.get_state()
    return (kind, keys.tolist(), *rest)


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ------------------------------------------------------------------------------------ save/load


# Optimizer state laid out per model parameter (not per DP buffer), so it reshards to any
# TP/PP/DP layout; no chained-optimizer prefixes, so it does not depend on how groups split.
OPTIMIZER_FORMAT = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "chained_optim_avoid_prefix": True,
}


def _sharded(chunks, optimizer, common: dict, loading: bool) -> dict:
    state = {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            state, is_loading=loading, metadata=OPTIMIZER_FORMAT
        )
    state["common"] = common
    return state


def save(
    root: Path,
    step: int,
    chunks: list[torch.nn.Module],
    optimizer,
    common: dict,
    rank_state: dict,
    keep: int | None,
    async_queue: AsyncCallsQueue | None = None,
) -> Path:
    """Write checkpoint ``step`` (collective). ``common`` must be equal on every rank.

    With ``async_queue`` the tensors are written by a forked process while training goes on
    (on GPU they are first copied to host memory; on CPU the fork's copy-on-write snapshot
    holds them still); the checkpoint becomes complete when the queue finalizes the request
    (``async_queue.maybe_finalize_async_calls``). Until then it is only a temporary folder.
    """
    tmp = root / f".{step_name(step)}.tmp"
    rank = dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a killed run
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    dist.barrier()
    sharded = _sharded(chunks, optimizer, {"format": FORMAT, **common}, loading=False)
    request = dist_checkpointing.save(sharded, str(tmp), async_sharded_save=async_queue is not None)
    own = {"layout": layout(), **coordinates(), **rank_state, "rng": rng_state()}
    (tmp / "ranks").mkdir(exist_ok=True)
    torch.save(own, tmp / "ranks" / f"rank{rank:05d}.pt")
    complete = functools.partial(_complete, root, step, keep)
    if async_queue is None:
        dist.barrier()
        complete()
    else:
        request.add_finalize_fn(complete)
        async_queue.schedule_async_request(request)
    return root / step_name(step)


def _complete(root: Path, step: int, keep: int | None) -> None:
    """Every rank has written its part: rename the folder complete, point ``latest`` at it,
    drop the oldest beyond ``keep`` (collective)."""
    fault_point("checkpoint", step)
    final, tmp = root / step_name(step), root / f".{step_name(step)}.tmp"
    if dist.get_rank() == 0:
        if final.exists():  # the same step saved before a crash and resume: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomically(root / LATEST, final.name.encode())
        if keep is not None:
            for old in complete_checkpoints(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint %s complete", final)
    dist.barrier()


@contextlib.contextmanager
def _torch_adam_loading(optimizer):
    """Make Megatron-Core 0.16's distributed optimizer load into torch's Adam, its fallback
    without TE or apex (as on CPU). Three gaps, each closed here for the load only:

    - its state is empty before the first step, and an empty state cannot describe the load:
      take one zero-gradient step first, as Megatron does for FSDP (the load overwrites it);
    - the checkpoint keeps Adam's step per group, not per parameter, yet every state key is
      copied from it per parameter: the step is left out of that copy;
    - the step restored from the group is one tensor shared by every parameter, which Adam
      would increment once per parameter: each parameter gets its own copy.
    """
    parts = [
        part
        for part in getattr(optimizer, "chained_optimizers", [optimizer])
        if isinstance(part, DistributedOptimizer) and part.optimizer is not None
    ]
    if distrib_optimizer.HAVE_APEX_OR_TE or not parts:
        yield
        return
    for part in parts:
        if not part.optimizer.state:
            part._init_optimizer_states_with_dummy_values()
    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def set_without_step(self, model_param, tensors):
        group, order = self.model_param_group_index_map[model_param]
        state = self.optimizer.state[self.optimizer.param_groups[group]["params"][order]]
        step = state.pop("step", None) if "step" not in tensors else None
        try:
            original(self, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    DistributedOptimizer._set_main_param_and_optimizer_states = set_without_step
    try:
        yield
    finally:
        DistributedOptimizer._set_main_param_and_optimizer_states = original
        for part in parts:
            for state in part.optimizer.state.values():
                if "step" in state:
                    state["step"] = state["step"].clone()


def load(path: Path, chunks: list[torch.nn.Module], optimizer) -> tuple[dict, dict | None]:
    """Load model and optimizer (resharded to this layout); returns the common state and this
    rank's own saved state when the data-parallel layout allows (else None)."""
    common = {"format": FORMAT}
    with _torch_adam_loading(optimizer):
        sharded = _sharded(chunks, optimizer, common, loading=True)
        state = dist_checkpointing.load(sharded, str(path))
        if state["common"].get("format") != FORMAT:
            raise ValueError(f"{path} is not a salm-megatron training checkpoint")
        for i, chunk in enumerate(chunks):
            chunk.load_state_dict(state[f"model{i}"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
    return state["common"], _own_rank_state(path)


def _own_rank_state(path: Path) -> dict | None:
    """This rank's saved state when the layout is the same; else a DP rank's state with RNG
    dropped when only TP/PP changed; else None."""
    here, where = layout(), coordinates()
    rank_file = path / "ranks" / f"rank{dist.get_rank():05d}.pt"
    if rank_file.is_file():
        saved = torch.load(rank_file, weights_only=True)
        if saved["layout"] == here and all(saved[k] == v for k, v in where.items()):
            return saved
    for rank_file in sorted((path / "ranks").glob("rank*.pt")):
        saved = torch.load(rank_file, weights_only=True)
        if saved["layout"]["dp"] != here["dp"]:
            return None
        if saved["dp_rank"] == where["dp_rank"] and saved.get("data") is not None:
            saved.pop("rng")
            return saved
    return None


def _module_sharded(module: torch.nn.Module | None) -> dict:
    if module is None:
        return {}
    if hasattr(module, "sharded_state_dict"):  # Megatron modules know their TP/PP split
        return module.sharded_state_dict()
    return sharded_state_dict_default(module, prefix="")  # replicated everywhere


def load_pretrained(module: torch.nn.Module | None, path: str | Path, what: str) -> None:
    """Weights of ``module`` from a dist checkpoint holding its keys (any TP/PP layout).
    Collective: ranks that hold none of it pass ``None``."""
    path = Path(path)
    if not (path / "metadata.json").is_file():
        raise FileNotFoundError(f"pretrained {what} {path} is not a Megatron dist checkpoint")
    state = dist_checkpointing.load(_module_sharded(module), str(path))
    if module is not None:
        module.load_state_dict(state)
    log.info("loaded pretrained %s from %s", what, path)


def save_module(module: torch.nn.Module | None, path: str | Path) -> None:
    """A dist checkpoint of ``module`` alone, as :func:`load_pretrained` reads it.
    Collective: ranks that hold none of it pass ``None``."""
    if dist.get_rank() == 0:
        Path(path).mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(_module_sharded(module), str(path))
