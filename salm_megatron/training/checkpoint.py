"""Training checkpoints that a crash never leaves half-written, resharded to the loading layout.

``<output_dir>/checkpoints/``::

    step_0000200/             a complete checkpoint
      (dist_checkpointing)    model chunks + optimizer, resharded on load; ``common.pt`` holds
                              the step, counters, LR schedule and resolved config, and the
                              optimizer state's format (content metadata)
      ranks/rank00003.pt      that rank's RNG and data-iterator state, with its coordinates
      write_order             N: the N-th checkpoint completed in this folder
    latest                    name of the newest complete checkpoint (replaced atomically)
    .step_0000300.tmp/        being written; renamed to step_0000300 once every rank finished

A reader trusts only renamed folders, so a kill at any moment leaves the previous checkpoint as
the newest. "Newest" is by write order, not step: a folder may hold higher steps than the run
now writing (a resume from ``latest`` after a crash between the rename and ``latest``; folders
from before write orders were recorded, which count as older than any recorded, by step), and
``checkpoint.keep`` prunes the longest completed, never the one just written.

The model reshards to any TP/PP/EP layout (an EP rank saves its experts at their global
indices); the optimizer state as its format allows
(``checkpoint.optimizer_format``, :mod:`.optimizer_state`): the default ``dp_reshardable`` gathers
nothing and loads at the TP/PP/VPP it was saved at, ``fully_reshardable`` gathers the optimizer
state over data-parallel ranks at each save and loads at any layout. Transformer Engine's extra
state (FP8 metadata) may be missing from a checkpoint, as in those of the local spec: the modules
keep their own.

RNG and data state are per rank: they are restored when the data-parallel size is the same (data
state is keyed by DP rank, and expert parallelism, carved from the DP ranks, leaves it as it is;
RNG needs the very same layout, EP included, else it is reseeded from the seed and step, with a
warning). Each rank also records the data settings its stream depends on
(``compatible.data_settings``), which a resume checks first.

Frozen parts that a pretrained checkpoint provides (``model.freeze_llm`` with
``checkpoint.pretrained_llm``, ``freeze_encoder`` with ``pretrained_encoder``) are left out: their
weights never change. ``common.pt`` names them (``left_out``) and every load takes them from the
pretrained checkpoint again, so a LoRA run on a frozen LLM saves only the adapters and what else
trains (with optimizer, schedule, RNG and data state).
"""

from __future__ import annotations

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
from megatron.core.dist_checkpointing.validation import StrictHandling
from megatron.core.transformer.utils import sharded_state_dict_default

from ..config import ConfigError
from ..models.lora import adapter_parameters
from . import optimizer_state

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
        "ep": parallel_state.get_expert_model_parallel_world_size(),
        "etp": parallel_state.get_expert_tensor_parallel_world_size(),
        "world": dist.get_world_size(),
    }


def _saved_layout(saved: dict) -> dict[str, int]:
    """The layout a rank file records, with EP and expert TP filled in where it predates them."""
    return optimizer_state.with_expert_defaults(saved["layout"])


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


# Transformer Engine modules' state outside tensors (FP8 scaling metadata), as Megatron names it.
EXTRA_STATE = "_extra_state"


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


