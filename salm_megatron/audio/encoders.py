"""The front end and encoder that ``encoder.type`` names: NeMo's FastConformer or Whisper's.

Both encoders take ``(features [b, n_mels, t], lengths [b])`` and return
``(encoded [b, t', d_model], lengths' [b])``, with ``d_model``, ``n_mels`` and ``output_lengths``
attributes, so the adapters and speech models work with either.
"""

from __future__ import annotations

from torch import nn

from salm_megatron.audio.fastconformer import FastConformerEncoder
from salm_megatron.audio.features import LogMelFeatures
from salm_megatron.audio.whisper import WhisperEncoder, WhisperLogMel
from salm_megatron.config import EncoderConfig


def build_features(cfg: EncoderConfig) -> nn.Module:
    """The log-mel front end the encoder was trained with."""
    return WhisperLogMel(cfg.features) if cfg.type == "whisper" else LogMelFeatures(cfg.features)


def build_encoder(cfg: EncoderConfig) -> nn.Module:
    return WhisperEncoder(cfg) if cfg.type == "whisper" else FastConformerEncoder(cfg)
