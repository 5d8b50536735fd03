"""Core attention through ``torch.nn.functional.scaled_dot_product_attention``.

A drop-in for Megatron's ``DotProductAttention`` in the local layer spec: same constructor and
forward signature, query/key/value in Megatron's ``[s, b, heads, head_dim]`` layout, output
``[s, b, heads * head_dim]``. SDPA picks flash or memory-efficient kernels on GPU and a fused CPU
kernel elsewhere; grouped-query attention is handled without materialising repeated keys.

It also takes what Transformer Engine's attention takes in training:

- packed rows (Megatron's ``thd`` format, batch dimension squeezed away): each sequence of the
  row attends causally to itself only, split by the host copy of its boundaries
  (:class:`PackedRows`), so no device value is read;
- context parallelism: each rank holds two load-balanced chunks of the sequence; keys and values
  are all-gathered over the CP group (``llm/context_parallel.py``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from .context_parallel import context_parallel_attention


@dataclass
class PackedRows(PackedSeqParams):
    """Megatron's ``thd`` parameters for a packed row, with the sequences' lengths on the host
    (Transformer Engine reads only the base class's fields)."""

    seqlens: tuple[int, ...] = ()


def packed_rows(lengths: list[int], row_length: int, device) -> PackedRows:
    """The parameters of a row of ``row_length`` positions holding sequences of ``lengths``
    back to back; the tail after them is one more sequence (padding, never in the loss).

    ``max_seqlen`` is the longest sequence's: Megatron's unfused RoPE reads a ``max_seqlen``
    equal to the row's length as "positions run on across sequences", which it is only when
    the row holds one sequence (then both readings agree)."""
    tail = row_length - sum(lengths)
    if tail < 0 or min(lengths, default=0) < 1:
        raise ValueError(f"sequences of {lengths} positions do not pack into {row_length}")
    seqlens = tuple(lengths) + ((tail,) if tail else ())
    bounds = torch.tensor([0, *seqlens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    bounds = bounds.to(device, non_blocking=True)
    longest = max(seqlens)
    return PackedRows(
        qkv_format="thd", cu_seqlens_q=bounds, cu_seqlens_kv=bounds,
        max_seqlen_q=longest, max_seqlen_kv=longest, seqlens=seqlens,
    )  # fmt: skip


class SDPAttention(MegatronModule):
    """Scaled dot-product attention over the local (tensor-parallel) heads."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        self.cp_group = (
            pg_collection.cp
            if pg_collection is not None and hasattr(pg_collection, "cp")
            else parallel_state.get_context_parallel_group(check_initialized=False)
        )
        self.attn_mask_type = attn_mask_type
        self.dropout_p = (
            config.attention_dropout if attention_dropout is None else attention_dropout
        )
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)

    def forward(
        self,
        query: torch.Tensor,  # [sq, b, np, hn]
        key: torch.Tensor,  # [sk, b, ng, hn]
        value: torch.Tensor,  # [sk, b, ng, hn]
        attention_mask: Optional[torch.Tensor],  # bool, True = masked out (Megatron convention)
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise NotImplementedError("attention bias needs Transformer Engine attention")
        mask_type = attn_mask_type or self.attn_mask_type
        causal = mask_type == AttnMaskType.causal
        dropout = self.dropout_p if self.training else 0.0
        cp = 1 if self.cp_group is None else self.cp_group.size()
        if packed_seq_params is not None or cp > 1:
            if attention_mask is not None or not causal:
                raise NotImplementedError(
                    "packed rows and context parallelism run causal attention without a mask"
                )
            with self._dropout_rng(dropout):
                if packed_seq_params is not None:
                    if cp > 1:
                        raise NotImplementedError("packed rows with context parallelism")
                    return self._packed(query, key, value, packed_seq_params, dropout)
                return context_parallel_attention(
                    query, key, value, self.cp_group, self.softmax_scale, dropout
                )
        mask = None
        # A given mask always applies, even when Megatron's decoding switches the mask type to
        # no_mask after the prompt: generation masks its left padding with it.
        if attention_mask is not None:
            mask = ~attention_mask  # SDPA: True = attend
            if causal:
                sq, sk = query.shape[0], key.shape[0]
                lower = torch.ones(sq, sk, dtype=torch.bool, device=query.device).tril(sk - sq)
                mask = mask & lower
                causal = False

        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        with self._dropout_rng(dropout):
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=dropout,
                is_causal=causal,
                scale=self.softmax_scale,
                enable_gqa=q.shape[1] != k.shape[1],
            )
        # [b, np, sq, hn] -> [sq, b, np * hn]
        b, n, s, d = out.shape
        return out.permute(2, 0, 1, 3).reshape(s, b, n * d)

    @staticmethod
    def _dropout_rng(dropout: float):
        """Megatron's model-parallel RNG for attention dropout (nothing to fork without it)."""
        tracker = tensor_parallel.get_cuda_rng_tracker()
        return tracker.fork() if dropout else contextlib.nullcontext()

    def _packed(self, query, key, value, rows: PackedSeqParams, dropout: float) -> torch.Tensor:
        """``thd`` query/key/value ``[t, heads, d]``: each sequence of the row attends causally to
        itself; output ``[t, heads * d]``."""
        if not isinstance(rows, PackedRows):
            raise TypeError(
                "the local attention splits packed rows by their host lengths: build the "
                "parameters with llm.packed_rows"
            )
        outputs = []
        for q, k, v in zip(*(x.split(rows.seqlens) for x in (query, key, value)), strict=True):
            # [s, n, d] -> [1, n, s, d]
            q, k, v = (x.transpose(0, 1)[None] for x in (q, k, v))
            out = F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout, is_causal=True, scale=self.softmax_scale,
                enable_gqa=q.shape[1] != k.shape[1],
            )  # fmt: skip
            outputs.append(out[0].transpose(0, 1).flatten(1))
        return torch.cat(outputs)
