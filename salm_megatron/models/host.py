"""A micro-batch moved to the GPU keeps its host copy, from which the model plans without waiting.

Layouts, segment shares and index tables are computed from the host copy (:func:`on_host`) and
sent to the device without a sync (:func:`sent_like`).
"""

from __future__ import annotations

import torch

HOST = "host"  # the key under which a device batch keeps its host copy


def to_device(batch: dict, device: torch.device | str) -> dict:
    """``batch`` on ``device`` (copies queued, not waited for) with its host copy under
    :data:`HOST`, from which the model plans the micro-batch."""
    host = on_host(batch)
    moved = {k: v.to(device, non_blocking=True) for k, v in host.items()}
    moved[HOST] = host
    return moved


def on_host(batch: dict) -> dict:
    """The batch in host memory: the copy :func:`to_device` kept, else the batch itself."""
    return batch.get(HOST, batch)


def sent_like(planned: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A tensor planned on the host, on the device of ``like`` (queued without a sync)."""
    return planned.to(like.device, non_blocking=True)
