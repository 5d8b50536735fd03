"""FastConformer encoder: the function of NeMo's ``ConformerEncoder`` (dw_striding, rel_pos).

``features [b, n_mels, t] -> 8x subsampling -> conformer layers -> [b, t / 8, d_model]``.
Parameter names are NeMo's, so a NeMo encoder state dict loads as it is
(:func:`nemo_state_dict_to_ours` only selects and checks the keys). Padding never reaches a valid
output: the subsampling convolutions see zeros beyond each length, attention ignores padded keys
and the convolution module zeroes padded frames before its depthwise convolution. In training,
BatchNorm statistics include padded frames, as in NeMo.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from salm_megatron.audio.masks import check_features, valid_mask
from salm_megatron.audio.recompute import run_layers
from salm_megatron.config import EncoderConfig

# Masked attention scores: exp() of it underflows to 0 next to any real score (NeMo's value).
_MASKED_SCORE = -10000.0


def conv_output_lengths(lengths: torch.Tensor | int, stages: int) -> torch.Tensor | int:
    """Frames after ``stages`` convolutions of kernel 3, stride 2, padding 1 (NeMo's calc_length).

    Each stage maps ``L`` to ``floor((L + 2 - 3) / 2) + 1``.
    """
    for _ in range(stages):
        lengths = (lengths - 1) // 2 + 1
    return lengths


def encoder_output_lengths(cfg: EncoderConfig, lengths: torch.Tensor) -> torch.Tensor:
    """Encoded frames for ``lengths`` feature frames (no weights needed)."""
    return conv_output_lengths(lengths, cfg.subsampling_stages)


class ConvSubsampling(nn.Module):
    """Depthwise-striding subsampling (NeMo's ``dw_striding``): time and frequency / 2^stages.

    A full 3x3 stride-2 conv from one channel, then per stage a depthwise 3x3 stride-2 conv and a
    pointwise 1x1 conv, each stage followed by ReLU; then a linear from ``channels * freq`` to
    ``d_model``. Layout ``conv.{0,2,3,5,6}`` as NeMo's ``pre_encode.conv``.
    """

    def __init__(self, n_mels: int, d_model: int, channels: int, stages: int):
        super().__init__()
        self.stages = stages
        layers: list[nn.Module] = [nn.Conv2d(1, channels, 3, stride=2, padding=1), nn.ReLU()]
        for _ in range(stages - 1):
            layers += [
                nn.Conv2d(channels, channels, 3, stride=2, padding=1, groups=channels),
                nn.Conv2d(channels, channels, 1),
                nn.ReLU(),
            ]
        self.conv = nn.Sequential(*layers)
        freq = conv_output_lengths(n_mels, stages)
        self.out = nn.Linear(channels * freq, d_model)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x[:, None]  # [b, 1, t, f]
        for layer in self.conv:
            if isinstance(layer, nn.Conv2d) and layer.stride[0] > 1:
                # It mixes neighbouring frames: those beyond the length must be zeros, as alone.
                x = x.masked_fill(~valid_mask(lengths, x.size(2))[:, None, :, None], 0.0)
                lengths = conv_output_lengths(lengths, 1)
            x = layer(x)
        x = x.masked_fill(~valid_mask(lengths, x.size(2))[:, None, :, None], 0.0)
        b, c, t, f = x.shape
        return self.out(x.transpose(1, 2).reshape(b, t, c * f)), lengths  # [b, t', d_model]


class RelPositionalEncoding(nn.Module):
    """Sinusoids for the relative distances ``t-1 .. -(t-1)`` (Transformer-XL, NeMo's layout).

    Also scales the frames by ``sqrt(d_model)`` when ``xscale`` is on.
    """

    def __init__(self, d_model: int, xscale: bool, dropout: float, dropout_emb: float):
        super().__init__()
        self.d_model = d_model
        self.xscale = math.sqrt(d_model) if xscale else None
        self.dropout = nn.Dropout(dropout)
        self.dropout_emb = nn.Dropout(dropout_emb)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = x.size(1)
        distance = torch.arange(t - 1, -t, -1, dtype=torch.float32, device=x.device)[:, None]
        inv_freq = torch.exp(
            torch.arange(0, self.d_model, 2, dtype=torch.float32, device=x.device)
            * -(math.log(10000.0) / self.d_model)
        )
        angle = distance * inv_freq  # [2t - 1, d / 2]
        # Interleaved: sin in even channels, cos in odd ones.
        pos_emb = torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(1)[None].to(x.dtype)
        if self.xscale is not None:
            x = x * self.xscale
        return self.dropout(x), self.dropout_emb(pos_emb)  # [b, t, d], [1, 2t - 1, d]


class RelPositionSelfAttention(nn.Module):
    """Multi-head self-attention with Transformer-XL relative positions.

    score(i, j) = (q_i + u) . k_j + (q_i + v) . W_pos pe(i - j), scaled by 1 / sqrt(d_head), with
    learned per-head biases ``pos_bias_u`` (content) and ``pos_bias_v`` (position).
    """

    def __init__(self, d_model: int, num_heads: int, dropout: float, bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.d_head = d_model // num_heads
        self.dropout = dropout
        self.linear_q = nn.Linear(d_model, d_model, bias=bias)
        self.linear_k = nn.Linear(d_model, d_model, bias=bias)
        self.linear_v = nn.Linear(d_model, d_model, bias=bias)
        self.linear_out = nn.Linear(d_model, d_model, bias=bias)
        self.linear_pos = nn.Linear(d_model, d_model, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(num_heads, self.d_head))
        self.pos_bias_v = nn.Parameter(torch.zeros(num_heads, self.d_head))

    def forward(
        self,
        x: torch.Tensor,
        pos_emb: torch.Tensor,
        valid: torch.Tensor,
        allowed: torch.Tensor,
    ) -> torch.Tensor:
        """``x [b, t, d]``, ``pos_emb [1, 2t-1, d]``, ``valid [b, t]``, ``allowed [b, 1, t, t]``."""
        b, t, d = x.shape
        h, dh = self.num_heads, self.d_head
        q = self.linear_q(x).view(b, t, h, dh)
        k = self.linear_k(x).view(b, t, h, dh).transpose(1, 2)  # [b, h, t, dh]
        v = self.linear_v(x).view(b, t, h, dh).transpose(1, 2)
        p = self.linear_pos(pos_emb).view(1, -1, h, dh).transpose(1, 2)  # [1, h, 2t-1, dh]
        q_u = (q + self.pos_bias_u).transpose(1, 2)  # [b, h, t, dh]
        q_v = (q + self.pos_bias_v).transpose(1, 2)
        by_distance = q_v @ p.transpose(-2, -1)  # [b, h, t, 2t-1]: column c is distance t-1-c
        # Query i, key j needs distance i - j: column t - 1 - i + j.
        frame = torch.arange(t, device=x.device)
        column = (t - 1) - frame[:, None] + frame[None, :]  # [t, t]
        position_scores = by_distance.gather(-1, column.expand(b, h, t, t))
        bias = (position_scores / math.sqrt(dh)).masked_fill(~allowed, _MASKED_SCORE)
        out = F.scaled_dot_product_attention(
            q_u, k, v, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0
        )  # [b, h, t, dh]; scaled by 1 / sqrt(dh)
        out = out.masked_fill(~valid[:, None, :, None], 0.0)  # padded queries attend to nothing
        return self.linear_out(out.transpose(1, 2).reshape(b, t, d))


class ConformerFeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float, bias: bool):
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff, bias=bias)
        self.activation = nn.SiLU()
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))


class ConformerConvolution(nn.Module):
    """Pointwise conv + GLU, depthwise conv, BatchNorm (or LayerNorm), swish, pointwise conv."""

    def __init__(self, d_model: int, kernel_size: int, norm_type: str, bias: bool):
        super().__init__()
        self.pointwise_conv1 = nn.Conv1d(d_model, 2 * d_model, 1, bias=bias)
        self.depthwise_conv = nn.Conv1d(
            d_model, d_model, kernel_size, padding=kernel_size // 2, groups=d_model, bias=bias
        )
        # NeMo's name for the norm, whichever kind it is.
        self.batch_norm = (
            nn.BatchNorm1d(d_model) if norm_type == "batch_norm" else nn.LayerNorm(d_model)
        )
        self.activation = nn.SiLU()
        self.pointwise_conv2 = nn.Conv1d(d_model, d_model, 1, bias=bias)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        x = F.glu(self.pointwise_conv1(x.transpose(1, 2)), dim=1)  # [b, d, t]
        x = self.depthwise_conv(x.masked_fill(~valid[:, None, :], 0.0))
        if isinstance(self.batch_norm, nn.LayerNorm):
            x = self.batch_norm(x.transpose(1, 2)).transpose(1, 2)
        else:
            x = self.batch_norm(x)
        return self.pointwise_conv2(self.activation(x)).transpose(1, 2)  # [b, t, d]


class ConformerLayer(nn.Module):
    """Macaron block: x + FFN/2, + self-attention, + convolution, + FFN/2, then LayerNorm."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        ff_expansion_factor: int = 4,
        conv_kernel_size: int = 9,
        conv_norm_type: str = "batch_norm",
        dropout: float = 0.1,
        dropout_att: float = 0.1,
        bias: bool = True,
    ):
        super().__init__()
        d_ff = d_model * ff_expansion_factor
        self.norm_feed_forward1 = nn.LayerNorm(d_model)
        self.feed_forward1 = ConformerFeedForward(d_model, d_ff, dropout, bias)
        self.norm_self_att = nn.LayerNorm(d_model)
        self.self_attn = RelPositionSelfAttention(d_model, num_heads, dropout_att, bias)
        self.norm_conv = nn.LayerNorm(d_model)
        self.conv = ConformerConvolution(d_model, conv_kernel_size, conv_norm_type, bias)
        self.norm_feed_forward2 = nn.LayerNorm(d_model)
        self.feed_forward2 = ConformerFeedForward(d_model, d_ff, dropout, bias)
        self.dropout = nn.Dropout(dropout)
        self.norm_out = nn.LayerNorm(d_model)

    def forward(
        self, x: torch.Tensor, pos_emb: torch.Tensor, valid: torch.Tensor, allowed: torch.Tensor
    ) -> torch.Tensor:
        x = x + 0.5 * self.dropout(self.feed_forward1(self.norm_feed_forward1(x)))
        x = x + self.dropout(self.self_attn(self.norm_self_att(x), pos_emb, valid, allowed))
        x = x + self.dropout(self.conv(self.norm_conv(x), valid))
        x = x + 0.5 * self.dropout(self.feed_forward2(self.norm_feed_forward2(x)))
        return self.norm_out(x)


def attention_mask(valid: torch.Tensor, context: list[int] | tuple[int, int]) -> torch.Tensor:
    """``[b, 1, t, t]`` bool: query i may attend to key j (valid, within ``[left, right]``)."""
    t = valid.size(1)
    frame = torch.arange(t, device=valid.device)
    offset = frame[None, :] - frame[:, None]  # [t, t]: key j - query i
    left, right = context
    allowed = valid[:, None, None, :]  # [b, 1, 1, t]: no padded key
    if left >= 0:
        allowed = allowed & (offset >= -left)
    if right >= 0:
        allowed = allowed & (offset <= right)
    return allowed.expand(-1, 1, t, t)


class FastConformerEncoder(nn.Module):
    """``(features [b, n_mels, t], lengths [b]) -> (encoded [b, t', d_model], lengths' [b])``.

    NeMo returns ``[b, d_model, t']``; this returns frames last-dim-features for the adapters.
    """

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.d_model = cfg.d_model
        self.n_mels = cfg.features.n_mels
        self.pre_encode = ConvSubsampling(
            self.n_mels, cfg.d_model, cfg.subsampling_conv_channels, cfg.subsampling_stages
        )
        self.pos_enc = RelPositionalEncoding(
            cfg.d_model, cfg.xscaling, cfg.dropout_pre_encoder, cfg.dropout_emb
        )
        self.layers = nn.ModuleList(
            ConformerLayer(
                cfg.d_model,
                cfg.num_heads,
                cfg.ff_expansion_factor,
                cfg.conv_kernel_size,
                cfg.conv_norm_type,
                cfg.dropout,
                cfg.dropout_att,
                cfg.use_bias,
            )
            for _ in range(cfg.num_layers)
        )

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return encoder_output_lengths(self.cfg, lengths)

    def forward(
        self, features: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        check_features(features, lengths, self.n_mels)
        x, lengths = self.pre_encode(features.transpose(1, 2), lengths.long())  # [b, t', d]
        x, pos_emb = self.pos_enc(x)
        valid = valid_mask(lengths, x.size(1))
        allowed = attention_mask(valid, self.cfg.att_context_size)
        x = run_layers(
            self.layers, x, pos_emb, valid, allowed, recompute_layers=self.cfg.recompute_layers
        )
        return x, lengths


def nemo_state_dict_to_ours(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A NeMo ``ConformerEncoder`` state dict (or a whole ASR model's) in our names.

    The names are NeMo's own. This keeps the ``encoder.`` entries of a whole model (dropping the
    prefix), drops the positional table that older NeMo versions saved (``pos_enc.pe``; ours is
    computed), and copies encoder-level ``pos_bias_u/v`` (NeMo's ``untie_biases=False``) into every
    layer.
    """
    if any(key.startswith("encoder.") for key in state_dict):
        state_dict = {
            key[len("encoder.") :]: value
            for key, value in state_dict.items()
            if key.startswith("encoder.")
        }
    ours = {key: value for key, value in state_dict.items() if not key.endswith("pos_enc.pe")}
    shared = {name: ours.pop(name) for name in ("pos_bias_u", "pos_bias_v") if name in ours}
    if shared:
        layers = {key.split(".")[1] for key in ours if key.startswith("layers.")}
        for layer in layers:
            for name, value in shared.items():
                ours[f"layers.{layer}.self_attn.{name}"] = value
    return ours
