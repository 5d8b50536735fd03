"""The audio path split over tensor-parallel ranks: each rank encodes its share of the segments.

The encoder and adapter are replicated on the TP ranks of the first pipeline stage, and every
rank needs all the audio embeddings (they join the LLM's input before the sequence-parallel
scatter). Instead of each rank encoding every segment, rank ``r`` of ``t`` encodes segments
``r, r + t, ...`` and the embeddings are all-gathered. The gradient reaching the gathered
embeddings is the same on every TP rank (Megatron's TP regions reduce it), so each rank keeps its
own rows; its encoder gradient then covers its own segments only, and
:func:`reduce_replicated_grads` sums those over the TP group once the data-parallel reduction
has finished (the two commute; reading ``main_grad`` during DDP's overlapped reduction would not).
BatchNorm statistics see only a rank's share (as they do per DP rank); the trainer averages the
running statistics over the TP and DP ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state

SPLIT_PREFIXES = ("audio.", "ctc.")  # parameters trained from a rank's own segments only
# Parameters outside the LLM, replicated on the TP ranks of the first stage.
REPLICATED_PREFIXES = (*SPLIT_PREFIXES, "cross_attention.")


def tp_share(count: int) -> torch.Tensor:
    """Indices of the segments this TP rank encodes."""
    rank = parallel_state.get_tensor_model_parallel_rank()
    size = parallel_state.get_tensor_model_parallel_world_size()
    return torch.arange(rank, count, size)


class _GatherSegments(torch.autograd.Function):
    """``[n_r, t, h]`` on each TP rank -> ``[n, t, h]`` of every rank's rows in segment order;
    backward keeps this rank's rows (the incoming gradient is equal on all TP ranks). Every
    rank's ``t`` is the same (each encodes segments of the batch's padded width), and its row
    count follows from ``count``: the shapes are known without asking the other ranks."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, count: int) -> torch.Tensor:
        group = parallel_state.get_tensor_model_parallel_group()
        size = parallel_state.get_tensor_model_parallel_world_size()
        rows = -(-count // size)  # rank 0 holds the most
        padded = F.pad(local, (0, 0, 0, 0, 0, rows - local.shape[0]))
        parts = [torch.empty_like(padded) for _ in range(size)]
        torch.distributed.all_gather(parts, padded.contiguous(), group=group)
        # Rank r's row j is segment r + j * size.
        gathered = torch.stack(parts, dim=1).flatten(0, 1)[:count]
        ctx.rank, ctx.size, ctx.rows = (
            parallel_state.get_tensor_model_parallel_rank(), size, local.shape[0],
        )  # fmt: skip
        return gathered

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad[ctx.rank :: ctx.size][: ctx.rows].contiguous(), None


def gather_segments(local: torch.Tensor, count: int) -> torch.Tensor:
    return _GatherSegments.apply(local, count)


@torch.no_grad()
def reduce_replicated_grads(model_chunks, split: bool) -> None:
    """Make the gradients of the first stage's parts outside the LLM (:data:`REPLICATED_PREFIXES`,
    replicated on the TP ranks) one over the TP group, in Megatron's ``main_grad`` buffers: the
    sum for those each rank trains from its own segments (``split``: :data:`SPLIT_PREFIXES`), the
    mean for the others (the BESTOW block; the audio path when not split), whose replicas would
    otherwise drift apart where CUDA's backward is not deterministic. One all-reduce."""
    size = parallel_state.get_tensor_model_parallel_world_size()
    if size == 1:
        return
    grads, summed = [], []
    for chunk in model_chunks:
        for name, param in chunk.module.named_parameters():
            if name.startswith(REPLICATED_PREFIXES) and param.requires_grad:
                grads.append(param.main_grad)
                summed.append(split and name.startswith(SPLIT_PREFIXES))
    if not grads:
        return
    flat = torch.cat([g.flatten() for g in grads])
    torch.distributed.all_reduce(flat, group=parallel_state.get_tensor_model_parallel_group())
    parts = flat.split([g.numel() for g in grads])
    for grad, value, is_sum in zip(grads, parts, summed, strict=True):
        grad.copy_(value.view_as(grad) if is_sum else value.view_as(grad) / size)
