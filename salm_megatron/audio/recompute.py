"""Encoder activation recompute: a layer keeps only its inputs and runs again in backward.

The first pipeline stage holds every in-flight micro-batch's encoder activations, and
FastConformer's relative-position attention alone keeps ``[b, h, t, 2t]`` scores per layer; with
``encoder.recompute_layers`` the first N layers keep their inputs only. torch's non-reentrant
checkpoint replays the RNG state, so dropout draws the same masks; the buffers a forward updates
(BatchNorm's running statistics) are put back after the replay, so a step updates them once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def run_layers(layers: nn.ModuleList, x: torch.Tensor, *args, recompute_layers: int):
    """``x`` through each ``layer(x, *args)``; the first ``recompute_layers`` recompute in
    backward, in training with gradients on (evaluation and inference keep nothing anyway)."""
    recompute = recompute_layers if layers.training and torch.is_grad_enabled() else 0
    for i, layer in enumerate(layers):
        if i < recompute:
            x = checkpoint(
                layer, x, *args, use_reentrant=False, context_fn=partial(_contexts, layer)
            )
        else:
            x = layer(x, *args)
    return x


def _contexts(layer: nn.Module):
    """Checkpoint's (forward, recompute) contexts: the recompute leaves the buffers alone."""
    return contextlib.nullcontext(), buffers_kept(layer)


@contextlib.contextmanager
def buffers_kept(module: nn.Module) -> Iterator[None]:
    """``module``'s buffers as they were on entry, also when the recompute stops early (torch
    ends it once the tensors backward needs are back)."""
    saved = [(buffer, buffer.clone()) for buffer in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
