"""The audio path split over the ranks that share one sequence: each encodes its share of segments.

The encoder and adapter are replicated on the TP ranks (and CP ranks) of the first pipeline stage,
and every rank needs all the audio embeddings (they join the LLM's input before the
sequence-parallel scatter and the context-parallel cut). Instead of each rank encoding every
segment, rank ``r`` of the ``n`` sharing ranks encodes segments ``r, r + n, ...`` and the
embeddings are all-gathered. Sharing ranks: the TP ranks (``parallel.split_audio_over_tp``) and
the CP ranks (always: each would otherwise encode the whole batch).

The gradient reaching the gathered embeddings is the same on every TP rank (Megatron's TP regions
reduce it), but each CP rank's covers only its own chunks of the sequence: the backward pass sums
it over the CP group, then each rank keeps its own rows. Its encoder gradient then covers its own
segments only. DDP sums it over DP x CP ranks, and :func:`reduce_replicated_grads` over the TP
group once DDP's reduction has finished (the two commute; reading ``main_grad`` during DDP's
overlapped reduction would not). BatchNorm statistics see only a rank's share (as they do per DP
rank); the trainer averages the running statistics over the ranks that split the audio.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state

SPLIT_PREFIXES = ("audio.", "ctc.")  # parameters trained from a rank's own segments only
# Parameters outside the LLM, replicated on the TP ranks of the first stage.
REPLICATED_PREFIXES = (*SPLIT_PREFIXES, "cross_attention.")


@dataclass
class AudioShare:
    """The ranks that split one micro-batch's segments, and this rank's place among them."""

    group: object  # process group, or None when this rank encodes every segment
    rank: int
    size: int
    tp_alike: bool  # the TP ranks encode the same segments (copies of one another's)
    sum_over_cp: bool  # the embeddings' gradient differs by CP rank (summed before use)

    def segments(self, count: int) -> torch.Tensor:
        """Indices of the segments this rank encodes."""
        return torch.arange(self.rank, max(count, self.rank), self.size)  # none: empty

    @property
    def counts_own_segments(self) -> bool:
        """Whether this rank's per-segment sums (the CTC loss) are its own rather than a copy of
        another TP rank's."""
        return not self.tp_alike or parallel_state.get_tensor_model_parallel_rank() == 0


def audio_share(split_over_tp: bool) -> AudioShare:
    """How this rank's TP and CP neighbours split the segments (see the module docstring)."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    cp = parallel_state.get_context_parallel_world_size()
    over_tp = split_over_tp and tp > 1
    if over_tp and cp > 1:
        group = parallel_state.get_tensor_and_context_parallel_group()
        rank = parallel_state.get_tensor_and_context_parallel_rank()
    elif over_tp:
        group, rank = (parallel_state.get_tensor_model_parallel_group(),
                       parallel_state.get_tensor_model_parallel_rank())  # fmt: skip
    elif cp > 1:
        group, rank = (parallel_state.get_context_parallel_group(),
                       parallel_state.get_context_parallel_rank())  # fmt: skip
    else:
        group, rank = None, 0
    size = 1 if group is None else torch.distributed.get_world_size(group)
    return AudioShare(group, rank, size, tp_alike=not over_tp, sum_over_cp=cp > 1)


class _GatherSegments(torch.autograd.Function):
    """``[n_r, t, h]`` on each sharing rank -> ``[n, t, h]`` of every rank's rows in segment
    order; backward keeps this rank's rows (summed over CP ranks first). Every rank's ``t`` is the
    same (each encodes segments of the batch's padded width), and its row count follows from
    ``count``: the shapes are known without asking the other ranks."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, count: int, share: AudioShare) -> torch.Tensor:
        rows = -(-count // share.size)  # rank 0 holds the most
        padded = F.pad(local, (0, 0, 0, 0, 0, rows - local.shape[0]))
        parts = [torch.empty_like(padded) for _ in range(share.size)]
        torch.distributed.all_gather(parts, padded.contiguous(), group=share.group)
        # Rank r's row j is segment r + j * size.
        gathered = torch.stack(parts, dim=1).flatten(0, 1)[:count]
        ctx.share, ctx.rows = share, local.shape[0]
        return gathered

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        share = ctx.share
        if share.sum_over_cp:
            grad = grad.clone()
            torch.distributed.all_reduce(grad, group=parallel_state.get_context_parallel_group())
        return grad[share.rank :: share.size][: ctx.rows].contiguous(), None, None


def gather_segments(local: torch.Tensor, count: int, share: AudioShare) -> torch.Tensor:
    return _GatherSegments.apply(local, count, share)


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
