"""Context parallelism without Transformer Engine: each CP rank holds two chunks of the sequence.

Megatron cuts the sequence into ``2 * CP`` equal chunks and gives rank ``r`` chunks ``r`` and
``2 * CP - 1 - r``: under a causal mask an early chunk has little to attend to and a late one much,
so each rank gets one of each and the work is even. Megatron-Core's RoPE already rotates each
rank's positions this way (``get_pos_emb_on_this_cp_rank``); the speech model cuts its input and
targets with :func:`local_chunks`.

Attention all-gathers the keys and values over the CP group (as Llama 3's long-context training
does; the backward pass reduce-scatters their gradients) and lets each local query chunk attend
causally to the keys up to its own end, so a rank computes only what the mask keeps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region


def chunk_order(size: int, rank: int) -> list[int]:
    """The two chunks (of ``2 * size``) that CP rank ``rank`` holds, in its local order."""
    return [rank, 2 * size - 1 - rank]


def local_chunks(x: torch.Tensor, dim: int, group=None) -> torch.Tensor:
    """This CP rank's two chunks of ``x`` along ``dim`` (all of ``x`` without CP); the
    sequence length must be a multiple of ``2 * CP``."""
    group = group or parallel_state.get_context_parallel_group()
    size = group.size()
    if size == 1:
        return x
    length = x.shape[dim]
    if length % (2 * size):
        raise ValueError(f"a sequence of {length} positions does not cut into {2 * size} chunks")
    chunks = x.unflatten(dim, (2 * size, length // (2 * size)))
    index = torch.tensor(chunk_order(size, group.rank()), device=x.device)
    return chunks.index_select(dim, index).flatten(dim, dim + 1)


def _global_order(size: int) -> list[int]:
    """Where each global chunk sits in the all-gathered keys (rank ``j`` contributes chunks
    ``j`` and ``2 * size - 1 - j``, in that order)."""
    held = [chunk for rank in range(size) for chunk in chunk_order(size, rank)]
    return [held.index(chunk) for chunk in range(2 * size)]


def context_parallel_attention(query, key, value, group, scale: float, dropout: float):
    """Causal attention of this rank's ``query [2c, b, np, d]`` (its two chunks) over the whole
    sequence's keys and values (``[2c, b, ng, d]`` here, gathered from every CP rank); output
    ``[2c, b, np * d]``."""
    size, rank = group.size(), group.rank()
    chunk = query.shape[0] // 2
    gathered = [
        gather_from_sequence_parallel_region(x.contiguous(), True, group=group)
        for x in (key, value)
    ]
    order = torch.tensor(_global_order(size), device=key.device)
    key, value = (  # [2 * size * c, b, ng, d] in sequence order
        x.unflatten(0, (2 * size, chunk)).index_select(0, order).flatten(0, 1) for x in gathered
    )
    outputs = []
    for local, position in enumerate(chunk_order(size, rank)):
        end = (position + 1) * chunk  # keys up to the end of this chunk
        q = query[local * chunk : (local + 1) * chunk]
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (q, key[:end], value[:end]))
        mask = torch.ones(chunk, end, dtype=torch.bool, device=q.device).tril(position * chunk)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )  # fmt: skip
        b, n, s, d = out.shape
        outputs.append(out.permute(2, 0, 1, 3).reshape(s, b, n * d))
    return torch.cat(outputs)
