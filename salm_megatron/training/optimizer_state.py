"""How the distributed optimizer's state is laid out in a training checkpoint, and read back.

Megatron-Core 0.16's distributed optimizer offers two layouts that save and load here
(``checkpoint.optimizer_format``):

- ``dp_reshardable`` (the default): each rank writes its own shard of the optimizer's flat
  buffers. Nothing is gathered, so a save costs no extra memory, and with ``async_save`` the fork
  writes the shards while training goes on. The buffers follow the model's TP/PP/VPP split (and
  with MoE its EP and expert TP split: which experts a rank holds) and DDP buckets, so the
  optimizer state loads only at the TP/PP/VPP/EP it was saved at.
- ``fully_reshardable``: the state of each model parameter in the parameter's own shape, so it
  loads at any TP/PP/DP/EP layout (each expert's at its global index). A save all-gathers every
  parameter's state to every DP rank (memory for the whole TP/PP shard's optimizer on each of
  them) before anything is written, even with ``async_save``.

``fully_sharded_model_space``, which would be both, no longer saves in 0.16: its per-rank slices
are ShardedTensors with a ``flattened_range``, which 0.16's ShardedTensor validation refuses.

A checkpoint records its format in its content metadata (``dist_checkpointing.save(...,
content_metadata=)``); a load uses that record, so a run loads checkpoints of either format
whatever it saves. Checkpoints from before the record are ``fully_reshardable``.
"""

from __future__ import annotations

import contextlib

from megatron.core import dist_checkpointing
from megatron.core.optimizer import distrib_optimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from ..config import OPTIMIZER_FORMATS, ConfigError

BEFORE_THE_RECORD = "fully_reshardable"
# What must be the same at load for a format that does not reshard (layout() keys): the model
# split, experts included (EP and expert TP decide which experts' buffers a rank holds).
SAVED_LAYOUT_KEYS = ("tp", "pp", "vpp", "ep", "etp")
EXPERT_KEYS = ("ep", "etp")  # named in messages only where either side places experts apart


def with_expert_defaults(layout: dict) -> dict:
    """A layout record with what one from before expert parallelism lacks: EP=1 and the expert
    tensor-parallel size Megatron then used, the TP size (as for a dense model, always)."""
    return {"ep": 1, "etp": layout["tp"], **layout}


def sharding_metadata(optimizer_format: str) -> dict:
    """The ``metadata`` that makes ``optimizer.sharded_state_dict`` use ``optimizer_format``; a
    checkpoint records it as its content metadata. No chained-optimizer prefixes in reshardable
    formats: those keys do not depend on how the param groups split into optimizers."""
    if optimizer_format not in OPTIMIZER_FORMATS:
        raise ConfigError(
            f"checkpoint.optimizer_format={optimizer_format!r} is not one of "
            f"{', '.join(map(repr, OPTIMIZER_FORMATS))}"
        )
    return {"distrib_optim_sharding_type": optimizer_format, "chained_optim_avoid_prefix": True}


def saved_metadata(common_state: dict) -> dict:
    """The sharding metadata a checkpoint was saved with, from its common state
    (``dist_checkpointing.load_common_state_dict``)."""
    recorded = dist_checkpointing.load_content_metadata(preloaded_state_dict=common_state)
    return recorded or sharding_metadata(BEFORE_THE_RECORD)


def is_distributed(optimizer) -> bool:
    """Whether ``optimizer`` (chained or not) holds distributed-optimizer parts."""
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(isinstance(part, DistributedOptimizer) for part in parts)


def check_loads_here(path, metadata: dict, saved: dict | None, here: dict) -> None:
    """A ConfigError unless the optimizer state of checkpoint ``path`` (saved with ``metadata``
    at layout ``saved``, from its rank files) loads at this run's layout ``here``."""
    kind = metadata.get("distrib_optim_sharding_type")
    if kind in DistributedOptimizer.checkpoint_fully_reshardable_formats or saved is None:
        return
    saved, here = with_expert_defaults(saved), with_expert_defaults(here)
    if all(saved[key] == here[key] for key in SAVED_LAYOUT_KEYS):
        return

    experts = any(where["ep"] != 1 or where["etp"] != where["tp"] for where in (saved, here))
    shown = [key for key in SAVED_LAYOUT_KEYS if experts or key not in EXPERT_KEYS]

    def show(where: dict) -> str:
        return ", ".join(f"{key.upper()}={where[key]}" for key in shown)

    raise ConfigError(
        f"{path} holds its optimizer state as checkpoint.optimizer_format={kind}, which loads "
        f"only at the layout it was saved at ({show(saved)}), not at this run's ({show(here)}): "
        "resume at that layout with checkpoint.optimizer_format=fully_reshardable and train to "
        "its next checkpoint, which then loads at any layout; or start a new run from its "
        f"weights alone (checkpoint.pretrained_model={path})"
    )


@contextlib.contextmanager
def torch_adam_loading(optimizer):
    """Make Megatron-Core 0.16's distributed optimizer load into torch's Adam, its fallback
    without TE or apex (as on CPU), in either format. Three gaps, each closed here for the load
    only:

    - its state is empty before the first step, and an empty state cannot describe the load:
      take one zero-gradient step first, as Megatron does for FSDP (the load overwrites it);
    - the checkpoint keeps Adam's step per group, not per parameter, yet every state key is
      copied per parameter from what the format hands back (``fully_reshardable``: no step;
      ``dp_reshardable``: the step of that zero-gradient step, kept aside before the group's
      step was restored): the step is left out of that copy;
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
        step = state.pop("step", None)
        try:
            original(self, model_param, {k: v for k, v in tensors.items() if k != "step"})
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
