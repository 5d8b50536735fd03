"""Where each position of the LLM's sequence comes from, planned on the host per micro-batch.

A model first plans every sample's own sequence as a row (``[b, L]``, left-aligned: the row of
its embedding table each position copies, the token there and whether it is answer), then
:func:`arrange` lays the rows out in one of two ways:

- padded: one row per sample, each padded to ``S`` (rounded up to the multiple that SP, CP and
  FP8 need, or the step's fixed length);
- packed: one row of exactly ``sequence_length`` positions holding the samples back to back, the
  tail padded. Each sample is its own sequence (Megatron's ``thd`` format,
  :class:`~salm_megatron.llm.PackedRows`): RoPE restarts its positions at 0 and attention stays
  inside it, and its next-token targets end with it.

Targets are made per sample before arranging, so both give every answer token the same loss.
Everything is computed from host tensors and sent to the device without waiting for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..llm import PackedRows, packed_rows


@dataclass
class Layout:
    """One micro-batch's sequence, the same on every pipeline stage."""

    length: int  # S: positions per row (the whole sequence, before any CP / SP split)
    lengths: torch.Tensor  # [b] positions of each sample (host)
    source: torch.Tensor  # [r, S] row of the model's embedding table at each position
    labels: torch.Tensor  # [r, S] next token at each position
    loss_mask: torch.Tensor  # [r, S] 1 where the next token is an answer token
    host_loss_mask: torch.Tensor  # [r, S] its host copy (where the output layer runs)
    packed: PackedRows | None = None  # the samples' boundaries in a packed row


# Rows of each rank's local input that Transformer Engine's FP8 GEMMs need a multiple of.
FP8_ROWS = {"delayed": 16, "tensorwise": 16, "blockwise": 16, "mxfp8": 32}


def sequence_multiple(parallel, llm) -> int:
    """What the merged audio+text sequence is padded to a multiple of. CP cuts it into 2*CP
    chunks (two per CP rank, load-balanced); SP then splits a CP rank's positions over the TP
    ranks; with FP8 the local rows, checked before SP's all-gather (micro-batch 1 at worst), must
    be a multiple of :data:`FP8_ROWS`."""
    cp, tp = parallel.context_parallel_size, parallel.tensor_model_parallel_size
    split = cp * (tp if parallel.sequence_parallel else 1)  # ranks sharing one sequence
    rows = FP8_ROWS[llm.fp8_recipe] if llm.fp8 else 1
    return math.lcm(2 * cp if cp > 1 else 1, split * rows)


def next_token_targets(
    ids: torch.Tensor, answer: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and loss mask for next-token prediction over ``ids [b, S]`` (last position: none)."""
    labels = torch.zeros_like(ids)
    labels[:, :-1] = ids[:, 1:]
    loss_mask = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
    loss_mask[:, :-1] = answer[:, 1:].float()
    return labels, loss_mask


def padded_length(length: int, multiple: int, requested: int | None) -> int:
    """``length`` rounded up to ``multiple``, or the requested fixed length (pipeline shapes)."""
    if requested is None:
        return math.ceil(length / multiple) * multiple
    if requested < length or requested % multiple:
        raise ValueError(
            f"sequence_length={requested} must be >= the batch's {length} positions and a "
            f"multiple of {multiple}"
        )
    return requested


def arrange(
    source: torch.Tensor,
    ids: torch.Tensor,
    answer: torch.Tensor,
    lengths: torch.Tensor,
    *,
    pad_source: int,
    multiple: int,
    sequence_length: int | None,
    packed: bool,
    device: torch.device,
) -> Layout:
    """Lay out per-sample rows (``source``, ``ids``, ``answer``: host ``[b, L]``, of which each
    row's first ``lengths[i]`` count) padded or packed; ``pad_source`` is the embedding table's
    zero row."""
    b, width = source.shape
    lengths = lengths.long().cpu()
    valid = torch.arange(width)[None, :] < lengths[:, None]
    labels, loss_mask = next_token_targets(torch.where(valid, ids, 0), answer.bool() & valid)
    source = torch.where(valid, source, pad_source)
    rows = None
    if not packed:
        length = padded_length(int(lengths.max()), multiple, sequence_length)
        pad = (0, length - width)
        arranged = [
            torch.nn.functional.pad(source, pad, value=pad_source),
            torch.nn.functional.pad(labels, pad),
            torch.nn.functional.pad(loss_mask, pad),
        ]
    else:
        total = int(lengths.sum())
        if sequence_length is None:
            raise ValueError("a packed micro-batch needs its row length (sequence_length)")
        if total > sequence_length or sequence_length % multiple:
            raise ValueError(
                f"the packed row holds {total} positions of {b} samples; its length "
                f"sequence_length={sequence_length} must be at least that and a multiple of "
                f"{multiple}"
            )
        length, tail = sequence_length, sequence_length - total
        # Row-major selection of the valid positions: the samples back to back.
        arranged = [
            torch.cat([x[valid], torch.full((tail,), fill, dtype=x.dtype)])[None]
            for x, fill in ((source, pad_source), (labels, 0), (loss_mask, 0.0))
        ]
        rows = packed_rows(lengths.tolist(), length, device)
    source, labels, loss_mask = (x.to(device, non_blocking=True) for x in arranged)
    return Layout(length, lengths, source, labels, loss_mask, arranged[2], packed=rows)
