"""Modality adapters: encoder frames ``[b, t, d_in]`` to LLM embeddings ``[b, t', d_out]``.

The first three stack ``k`` consecutive frames (dividing the frame rate by ``k``: fewer audio
positions in the LLM's sequence), then transform:

- ``linear``: one projection;
- ``mlp``: Linear - GELU - Linear;
- ``conformer``: projection to the adapter width, conformer layers (the encoder's block), then a
  projection to ``d_out``; ``extra_subsampling`` stacks 2 frames first.

``pool_linear`` averages ``k`` frames instead (a last incomplete group is dropped), then
LayerNorm and a projection: Qwen2-Audio's pooling, its encoder's final norm and its projector.

Frames beyond each length are zeroed before stacking, and outputs beyond the new lengths are zero,
so an utterance gives the same valid outputs alone and in a padded batch.
"""

from __future__ import annotations

import torch
from torch import nn

from salm_megatron.audio.fastconformer import (
    ConformerLayer,
    RelPositionalEncoding,
    attention_mask,
    encoder_output_lengths,
)
from salm_megatron.audio.features import feature_lengths
from salm_megatron.audio.masks import ceil_div, check_lengths, valid_mask
from salm_megatron.config import AdapterConfig, EncoderConfig


def stack_frames(
    x: torch.Tensor, lengths: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[b, t, d] -> [b, ceil(t / k), k * d]``: each output frame is ``k`` input frames side by
    side (zeros past the end); lengths become ``ceil(lengths / k)``."""
    x = x.masked_fill(~valid_mask(lengths, x.size(1))[..., None], 0.0)
    if k == 1:
        return x, lengths
    b, t, d = x.shape
    x = nn.functional.pad(x, (0, 0, 0, (-t) % k))
    return x.reshape(b, -1, k * d), ceil_div(lengths, k)


class StackingAdapter(nn.Module):
    """Stack ``stack`` frames, apply ``transform``, zero the padded outputs."""

    def __init__(self, stack: int):
        super().__init__()
        self.stack = stack

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return ceil_div(lengths, self.stack)

    def transform(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 3:
            raise ValueError(
                f"adapter input must be [batch, frames, features]; got {list(x.shape)}"
            )
        check_lengths("lengths", lengths, x.size(0), x.size(1))
        x, lengths = stack_frames(x, lengths, self.stack)
        valid = valid_mask(lengths, x.size(1))
        y = self.transform(x, valid)
        return y.masked_fill(~valid[..., None], 0.0), lengths


class LinearAdapter(StackingAdapter):
    def __init__(self, d_in: int, d_out: int, stack: int = 1):
        super().__init__(stack)
        self.proj = nn.Linear(stack * d_in, d_out)

    def transform(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class MLPAdapter(StackingAdapter):
    def __init__(self, d_in: int, d_out: int, hidden_size: int, stack: int = 1):
        super().__init__(stack)
        self.mlp = nn.Sequential(
            nn.Linear(stack * d_in, hidden_size), nn.GELU(), nn.Linear(hidden_size, d_out)
        )

    def transform(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class ConformerAdapter(StackingAdapter):
    """Projection to ``width``, conformer layers with relative positions, projection to d_out."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        width: int,
        num_layers: int = 2,
        num_heads: int = 8,
        conv_kernel_size: int = 9,
        dropout: float = 0.0,
        stack: int = 1,
    ):
        super().__init__(stack)
        if width % num_heads:
            raise ValueError(
                f"conformer adapter width {width} (adapter.hidden_size, or d_in) is not divisible "
                f"by adapter.num_heads={num_heads}"
            )
        self.proj_in = nn.Linear(stack * d_in, width)
        self.pos_enc = RelPositionalEncoding(width, xscale=False, dropout=dropout, dropout_emb=0.0)
        self.layers = nn.ModuleList(
            ConformerLayer(
                width,
                num_heads,
                conv_kernel_size=conv_kernel_size,
                dropout=dropout,
                dropout_att=dropout,
            )
            for _ in range(num_layers)
        )
        self.proj_out = nn.Linear(width, d_out)

    def transform(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        x, pos_emb = self.pos_enc(self.proj_in(x))
        allowed = attention_mask(valid, (-1, -1))
        for layer in self.layers:
            x = layer(x, pos_emb, valid, allowed)
        return self.proj_out(x)


class PoolLinearAdapter(nn.Module):
    """``[b, t, d_in] -> [b, t // k, d_out]``: average pooling of ``k`` frames (AvgPool1d),
    LayerNorm, Linear with bias (Qwen2-Audio's ``avg_pooler``, ``layer_norm`` and
    ``multi_modal_projector``). Only whole groups of valid frames are kept, so padding never
    enters an output frame."""

    def __init__(self, d_in: int, d_out: int, pool: int):
        super().__init__()
        self.pool = pool
        self.norm = nn.LayerNorm(d_in)
        self.proj = nn.Linear(d_in, d_out)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return lengths // self.pool

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 3:
            raise ValueError(
                f"adapter input must be [batch, frames, features]; got {list(x.shape)}"
            )
        check_lengths("lengths", lengths, x.size(0), x.size(1))
        b, t, d = x.shape
        k = self.pool
        x = x[:, : t - t % k].reshape(b, t // k, k, d).mean(dim=2)
        lengths = self.output_lengths(lengths)
        y = self.proj(self.norm(x))
        return y.masked_fill(~valid_mask(lengths, y.size(1))[..., None], 0.0), lengths


def adapter_output_lengths(cfg: AdapterConfig, lengths: torch.Tensor) -> torch.Tensor:
    """Output frames for ``lengths`` encoder frames (no weights needed)."""
    if cfg.type == "pool_linear":
        return lengths // cfg.stack
    return ceil_div(lengths, cfg.subsampling_factor)


def audio_embedding_lengths(
    encoder: EncoderConfig, adapter: AdapterConfig, audio_lengths: torch.Tensor
) -> torch.Tensor:
    """Frames each waveform becomes after features, encoder and adapter (no weights needed)."""
    lengths = feature_lengths(encoder.features, audio_lengths)
    return adapter_output_lengths(adapter, encoder_output_lengths(encoder, lengths))


def build_adapter(cfg: AdapterConfig, d_in: int, d_out: int) -> nn.Module:
    """The adapter ``cfg`` describes, from encoder width ``d_in`` to LLM hidden size ``d_out``."""
    if cfg.type == "pool_linear":
        return PoolLinearAdapter(d_in, d_out, cfg.stack)
    if cfg.type == "linear":
        return LinearAdapter(d_in, d_out, cfg.stack)
    if cfg.type == "mlp":
        return MLPAdapter(d_in, d_out, cfg.hidden_size or d_out, cfg.stack)
    return ConformerAdapter(
        d_in,
        d_out,
        width=cfg.hidden_size or d_in,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        conv_kernel_size=cfg.conv_kernel_size,
        dropout=cfg.dropout,
        stack=cfg.subsampling_factor,
    )
