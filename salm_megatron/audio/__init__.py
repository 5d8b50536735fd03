"""The audio side of the speech models: log-mel features, SpecAugment, encoders, adapters.

Plain PyTorch (no Megatron): these modules live on the first pipeline stage, replicated across
tensor-parallel ranks.
"""

from salm_megatron.audio.adapters import (
    ConformerAdapter,
    LinearAdapter,
    MLPAdapter,
    adapter_output_lengths,
    build_adapter,
    stack_frames,
)
from salm_megatron.audio.encoders import build_encoder, build_features
from salm_megatron.audio.fastconformer import (
    ConformerLayer,
    FastConformerEncoder,
    conv_output_lengths,
    encoder_output_lengths,
    nemo_state_dict_to_ours,
)
from salm_megatron.audio.features import LogMelFeatures, feature_lengths, slaney_mel_filterbank
from salm_megatron.audio.specaugment import SpecAugment
from salm_megatron.audio.whisper import WhisperEncoder, WhisperLogMel

__all__ = [
    "ConformerAdapter",
    "ConformerLayer",
    "FastConformerEncoder",
    "LinearAdapter",
    "LogMelFeatures",
    "MLPAdapter",
    "SpecAugment",
    "WhisperEncoder",
    "WhisperLogMel",
    "adapter_output_lengths",
    "build_adapter",
    "build_encoder",
    "build_features",
    "conv_output_lengths",
    "encoder_output_lengths",
    "feature_lengths",
    "nemo_state_dict_to_ours",
    "slaney_mel_filterbank",
    "stack_frames",
]
