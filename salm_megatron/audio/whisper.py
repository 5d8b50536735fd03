"""Whisper's encoder and its log-mel front end, for any length up to 30 s (no forced padding).

``audio [b, samples] -> WhisperLogMel -> [b, n_mels, t] (100 Hz) -> WhisperEncoder -> [b, t', d]``
(50 Hz). Parameter names are Hugging Face's ``WhisperEncoder``'s, so a converted checkpoint is a
selection of its keys (``salm convert hf-whisper-encoder``).

Whisper was trained on 30 s windows padded with silence; here an utterance is encoded as it is:
the positions are the first ``t'`` rows of the table, and in a padded batch every layer ignores
the padding (convolutions see zeros beyond each length, attention masks padded keys), so each
utterance gives the same output alone and in a batch. On a 30 s input both agree with Whisper's.

``encoder.features.silence_padding`` reproduces instead what a model trained on the padded
windows (Qwen2-Audio) sees of a shorter utterance: the features past it are the log-mel of
silence, which the convolutions read at its end; attention still ignores them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from salm_megatron.audio.fastconformer import conv_output_lengths
from salm_megatron.audio.features import MelFrontEnd, feature_lengths
from salm_megatron.audio.masks import check_features, require, valid_mask
from salm_megatron.audio.recompute import run_layers
from salm_megatron.config import EncoderConfig, FeatureConfig

# Whisper's log-mel scaling: power floor before log10, dynamic range kept below the maximum, and
# the affine map that brings the result near [-1, 1].
_POWER_FLOOR = 1e-10
_DYNAMIC_RANGE = 8.0
_OFFSET, _SCALE = 4.0, 4.0
_WINDOW_SECONDS = 30  # Whisper's input window, which its feature extractor pads audio to
# Masked attention scores: exp() of it underflows to 0 next to any real score.
_MASKED_SCORE = -10000.0


class WhisperLogMel(MelFrontEnd):
    """``(audio [b, n_samples], lengths [b]) -> (features [b, n_mels, t], frames [b])``.

    Whisper's recipe: centred STFT with a periodic Hann window, power spectrum, Slaney mel
    filterbank, ``log10(max(mel, 1e-10))``, floored at the utterance's maximum minus 8, then
    ``(x + 4) / 4``; ``samples // hop`` frames (the STFT's last frame is dropped, as Whisper does).

    Whisper pads every input to 30 s with zeros, so an utterance is followed by zeros: the centring
    pads the start by reflection and the end with zeros, and the maximum is over the utterance's
    own frames (padded frames cannot exceed it). Frames beyond each length are 0.

    With ``silence_padding`` the features are those of the utterance padded with silence to
    Whisper's 30 s window, as its feature extractor computes them: ``ceil(samples / hop)``
    valid frames, the maximum over every frame of the window, the window's end reflected, and
    the frames past each length kept (those the audio's end reaches, then the log-mel of
    silence), two more than the batch's longest: what the encoder's convolutions read there.
    """

    def __init__(self, cfg: FeatureConfig):
        super().__init__(cfg, periodic_window=True)

    def forward(
        self, audio: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_input(audio, lengths)
        cfg = self.cfg
        half = cfg.n_fft // 2
        with torch.autocast(audio.device.type, enabled=False):
            x = audio.float()
            if self.training and cfg.dither > 0:
                x = x + cfg.dither * torch.randn_like(x)
            x = x.masked_fill(~valid_mask(lengths, x.size(1)), 0.0)
            x = F.pad(x, (0, max(0, half + 1 - x.size(1))))  # room to reflect a short batch
            tail = half
            if cfg.silence_padding:  # every frame the audio reaches, two more, in the window
                tail = cfg.n_fft + 3 * cfg.hop_length
                window = _WINDOW_SECONDS * cfg.sample_rate
                if x.size(1) <= window:  # zeros to its end, reflected past it (centred STFT)
                    x = F.pad(x, (0, min(window - x.size(1), tail)))
                if x.size(1) == window:
                    x = torch.cat([x, x[:, -half - 1 : -1].flip(-1)], dim=1)
            x = torch.cat([x[:, 1 : half + 1].flip(-1), x, x.new_zeros(x.size(0), tail)], dim=1)
            spectrum = torch.stft(
                x,
                n_fft=cfg.n_fft,
                hop_length=cfg.hop_length,
                win_length=cfg.win_length,
                window=self._window,
                center=False,  # padded above: reflected start, zeros after the end
                return_complex=True,
            )  # [b, n_fft // 2 + 1, frames]
            frames = feature_lengths(cfg, lengths)
            width = int(feature_lengths(cfg, torch.tensor(audio.size(1))))
            if cfg.silence_padding:
                width += 2  # what the encoder's convolutions read past the longest
            else:
                spectrum = spectrum[..., :width]
            power = torch.view_as_real(spectrum).pow(2).sum(-1)
            log_mel = torch.log10(torch.clamp(self._filterbank @ power, min=_POWER_FLOOR))
            valid = valid_mask(frames, width)[:, None, :]  # [b, 1, t]
            if cfg.silence_padding:  # frames the audio does not reach are silence, never above
                window_frames = _WINDOW_SECONDS * cfg.sample_rate // cfg.hop_length
                peak = log_mel[..., :window_frames].amax(dim=(1, 2), keepdim=True)
                log_mel = log_mel[..., :width]
            else:
                peak = log_mel.masked_fill(~valid, -math.inf).amax(dim=(1, 2), keepdim=True)
            log_mel = torch.maximum(log_mel, peak - _DYNAMIC_RANGE)
            features = (log_mel + _OFFSET) / _SCALE
            if cfg.silence_padding:  # past each utterance: the log-mel of its padding
                return features, frames
            return features.masked_fill(~valid, 0.0), frames


def sinusoids(positions: int, channels: int) -> torch.Tensor:
    """``[positions, channels]``: sines in the first half, cosines in the second, with timescales
    from 1 to 10000 in geometric steps (Whisper's initial position table)."""
    half = channels // 2
    rates = torch.exp(-math.log(10000.0) / (half - 1) * torch.arange(half, dtype=torch.float64))
    angle = torch.arange(positions, dtype=torch.float64)[:, None] * rates[None, :]
    return torch.cat([angle.sin(), angle.cos()], dim=1).float()


class WhisperSelfAttention(nn.Module):
    """Multi-head self-attention; the key projection has no bias (Whisper's layout)."""

    def __init__(self, d_model: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``x [b, t, d]``, ``bias [b, 1, 1, t]`` (0 for valid keys, very negative for padding)."""
        b, t, d = x.shape
        h = self.num_heads

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, h, d // h).transpose(1, 2)  # [b, h, t, d / h]

        out = F.scaled_dot_product_attention(
            heads(self.q_proj(x)),
            heads(self.k_proj(x)),
            heads(self.v_proj(x)),
            attn_mask=bias,
            dropout_p=self.dropout if self.training else 0.0,
        )  # scaled by 1 / sqrt(d / h)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


class WhisperEncoderLayer(nn.Module):
    """Pre-LN block: x + attention(LN(x)), then x + fc2(GELU(fc1(LN(x))))."""

    def __init__(self, d_model: int, num_heads: int, d_ff: int, dropout: float, dropout_att: float):
        super().__init__()
        self.self_attn_layer_norm = nn.LayerNorm(d_model)
        self.self_attn = WhisperSelfAttention(d_model, num_heads, dropout_att)
        self.final_layer_norm = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.self_attn(self.self_attn_layer_norm(x), bias))
        return x + self.dropout(self.fc2(F.gelu(self.fc1(self.final_layer_norm(x)))))


class WhisperEncoder(nn.Module):
    """``(features [b, n_mels, t], lengths [b]) -> (encoded [b, t', d_model], lengths' [b])``,
    ``t' = ceil(t / 2)``: the same interface as :class:`FastConformerEncoder`.

    Outputs beyond each length are 0. Inputs may be up to ``2 * max_source_positions`` frames.
    With ``features.silence_padding`` the convolutions read the features past each length as
    they come (the front end's silence; zeros only past ``2 * max_source_positions`` frames, as
    at the end of Whisper's 30 s window); without, zeros. ``final_norm=false`` leaves out the
    final LayerNorm (Qwen2-Audio's adapter pools first and holds it).
    """

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        if cfg.type != "whisper":
            raise ValueError(f"WhisperEncoder needs encoder.type='whisper', got {cfg.type!r}")
        self.cfg = cfg
        d = self.d_model = cfg.d_model
        self.n_mels = cfg.features.n_mels
        self.conv1 = nn.Conv1d(self.n_mels, d, 3, padding=1)
        self.conv2 = nn.Conv1d(d, d, 3, stride=2, padding=1)
        # Fixed in Whisper, so a buffer (not trained); loaded with the weights all the same.
        self.register_buffer("embed_positions", sinusoids(cfg.max_source_positions, d))
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(
            WhisperEncoderLayer(
                d, cfg.num_heads, d * cfg.ff_expansion_factor, cfg.dropout, cfg.dropout_att
            )
            for _ in range(cfg.num_layers)
        )
        self.layer_norm = nn.LayerNorm(d) if cfg.final_norm else None

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return conv_output_lengths(lengths, 1)

    def forward(
        self, features: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        check_features(features, lengths, self.n_mels)
        lengths = lengths.long()
        out_lengths = self.output_lengths(lengths)
        limit = self.cfg.max_source_positions
        require(
            out_lengths <= limit,
            lambda: (
                f"an input of {int(lengths.max())} feature frames encodes to "
                f"{int(out_lengths.max())} > encoder.max_source_positions={limit} frames "
                f"(Whisper takes at most {2 * limit} frames: "
                f"{2 * limit * self.cfg.features.window_stride:g} s)"
            ),
        )
        if self.cfg.features.silence_padding:
            x = F.gelu(self.conv1(features[:, :, : 2 * limit]))
        else:
            x = features.masked_fill(~valid_mask(lengths, features.size(2))[:, None], 0.0)
            x = F.gelu(self.conv1(x))
            x = x.masked_fill(~valid_mask(lengths, x.size(2))[:, None], 0.0)  # conv2 sees zeros
        x = F.gelu(self.conv2(x)).transpose(1, 2)[:, :limit]  # [b, t', d]; beyond: padding
        t = x.size(1)
        x = self.dropout(x + self.embed_positions[:t].to(x.dtype))
        valid = valid_mask(out_lengths, t)
        bias = torch.zeros(valid.shape, dtype=x.dtype, device=x.device)
        bias = bias.masked_fill(~valid, _MASKED_SCORE)[:, None, None, :]  # [b, 1, 1, t]
        x = run_layers(self.layers, x, bias, recompute_layers=self.cfg.recompute_layers)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return x.masked_fill(~valid[..., None], 0.0), out_lengths


def hf_state_dict_to_ours(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder entries of a Hugging Face Whisper state dict, in our names.

    ``WhisperForConditionalGeneration`` keeps them under ``model.encoder.``, ``WhisperModel``
    under ``encoder.``, a lone ``WhisperEncoder`` at the top. The names below the prefix are ours
    but for the position table, an ``nn.Embedding`` there (``embed_positions.weight``).
    """
    for prefix in ("model.encoder.", "encoder.", ""):
        ours = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if "conv1.weight" in ours:
            break
    else:
        raise ValueError(
            "no Whisper encoder in the state dict: no model.encoder.conv1.weight, "
            "encoder.conv1.weight or conv1.weight"
        )
    if prefix == "":  # a lone encoder: nothing else may be there
        ours = {k: v for k, v in ours.items() if not k.startswith(("model.", "decoder."))}
    if "embed_positions.weight" in ours:
        ours["embed_positions"] = ours.pop("embed_positions.weight")
    return ours
