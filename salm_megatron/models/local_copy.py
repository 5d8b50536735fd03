"""A local-spec copy of a training model, for decoding while training with Transformer Engine."""

from __future__ import annotations

import dataclasses

import torch
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import apply_factories

from ..config import Config
from ..llm import uses_transformer_engine
from . import build_speech_llm


def decoding_model(cfg: Config, chunk: torch.nn.Module) -> torch.nn.Module:
    """The model that decodes for validation during training: the training model ``chunk``
    itself with the local spec; with Transformer Engine a local-spec copy of it (TE does not
    mask the left padding of batched prompts in Megatron's decode mode, and its FP8 GEMMs need
    batches of 8), built in the same layout and dtype with the same weights. The copy costs
    one more set of the first stage's weights while it lives."""
    if not uses_transformer_engine(cfg.llm):
        return chunk
    local = dataclasses.replace(cfg.llm, transformer_impl="local", fp8=None, recompute="none")
    dtype = next(chunk.parameters()).dtype
    (model,) = build_speech_llm(dataclasses.replace(cfg, llm=local), params_dtype=dtype)
    model.to(next(chunk.parameters()).device)
    copy_weights(chunk, model)
    return model.eval()


@torch.no_grad()
def copy_weights(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """``source``'s weights into ``target``, matched by checkpoint key and offset: the layer
    specs name modules differently (TE fuses the norms into the next linear) but checkpoint
    them alike. Transformer Engine's ``_extra_state`` (FP8 metadata) is not a weight."""
    theirs = {(t.key, t.global_offset): t.data for t in _sharded_tensors(source)}
    for tensor in _sharded_tensors(target):
        found = theirs.get((tensor.key, tensor.global_offset))
        if found is None:
            raise KeyError(f"{tensor.key} at {tensor.global_offset} has no weights to copy")
        tensor.data.copy_(found)


def _sharded_tensors(model: torch.nn.Module) -> list[ShardedTensor]:
    """The model's checkpoint tensors, factories (a gated MLP's halves) built: views of its
    parameters."""
    sharded = model.sharded_state_dict()
    apply_factories(sharded)
    return [t for t in nested_values(sharded) if isinstance(t, ShardedTensor)]
