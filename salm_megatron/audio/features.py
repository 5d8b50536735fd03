"""Log-mel features, computed as NeMo's ``AudioToMelSpectrogramPreprocessor`` does.

Pretrained FastConformer encoders only understand exactly these features, so every step follows
NeMo: pre-emphasis, a zero-padded centred STFT (Hann window of ``win_length`` samples inside
``n_fft``), power spectrum, Slaney mel filterbank, ``log(mel + guard)``, per-utterance per-bin
normalisation over the valid frames, and zeros in the padded frames. An utterance gives the same
features alone and inside a padded batch.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from salm_megatron.audio.masks import check_lengths, valid_mask
from salm_megatron.config import FeatureConfig

# Slaney's mel scale (Auditory Toolbox): linear below 1 kHz (3 mels per 200 Hz), logarithmic above
# (27 mels per factor 6.4 in frequency).
_LINEAR_HZ_PER_MEL = 200.0 / 3
_LOG_START_HZ = 1000.0
_LOG_START_MEL = _LOG_START_HZ / _LINEAR_HZ_PER_MEL  # 15
_LOG_MELS_PER_E = 27.0 / math.log(6.4)

# Added to the standard deviation before dividing (NeMo's constant).
_STD_GUARD = 1e-5


def hz_to_mel(hz: torch.Tensor) -> torch.Tensor:
    """Slaney mel scale (not HTK's)."""
    linear = hz / _LINEAR_HZ_PER_MEL
    log = _LOG_START_MEL + torch.log(hz.clamp(min=_LOG_START_HZ) / _LOG_START_HZ) * _LOG_MELS_PER_E
    return torch.where(hz >= _LOG_START_HZ, log, linear)


def mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    linear = mel * _LINEAR_HZ_PER_MEL
    log = _LOG_START_HZ * torch.exp(
        (mel.clamp(min=_LOG_START_MEL) - _LOG_START_MEL) / _LOG_MELS_PER_E
    )
    return torch.where(mel >= _LOG_START_MEL, log, linear)


def slaney_mel_filterbank(
    sample_rate: int, n_fft: int, n_mels: int, f_min: float = 0.0, f_max: float | None = None
) -> torch.Tensor:
    """``[n_mels, n_fft // 2 + 1]`` triangular filters, area-normalised ("slaney" norm).

    Filter ``m`` rises from edge ``m`` to a peak at edge ``m + 1`` and falls to edge ``m + 2``,
    with ``n_mels + 2`` edges evenly spaced in mels; each row is scaled by ``2 / bandwidth_hz`` so
    every filter has the same area. Computed in float64, returned as float32.
    """
    f_max = sample_rate / 2 if f_max is None else f_max
    bins_hz = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    mel_edges = torch.linspace(
        hz_to_mel(torch.tensor(f_min, dtype=torch.float64)).item(),
        hz_to_mel(torch.tensor(f_max, dtype=torch.float64)).item(),
        n_mels + 2,
        dtype=torch.float64,
    )
    edges_hz = mel_to_hz(mel_edges)  # [n_mels + 2]
    lower, centre, upper = edges_hz[:-2, None], edges_hz[1:-1, None], edges_hz[2:, None]
    rising = (bins_hz - lower) / (centre - lower)
    falling = (upper - bins_hz) / (upper - centre)
    filters = torch.clamp(torch.minimum(rising, falling), min=0)  # [n_mels, bins]
    filters = filters * (2.0 / (upper - lower))
    return filters.to(torch.float32)


def feature_lengths(cfg: FeatureConfig, lengths: torch.Tensor) -> torch.Tensor:
    """Valid frames for ``lengths`` samples: frames whose centre lies inside the audio.

    (NeMo's ``get_seq_len``; the centred STFT pads ``n_fft // 2`` samples on each side.) With
    ``silence_padding`` a last frame whose hop is cut short counts too: ``ceil(samples / hop)``,
    the frames Whisper's feature extractor marks valid in audio it padded to 30 s.
    """
    if cfg.silence_padding:
        return (lengths + cfg.hop_length - 1) // cfg.hop_length
    return (lengths + 2 * (cfg.n_fft // 2) - cfg.n_fft) // cfg.hop_length


class MelFrontEnd(nn.Module):
    """What every log-mel front end shares: its window and mel filterbank (float32, moved to the
    audio's device on first use) and the checks on its input."""

    def __init__(self, cfg: FeatureConfig, periodic_window: bool):
        super().__init__()
        self.cfg = cfg
        # Plain attributes, not buffers: ``model.to(torch.bfloat16)`` must not round them.
        self._window = torch.hann_window(
            cfg.win_length, periodic=periodic_window, dtype=torch.float32
        )
        self._filterbank = slaney_mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return feature_lengths(self.cfg, lengths)

    def _check_input(self, audio: torch.Tensor, lengths: torch.Tensor) -> None:
        """Mono ``[batch, samples]`` audio, valid lengths; window and filterbank on its device."""
        if audio.dim() != 2:
            raise ValueError(
                f"audio must be mono [batch, samples]; got shape {list(audio.shape)} "
                "(mix channels down and resample before the features)"
            )
        check_lengths("audio_lengths", lengths, audio.size(0), audio.size(1))
        if self._window.device != audio.device:  # moved once, on first use
            self._window = self._window.to(audio.device)
            self._filterbank = self._filterbank.to(audio.device)


class LogMelFeatures(MelFrontEnd):
    """``(audio [b, n_samples], lengths [b]) -> (features [b, n_mels, t], frames [b])``.

    Mono audio at ``cfg.sample_rate`` (the module cannot tell another rate; resample first).
    Computed in float32 whatever the input dtype, the module's dtype or autocast. Dither (training
    only) is the one random step.
    """

    def __init__(self, cfg: FeatureConfig):
        super().__init__(cfg, periodic_window=False)

    def forward(
        self, audio: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_input(audio, lengths)
        cfg = self.cfg
        with torch.autocast(audio.device.type, enabled=False):
            x = audio.float()  # [b, n]
            if self.training and cfg.dither > 0:
                x = x + cfg.dither * torch.randn_like(x)
            if cfg.preemph is not None:
                x = torch.cat([x[:, :1], x[:, 1:] - cfg.preemph * x[:, :-1]], dim=1)
            x = x.masked_fill(~valid_mask(lengths, x.size(1)), 0.0)
            spectrum = torch.stft(
                x,
                n_fft=cfg.n_fft,
                hop_length=cfg.hop_length,
                win_length=cfg.win_length,
                window=self._window,
                center=True,
                pad_mode="constant",  # zeros, as the padding of a batch: padding cannot leak
                return_complex=True,
            )  # [b, n_fft // 2 + 1, t]
            power = torch.view_as_real(spectrum).pow(2).sum(-1)
            mel = self._filterbank @ power
            features = torch.log(mel + cfg.log_zero_guard)  # [b, n_mels, t]
            frames = feature_lengths(cfg, lengths)
            valid = valid_mask(frames, features.size(-1))[:, None, :]  # [b, 1, t]
            if cfg.normalize == "per_feature":
                features = normalize_per_feature(features, frames, valid)
            return features.masked_fill(~valid, 0.0), frames


def normalize_per_feature(
    features: torch.Tensor, frames: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Zero mean, unit (unbiased) std per utterance and mel bin, over the valid frames only.

    As NeMo: one valid frame gives std 0, and the guard keeps the division finite.
    """
    count = frames[:, None, None].to(features.dtype)  # [b, 1, 1]
    mean = features.masked_fill(~valid, 0.0).sum(-1, keepdim=True) / count.clamp(min=1)
    centred = (features - mean).masked_fill(~valid, 0.0)
    variance = centred.pow(2).sum(-1, keepdim=True) / (count - 1).clamp(min=1)
    return (features - mean) / (variance.sqrt() + _STD_GUARD)
