"""Whether a training checkpoint holds the model a run describes, checked before resuming from it.

Megatron's loader would stop at the first tensor of another shape with its own traceback; this
compares every tensor's global shape with the checkpoint's metadata first and names the config
fields that differ, so the user learns what changed in one line.
"""

from __future__ import annotations

from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

from ..config import ConfigError
from ..parallel import max_over_ranks
from . import checkpoint

# The config sections that decide which tensors a model has and their shapes.
MODEL_SECTIONS = ("model", "llm", "encoder", "adapter", "bestow", "lora")


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
