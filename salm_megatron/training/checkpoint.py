"""Training checkpoints that a crash never leaves half-written and any TP/PP layout can load.

``<output_dir>/checkpoints/``::

    step_0000200/             a complete checkpoint
      (dist_checkpointing)    model chunks + optimizer, resharded on load; ``common.pt`` holds
                              the step, counters, LR schedule and resolved config
      ranks/rank00003.pt      that rank's RNG and data-iterator state, with its coordinates
      write_order             N: the N-th checkpoint completed in this folder
    latest                    name of the newest complete checkpoint (replaced atomically)
    .step_0000300.tmp/        being written; renamed to step_0000300 once every rank finished

A reader trusts only renamed folders, so a kill at any moment leaves the previous checkpoint as
the newest. "Newest" is by write order, not step: a folder may hold higher steps than the run
now writing (a resume from ``latest`` after a crash between the rename and ``latest``; folders
from before write orders were recorded, which count as older than any recorded, by step), and
``checkpoint.keep`` prunes the longest completed, never the one just written.

RNG and data state are per rank: they are restored when the data-parallel size is the same (data
state is keyed by DP rank; RNG needs the very same layout, else it is reseeded from the seed and
step, with a warning). Each rank also records the data settings its stream depends on
(``compatible.data_settings``), which a resume checks first.

Frozen parts that a pretrained checkpoint provides (``model.freeze_llm`` with
``checkpoint.pretrained_llm``, ``freeze_encoder`` with ``pretrained_encoder``) are left out: their
weights never change. ``common.pt`` names them (``left_out``) and every load takes them from the
pretrained checkpoint again, so a LoRA run on a frozen LLM saves only the adapters and what else
trains (with optimizer, schedule, RNG and data state).
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
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.optimizer import distrib_optimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.transformer.utils import sharded_state_dict_default

from ..config import ConfigError
from ..models.lora import adapter_parameters

log = logging.getLogger("salm.checkpoint")

_NAME = re.compile(r"^step_(\d{7,})$")
LATEST = "latest"
WRITE_ORDER = "write_order"
FORMAT = "salm-megatron/1"
# What a run writes to its train.output_dir, set aside together by checkpoint.start_over.
RUN_OUTPUTS = ("checkpoints", "config.yaml", "metrics.jsonl", "tensorboard", "sample_keys")
EARLIER_RUN = "old-run-{}"


def step_name(step: int) -> str:
    return f"step_{step:07d}"


def write_order(path: Path) -> int:
    """The place of checkpoint ``path`` in the order its folder's checkpoints were completed
    (0: completed before the order was recorded)."""
    marker = path / WRITE_ORDER
    if not marker.is_file():
        return 0
    text = marker.read_text().strip()
    if not text.isdigit():
        raise ValueError(f"{marker} holds {text!r}, not a write order (a whole number)")
    return int(text)


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first by write order, then step (temporary
    folders never match)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=lambda p: (write_order(p), int(_NAME.match(p.name).group(1))))


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


class Part(NamedTuple):
    """A part of the model whose weights a pretrained checkpoint can provide."""

    prefix: str  # of its keys in a model chunk's state dict
    what: str
    freeze: str  # ModelConfig switch
    source: str  # CheckpointConfig field


PARTS = (
    Part("llm.", "LLM", "freeze_llm", "pretrained_llm"),
    Part("audio.encoder.", "encoder", "freeze_encoder", "pretrained_encoder"),
)


def _part_modules(part: Part, chunks) -> list:
    """The module of ``part`` per chunk; None on ranks without it (loads are collective)."""
    if part.prefix == "llm.":
        return [chunk.llm for chunk in chunks]
    first = chunks[0]
    return [first.audio.encoder if first.pre_process else None]


def parts_left_out(cfg) -> list[str]:
    """Prefixes of the frozen parts that checkpoints of run ``cfg`` leave out."""
    return [
        part.prefix
        for part in PARTS
        if getattr(cfg.model, part.freeze) and getattr(cfg.checkpoint, part.source)
    ]


def left_out(path: Path) -> list[str]:
    """Prefixes of the parts checkpoint ``path`` left out (to be loaded from pretrained ones)."""
    common = dist_checkpointing.load_common_state_dict(str(path))
    return list(common.get("common", {}).get("left_out", []))


def load_pretrained_parts(cfg, chunks, prefixes=None, needed_by: Path | None = None) -> None:
    """The pretrained LLM and encoder named in ``cfg.checkpoint`` into ``chunks`` (collective):
    every one named, or only the parts ``prefixes`` that checkpoint ``needed_by`` left out,
    which must then be named. A whole pretrained model (``checkpoint.pretrained_model``)
    loads first, so named parts replace its."""
    whole = cfg.checkpoint.pretrained_model
    if prefixes is None and whole is not None:
        check_dist_checkpoint(whole, "checkpoint.pretrained_model")
        if left_out(Path(whole)):
            raise ConfigError(
                f"checkpoint.pretrained_model={whole} left out its frozen parts "
                f"{left_out(Path(whole))}: start from a checkpoint that holds the whole model "
                "(`salm export` then `salm import` makes one)"
            )
        for chunk in chunks:
            load_pretrained(chunk, whole, "model")
    for part in PARTS:
        if prefixes is not None and part.prefix not in prefixes:
            continue
        path = getattr(cfg.checkpoint, part.source)
        if path is None:
            if prefixes is None:
                continue
            raise ConfigError(
                f"{needed_by} holds no {part.what} weights: they were frozen "
                f"(model.{part.freeze}) and came from checkpoint.{part.source}; set "
                f"checkpoint.{part.source} to that checkpoint"
            )
        check_dist_checkpoint(path, f"checkpoint.{part.source}")
        for module in _part_modules(part, chunks):
            load_pretrained(module, path, part.what)


def model_state(chunk, prefixes) -> tuple[dict, set[str]]:
    """The chunk's sharded state without the frozen parameters under ``prefixes``; and the
    state-dict keys left out."""
    sharded = chunk.sharded_state_dict()
    if not prefixes:
        return sharded, set()
    named = dict(chunk.named_parameters())
    adapters = {id(p) for p in adapter_parameters(chunk)}
    for name, p in named.items():  # the checkpoint has no weights (or moments) for it
        if name.startswith(tuple(prefixes)) and p.requires_grad and id(p) not in adapters:
            raise ConfigError(
                f"{name} trains, but the checkpoint leaves its part out (it was frozen and "
                "came from checkpoint.pretrained_*): keep it frozen, or start a new run"
            )
    frozen = {id(p) for name, p in named.items() if not p.requires_grad}
    dropped = {
        key
        for key, value in sharded.items()
        if key.startswith(tuple(prefixes)) and id(getattr(value, "data", None)) in frozen
    }
    return {k: v for k, v in sharded.items() if k not in dropped}, dropped


def _sharded(chunks, optimizer, common: dict, loading: bool, left: list[str]) -> tuple[dict, list]:
    state, dropped = {}, []
    for i, chunk in enumerate(chunks):
        state[f"model{i}"], keys = model_state(chunk, left)
        dropped.append(keys)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            state, is_loading=loading, metadata=OPTIMIZER_FORMAT
        )
    state["common"] = common
    return state, dropped


def save(
    root: Path,
    step: int,
    chunks: list[torch.nn.Module],
    optimizer,
    common: dict,
    rank_state: dict,
    keep: int | None,
    async_queue: AsyncCallsQueue | None = None,
    leave_out: list[str] = (),
) -> Path:
    """Write checkpoint ``step`` (collective). ``common`` must be equal on every rank.
    ``leave_out``: prefixes of frozen parts not to save (:func:`parts_left_out`).

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
    common = {"format": FORMAT, "left_out": list(leave_out), **common}
    sharded, _ = _sharded(chunks, optimizer, common, loading=False, left=list(leave_out))
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
    """Every rank has written its part: number the folder in write order, rename it complete,
    point ``latest`` at it, prune beyond ``keep`` (collective)."""
    fault_point("checkpoint", step)
    final, tmp = root / step_name(step), root / f".{step_name(step)}.tmp"
    if dist.get_rank() == 0:
        order = 1 + max(map(write_order, complete_checkpoints(root)), default=0)
        _write_atomically(tmp / WRITE_ORDER, f"{order}\n".encode())
        if final.exists():  # the same step saved before a crash and resume: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomically(root / LATEST, final.name.encode())
        if keep is not None:
            prune(root, keep, final)
        log.info("checkpoint %s complete", final)
    dist.barrier()


