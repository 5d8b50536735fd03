"""Whisper encoder type: padded batch = utterances alone, 50 Hz lengths, checks, SALM runs it."""

from __future__ import annotations

import pytest
import torch

from salm_megatron.audio import WhisperEncoder, WhisperLogMel, build_encoder, build_features
from salm_megatron.audio.whisper import sinusoids
from salm_megatron.config import (
    AdapterConfig,
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    apply_overrides,
    encoder_preset,
)
from salm_megatron.data import collate
from salm_megatron.models import build_speech_llm
from salm_megatron.models.audio_path import AudioPath
from salm_megatron.models.speech_llm import embedding_lengths
from tests.speech_fixtures import AUDIO_TOKEN, speech_samples, wake_zero_outputs, waveform


def tiny(**overrides):
    return encoder_preset("tiny-whisper", **overrides)


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Noise on the norms and biases, which start at 1 and 0 and would hide mistakes."""
    g = torch.Generator().manual_seed(seed)
    for tensor in module.parameters():
        if tensor.dim() == 1:
            tensor.add_(0.1 * torch.randn(tensor.shape, generator=g))


@torch.no_grad()
def test_padded_batch_equals_each_utterance_alone():
    torch.manual_seed(0)
    cfg = tiny()
    features, encoder = WhisperLogMel(cfg.features).eval(), WhisperEncoder(cfg).eval()
    randomize_(encoder, 1)
    clips = [waveform(s, seed=i) for i, s in enumerate((1.23, 0.5, 0.017, 0.9))]
    lengths = torch.tensor([len(c) for c in clips])
    batch = torch.zeros(len(clips), int(lengths.max()) + 480)  # more padding than needed
    for i, clip in enumerate(clips):
        batch[i, : len(clip)] = clip
    feats, frames = features(batch, lengths)
    encoded, out_lengths = encoder(feats, frames)
    assert frames.tolist() == (lengths // 160).tolist() == [123, 50, 1, 90]
    assert out_lengths.tolist() == [62, 25, 1, 45]  # 50 frames per second
    assert torch.equal(encoder.output_lengths(frames), out_lengths)
    for i, clip in enumerate(clips):
        alone_feats, alone_frames = features(clip[None], lengths[i : i + 1])
        alone, alone_lengths = encoder(alone_feats, alone_frames)
        n, m = int(frames[i]), int(out_lengths[i])
        assert alone_feats.shape[-1] == n and alone.shape[1] == m == int(alone_lengths)
        torch.testing.assert_close(feats[i, :, :n], alone_feats[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(encoded[i, :m], alone[0], rtol=0, atol=1e-5)
        assert not feats[i, :, n:].any() and not encoded[i, m:].any()  # padding stays zero


def test_positions_are_whisper_sinusoids_and_a_loaded_buffer():
    table = sinusoids(1500, 64)
    assert table.shape == (1500, 64)
    torch.testing.assert_close(table[0], torch.cat([torch.zeros(32), torch.ones(32)]))
    # Channel 0 turns once per 2 pi positions, the last sine channel 10000 times slower.
    torch.testing.assert_close(table[7, 0], torch.tensor(7.0).sin())
    torch.testing.assert_close(table[7, 31], torch.tensor(7.0 / 10000).sin())
    encoder = WhisperEncoder(tiny())
    assert "embed_positions" in encoder.state_dict()
    assert "embed_positions" not in dict(encoder.named_parameters())  # fixed, as in Whisper
    assert sum(p.numel() for p in encoder.parameters()) == tiny().num_parameters()
    whisper_large = encoder_preset("whisper-large-v3")
    assert 630e6 < whisper_large.num_parameters() < 640e6  # OpenAI: 637M with positions


@torch.no_grad()
def test_input_beyond_the_position_table_is_refused():
    encoder = WhisperEncoder(tiny(max_source_positions=10)).eval()
    encoder(torch.zeros(1, 80, 20), torch.tensor([20]))  # 10 frames: fits
    with pytest.raises(ValueError, match=r"encoder\.max_source_positions=10.*at most 20 frames"):
        encoder(torch.zeros(1, 80, 21), torch.tensor([21]))
    with pytest.raises(ValueError, match=r"features must be \[batch, 80 mel bins"):
        encoder(torch.zeros(1, 128, 20), torch.tensor([20]))


def test_whisper_settings_are_validated():
    whisper = ["data.max_duration=30", "encoder.preset=tiny-whisper"]
    cfg = apply_overrides(Config(), whisper)
    assert cfg.encoder.type == "whisper" and cfg.encoder.features.preemph is None
    cases = {
        "encoder.type=whisper": "encoder.subsampling_factor=8 must be 2 with encoder.type",
        "encoder.type=wav2vec": "encoder.type='wav2vec' is not one of",
        # The data filter must keep out what the position table cannot hold (30 s).
        "encoder.preset=tiny-whisper": r"data.max_duration=40.0 is longer than .* takes: 30 s",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            apply_overrides(Config(), [override])
    for override, message in {
        "encoder.features.preemph=0.97": "encoder.features.preemph=0.97 must be null",
        "encoder.features.normalize=per_feature": "encoder.features.normalize='per_feature'",
        "encoder.att_context_size=[4, 1]": r"encoder.att_context_size=\[4, 1\] must be",
        "encoder.max_source_positions=0": "encoder.max_source_positions=0 must be a positive",
    }.items():
        with pytest.raises(ConfigError, match=message):
            apply_overrides(Config(), [*whisper, override])


def test_builders_follow_encoder_type():
    assert isinstance(build_features(tiny()), WhisperLogMel)
    assert isinstance(build_encoder(tiny()), WhisperEncoder)
    assert type(build_encoder(encoder_preset("tiny"))).__name__ == "FastConformerEncoder"


def whisper_config(arch: str) -> Config:
    encoder = tiny(spec_augment=dict(freq_masks=0, time_masks=0))
    return Config(
        model=ModelConfig(arch=arch, audio_token_id=AUDIO_TOKEN),
        encoder=encoder,
        adapter=AdapterConfig(type="mlp", stack=4, hidden_size=128),
        data=DataConfig(max_duration=30.0),
    )


def test_audio_path_lengths_match_the_formula():
    cfg = whisper_config("salm")
    audio = AudioPath(cfg, torch.float32).eval()
    lengths = torch.tensor([16000, 8000, 3300])
    with torch.no_grad():
        emb, emb_lengths = audio(torch.randn(3, 16000), lengths)
    # 100 -> 50 -> 13 (stack 4), 50 -> 25 -> 7, 20 -> 10 -> 3
    assert emb_lengths.tolist() == embedding_lengths(cfg, lengths).tolist() == [13, 7, 3]
    assert emb.shape == (3, 13, cfg.llm.hidden_size)


@pytest.mark.parametrize("arch", ["salm", "bestow"])
def test_speech_llm_trains_through_a_whisper_encoder(single_rank, arch):
    torch.manual_seed(0)
    (model,) = build_speech_llm(whisper_config(arch))
    assert isinstance(model.audio.encoder, WhisperEncoder)
    wake_zero_outputs(model)  # BESTOW's zero-initialised projections would block the gradient
    loss = model(collate(speech_samples(arch)))
    loss.sum().backward()
    assert torch.isfinite(loss).all() and loss.sum() > 0
    grad = model.audio.encoder.conv1.weight.grad
    assert grad is not None and grad.abs().sum() > 0
