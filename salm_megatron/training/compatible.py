"""Whether a training checkpoint fits the run about to resume from it: the same model, and the
training data read the same way.

Megatron's loader would stop at the first tensor of another shape with its own traceback; this
compares every tensor's global shape with the checkpoint's metadata first and names the config
fields that differ, so the user learns what changed in one line. The data stream resumes by
counting records and batches, which replays the same samples only under the same settings, so
every rank's checkpoint records them (:func:`data_settings`) and a resume compares them first.
"""

from __future__ import annotations

import hashlib
import logging
from functools import reduce
from pathlib import Path
from typing import Any

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

from ..config import ConfigError
from ..data.batching import audio_frames
from ..data.tokenizers import Tokenizer
from ..parallel import max_over_ranks
from . import checkpoint

log = logging.getLogger("salm.checkpoint")

# The config sections that decide which tensors a model has and their shapes.
MODEL_SECTIONS = ("model", "llm", "encoder", "adapter", "bestow", "lora")

# The config fields that decide which samples the training steps read, in what order and which
# micro-batches: a resume with one of them changed replays another order (samples read twice,
# others never). data.micro_batch_size counts only without data.max_tokens and data.packing.
DATA_FIELDS = (
    "seed", "data.prompt_format", "data.micro_batch_size", "data.max_tokens", "data.packing",
    "data.pack_tokens",
    "data.bucket_window", "data.shuffle_buffer", "data.num_workers", "data.min_duration",
    "data.max_duration", "data.default_task", "data.default_context",
    "encoder.features.sample_rate",
)  # fmt: skip
# Audio lengths whose frame counts (after features, encoder and adapter) stand for the token cost.
COST_PROBE_SECONDS = (1, 10, 30)


def check_same_model(path: Path, chunks: list[torch.nn.Module], cfg) -> None:
    """Before resuming from ``path``: every tensor of this run's model must be in the checkpoint
    with the same global shape, else a ConfigError names the config fields whose values differ
    (collective: every rank raises when any rank's chunks differ)."""
    saved = dist_checkpointing.load_tensors_metadata(str(path))
    left, differing = checkpoint.left_out(path), []
    for chunk in chunks:
        sharded, _ = checkpoint.model_state(chunk, left)
        apply_factories(sharded)
        for tensor in nested_values(sharded):
            if not isinstance(tensor, ShardedTensor):
                continue
            old = saved.get(tensor.key)
            shape = list(tensor.global_shape)
            if old is None or list(old.global_shape) != shape:
                was = "absent" if old is None else list(old.global_shape)
                differing.append(f"{tensor.key}: checkpoint {was}, this run {shape}")
    if not max_over_ranks(len(differing)):
        return
    common = dist_checkpointing.load_common_state_dict(str(path)).get("common", {})
    fields = config_differences(common.get("config", {}), cfg.to_dict(), MODEL_SECTIONS)
    shown = fields or differing or ["tensors of other ranks"]
    more = f"; and {len(shown) - 6} more" if len(shown) > 6 else ""
    raise ConfigError(
        f"{path} holds another model than this run ({'; '.join(shown[:6])}{more}): resume "
        "with the checkpoint's values, or start this run in another train.output_dir"
    )


def config_differences(old: dict, new: dict, sections: tuple[str, ...]) -> list[str]:
    """``"section.field: checkpoint A, this run B"`` for each field of ``sections`` that
    differs between two ``Config.to_dict()`` (fields only one of them has are left out)."""

    def leaves(tree, prefix):
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    before = dict(leaves({s: old.get(s, {}) for s in sections}, ""))
    after = dict(leaves({s: new.get(s, {}) for s in sections}, ""))
    return [
        f"{name}: checkpoint {before[name]}, this run {value}"
        for name, value in after.items()
        if name in before and before[name] != value
    ]


def data_settings(cfg, tokenizer: Tokenizer, streams) -> dict[str, Any] | None:
    """What decides the samples, order and micro-batches of this rank's training steps: the
    :data:`DATA_FIELDS`, digests of the tokenizer's files and of the shards' names and sizes,
    and the token cost of audio. None on ranks that read no data (no ``streams``)."""
    if not streams:
        return None
    settings = {name: reduce(getattr, name.split("."), cfg) for name in DATA_FIELDS}
    if cfg.data.max_tokens is not None or cfg.data.packing:
        del settings["data.micro_batch_size"]
    if not cfg.data.packing:
        del settings["data.pack_tokens"]
    shards = [stream.shard_sizes for stream in streams]
    settings["data.train_shards"] = shards[0] if len(shards) == 1 else shards
    if len(shards) > 1:  # a mix: its weights decide which dataset each sample comes from
        settings["data.train_shards weights"] = [w for _, w in cfg.data.train_datasets]
    settings["data.tokenizer"] = tokenizer_digest(tokenizer)
    rate = cfg.encoder.features.sample_rate
    frames = audio_frames(cfg, [seconds * rate for seconds in COST_PROBE_SECONDS])
    settings[f"audio frames of {', '.join(f'{s} s' for s in COST_PROBE_SECONDS)}"] = frames
    return settings


def tokenizer_digest(tokenizer: Tokenizer) -> str:
    """``"sha1 <digest>"`` of the files the tokenizer was read from (a ``tokenizer.json`` with
    the ``tokenizer_config.json`` beside it that names its special tokens)."""
    path = Path(tokenizer.path)
    files = [path]
    if path.suffix == ".json" and (path.parent / "tokenizer_config.json").is_file():
        files.append(path.parent / "tokenizer_config.json")
    digest = hashlib.sha1(usedforsecurity=False)
    for file in files:
        digest.update(file.read_bytes())
    return f"sha1 {digest.hexdigest()[:16]}"


def check_same_data(path: Path, saved: dict | None, settings: dict | None) -> None:
    """Before resuming from ``path``: the data settings this rank's checkpoint recorded
    (``saved``) must be this run's (``settings``, :func:`data_settings`), else a ConfigError
    names each that differs with both values (collective: every rank raises when any differs).
    A checkpoint from before they were recorded resumes unchecked, with a warning."""
    differing = [
        f"{name}: checkpoint {saved[name]}, this run {value}"
        for name, value in (settings or {}).items()
        if saved is not None and name in saved and saved[name] != value
    ]
    if max_over_ranks(len(differing)):
        shown = differing or ["the data settings of other ranks"]
        raise ConfigError(
            f"{path} was trained reading the data otherwise than this run would "
            f"({'; '.join(shown)}): resuming would read samples twice or never. Resume with the "
            "checkpoint's values, or start over (checkpoint.start_over=true) or in another "
            "train.output_dir"
        )
    if saved is None and settings is not None and torch.distributed.get_rank() == 0:
        log.warning(
            "%s records no data settings (saved before checkpoints did): cannot check that this "
            "run reads the data as it did; keep the data.* settings, tokenizer and shards alike",
            path,
        )