def prune(root: Path, keep: int, written: Path) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints by write order: ``written``, the one just
    completed, is always kept, whatever its step. Returns the deleted folders."""
    older = [p for p in complete_checkpoints(root) if p != written]
    deleted = older[: max(len(older) - (keep - 1), 0)]
    for old in deleted:
        shutil.rmtree(old, ignore_errors=True)
    return deleted


def set_aside_earlier_run(output_dir: Path) -> Path | None:
    """``checkpoint.start_over``: move what an earlier run wrote to ``output_dir``
    (:data:`RUN_OUTPUTS`) into ``output_dir/old-run-N`` (the first N free), deleting nothing, so
    that a new run starts there clean. Returns that folder on rank 0 (None elsewhere, or when
    there is nothing to move). Collective: rank 0 moves, every rank waits for it."""
    found = [output_dir / name for name in RUN_OUTPUTS if (output_dir / name).exists()]
    moved_to = None
    if found and dist.get_rank() == 0:
        n = 1
        while (output_dir / EARLIER_RUN.format(n)).exists():
            n += 1
        moved_to = output_dir / EARLIER_RUN.format(n)
        moved_to.mkdir()
        for path in found:
            os.replace(path, moved_to / path.name)
        log.warning(
            "checkpoint.start_over: moved the earlier run's %s to %s",
            ", ".join(p.name for p in found), moved_to,
        )  # fmt: skip
    dist.barrier()
    return moved_to


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


def load(path: Path, chunks: list[torch.nn.Module], optimizer) -> dict:
    """Load model and optimizer (resharded to this layout); returns the common state (this
    rank's own saved state: :func:`own_rank_state`). The parts the checkpoint left out
    (:func:`left_out`) must be loaded from their pretrained checkpoints."""
    common = {"format": FORMAT}
    with _torch_adam_loading(optimizer):
        sharded, dropped = _sharded(chunks, optimizer, common, loading=True, left=left_out(path))
        state = dist_checkpointing.load(sharded, str(path))
        if state["common"].get("format") != FORMAT:
            raise ValueError(f"{path} is not a salm-megatron training checkpoint")
        for i, chunk in enumerate(chunks):
            _load_state(chunk, state[f"model{i}"], dropped[i], path)
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
    return state["common"]


def load_weights(cfg, path: Path, chunks: list[torch.nn.Module]) -> None:
    """The model weights of training checkpoint ``path``, with the frozen parts it left out
    from the pretrained checkpoints ``cfg`` names (evaluation, conversion; collective)."""
    load_pretrained_parts(cfg, chunks, left_out(path), needed_by=path)
    load(path, chunks, None)


def _load_state(module: torch.nn.Module, state: dict, absent: set[str], path) -> None:
    """``module.load_state_dict`` where exactly the keys ``absent`` may be missing."""
    result = module.load_state_dict(state, strict=not absent)
    missing = set(result.missing_keys) - absent
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"{path}: missing {sorted(missing)[:5]}, unexpected {result.unexpected_keys[:5]}"
        )


def own_rank_state(path: Path) -> dict | None:
    """This rank's saved RNG and data state when the layout is the same; else a DP rank's
    state with RNG dropped when only TP/PP changed; else (another DP size) None."""
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
    # Replicated everywhere. The TP group must be named: without it Megatron-Core 0.16 gives every
    # TP rank the main replica's id, and a load at TP>1 fails its sharding validation.
    group = parallel_state.get_tensor_model_parallel_group()
    return sharded_state_dict_default(module, prefix="", tp_group=group)


def check_dist_checkpoint(path: str | Path, field: str) -> None:
    """A ConfigError naming ``field`` unless ``path`` is a Megatron dist checkpoint."""
    if not (Path(path) / "metadata.json").is_file():
        where = "no metadata.json" if Path(path).is_dir() else "no such folder"
        raise ConfigError(f"{field}={path} is not a Megatron dist checkpoint ({where})")


def load_pretrained(module: torch.nn.Module | None, path: str | Path, what: str) -> None:
    """Weights of ``module`` from a dist checkpoint holding its keys (any TP/PP layout); LoRA
    adapters keep theirs (a pretrained model has none). Collective: ranks that hold none of it
    pass ``None``."""
    path = Path(path)
    if not (path / "metadata.json").is_file():
        raise FileNotFoundError(f"pretrained {what} {path} is not a Megatron dist checkpoint")
    sharded = _module_sharded(module)
    adapters = {id(p) for p in adapter_parameters(module)} if module is not None else set()
    absent = {k for k, v in sharded.items() if id(getattr(v, "data", None)) in adapters}
    state = dist_checkpointing.load(
        {k: v for k, v in sharded.items() if k not in absent}, str(path)
    )
    state.pop("common", None)  # a training checkpoint's counters and config (pretrained_model)
    if module is not None:
        _load_state(module, state, absent, path)
    log.info("loaded pretrained %s from %s", what, path)


def save_module(module: torch.nn.Module | None, path: str | Path) -> None:
    """A dist checkpoint of ``module`` alone, as :func:`load_pretrained` reads it.
    Collective: ranks that hold none of it pass ``None``."""
    if dist.get_rank() == 0:
        Path(path).mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(_module_sharded(module), str(path))