def _sharded(
    chunks, optimizer, common: dict, loading: bool, left: list[str], metadata: dict
) -> tuple[dict, list]:
    state, dropped = {}, []
    for i, chunk in enumerate(chunks):
        state[f"model{i}"], keys = model_state(chunk, left)
        dropped.append(keys)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            state, is_loading=loading, metadata=metadata
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
    optimizer_format: str = "dp_reshardable",
) -> Path:
    """Write checkpoint ``step`` (collective). ``common`` must be equal on every rank.
    ``leave_out``: prefixes of frozen parts not to save (:func:`parts_left_out`);
    ``optimizer_format``: ``checkpoint.optimizer_format`` (:mod:`.optimizer_state`).

    With ``async_queue`` the tensors are written by a forked process while training goes on
    (on GPU they are first copied to host memory; on CPU the fork's copy-on-write snapshot
    holds them still); the checkpoint becomes complete when the queue finalizes the request
    (``async_queue.maybe_finalize_async_calls``). Until then it is only a temporary folder.
    What this call does before returning is to build the state to write: in ``dp_reshardable``
    that is each rank's own shards, in ``fully_reshardable`` it all-gathers the optimizer state
    over data-parallel ranks first.
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
    metadata = optimizer_state.sharding_metadata(optimizer_format)
    sharded, _ = _sharded(chunks, optimizer, common, False, list(leave_out), metadata)
    request = dist_checkpointing.save(
        sharded, str(tmp), async_sharded_save=async_queue is not None, content_metadata=metadata
    )
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


def load(path: Path, chunks: list[torch.nn.Module], optimizer) -> dict:
    """Load model and optimizer (resharded to this layout, as far as the optimizer's format
    allows); returns the common state (this rank's own saved state: :func:`own_rank_state`).
    The parts the checkpoint left out (:func:`left_out`) must be loaded from their pretrained
    checkpoints. Transformer Engine's extra state may be missing (:func:`_load_dist`)."""
    saved = dist_checkpointing.load_common_state_dict(str(path))
    if saved.get("common", {}).get("format") != FORMAT:
        raise ValueError(f"{path} is not a salm-megatron training checkpoint")
    metadata = optimizer_state.saved_metadata(saved)
    if optimizer is not None and optimizer_state.is_distributed(optimizer):
        optimizer_state.check_loads_here(path, metadata, saved_layout(path), layout())
    left = list(saved["common"].get("left_out", []))
    # No autograd: fp32 shards of the optimizer are views of parameters, written in place.
    with torch.no_grad(), optimizer_state.torch_adam_loading(optimizer):
        sharded, dropped = _sharded(chunks, optimizer, {}, True, left, metadata)
        requested = [set(sharded[f"model{i}"]) for i in range(len(chunks))]
        state = _load_dist(sharded, path)
        for i, chunk in enumerate(chunks):
            not_saved = requested[i] - set(state[f"model{i}"])  # extra state, if any
            _load_state(chunk, state[f"model{i}"], dropped[i] | not_saved, path)
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
    return state["common"]


def _load_dist(sharded: dict, path: Path) -> dict:
    """``dist_checkpointing.load`` where of the keys ``sharded`` asks for only Transformer
    Engine's extra state may be missing: checkpoints of the local spec (CPU runs, ``hf-to-mcore``,
    ``salm import``) have none, and a TE model loading one keeps its modules' initial extra state
    (FP8 scaling metadata starts over; said once, at info level). Any other key the checkpoint
    lacks is an error naming it. Keys only the checkpoint has (a TE checkpoint's extra state in a
    local-spec model) are not read."""
    state, _, not_saved = dist_checkpointing.load(
        sharded, str(path), strict=StrictHandling.RETURN_UNEXPECTED
    )
    other = sorted(key for key in not_saved if not key.endswith(EXTRA_STATE))
    if other:
        more = f" and {len(other) - 5} more" if len(other) > 5 else ""
        raise RuntimeError(f"{path} lacks {', '.join(other[:5])}{more}")
    if not_saved:
        first, more = sorted(not_saved)[0], len(not_saved) - 1
        log.info(
            "%s has no Transformer Engine extra state for %s%s: those modules keep their initial "
            "state (FP8 scaling metadata starts over)",
            path, first, f" and {more} more" if more else "",
        )  # fmt: skip
    return state


def saved_layout(path: Path) -> dict[str, int] | None:
    """The layout (:func:`layout`) checkpoint ``path`` was saved at, from its first rank file."""
    files = sorted((path / "ranks").glob("rank*.pt"))
    return _saved_layout(torch.load(files[0], weights_only=True)) if files else None


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
        if _saved_layout(saved) == here and all(saved[k] == v for k, v in where.items()):
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
    requested = {k: v for k, v in sharded.items() if k not in absent}
    loaded = _load_dist(requested, path)
    # The module's keys only: a training checkpoint (pretrained_model) also has its counters,
    # config and optimizer param groups in its common state.
    state = {k: loaded[k] for k in requested if k in loaded}
    if module is not None:
        _load_state(module, state, absent | (set(requested) - set(state)), path)
    log.info("loaded pretrained %s from %s", what, path)


def save_module(module: torch.nn.Module | None, path: str | Path) -> None:
    """A dist checkpoint of ``module`` alone, as :func:`load_pretrained` reads it.
    Collective: ranks that hold none of it pass ``None``."""
    if dist.get_rank() == 0:
        Path(path).mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(_module_sharded(module), str(path))
