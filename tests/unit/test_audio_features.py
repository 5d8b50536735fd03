"""Proves log-mel features are NeMo's and padding-proof; SpecAugment masks valid frames only."""

import math

import numpy as np
import pytest
import torch

from salm_megatron.audio import (
    LogMelFeatures,
    SpecAugment,
    feature_lengths,
    slaney_mel_filterbank,
)
from salm_megatron.audio.features import hz_to_mel, mel_to_hz
from salm_megatron.config import ConfigError, FeatureConfig, SpecAugmentConfig
from tests.conftest import nemo_reference


def speechlike(n: int, seed: int) -> torch.Tensor:
    """A harmonic tone with a moving pitch, a chirp and noise, with a stretch of digital silence."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n, dtype=torch.float64) / 16000
    phase = 2 * math.pi * torch.cumsum(120 + 40 * torch.sin(2 * math.pi * t), 0) / 16000
    audio = sum(torch.sin(k * phase) / k for k in range(1, 12)) + torch.sin(
        2 * math.pi * (300 * t + 2000 * t**2)
    )
    audio = 0.2 * audio + 0.01 * torch.randn(n, generator=g, dtype=torch.float64)
    audio[n // 2 : n // 2 + 800] = 0.0
    return audio.float()


def reference_features(audio: np.ndarray, cfg: FeatureConfig, filterbank: np.ndarray) -> np.ndarray:
    """The documented steps, one frame at a time in float64 numpy: [n_mels, frames]."""
    x = np.concatenate([audio[:1], audio[1:] - cfg.preemph * audio[:-1]]).astype(np.float64)
    half = cfg.n_fft // 2
    x = np.pad(x, (half, half))  # centred frames, zeros beyond the audio
    n = np.arange(cfg.win_length)
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * n / (cfg.win_length - 1))  # symmetric Hann
    left = (cfg.n_fft - cfg.win_length) // 2
    window = np.zeros(cfg.n_fft)
    window[left : left + cfg.win_length] = hann
    frames = len(audio) // cfg.hop_length
    columns = []
    for j in range(frames):
        frame = x[j * cfg.hop_length : j * cfg.hop_length + cfg.n_fft] * window
        power = np.abs(np.fft.rfft(frame)) ** 2
        columns.append(np.log(filterbank @ power + cfg.log_zero_guard))
    logmel = np.stack(columns, axis=1)
    mean = logmel.mean(axis=1, keepdims=True)
    std = logmel.std(axis=1, ddof=1, keepdims=True)
    return (logmel - mean) / (std + 1e-5)


# ------------------------------------------------------------------------------ mel filterbank


def test_slaney_mel_scale_at_known_points():
    hz = torch.tensor([0.0, 200.0, 1000.0, 6400.0], dtype=torch.float64)
    # Linear below 1 kHz (3 mels per 200 Hz), then 27 mels per factor 6.4.
    torch.testing.assert_close(
        hz_to_mel(hz), torch.tensor([0.0, 3.0, 15.0, 42.0], dtype=torch.float64)
    )
    grid = torch.linspace(0, 8000, 101, dtype=torch.float64)
    torch.testing.assert_close(mel_to_hz(hz_to_mel(grid)), grid)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_slaney_filterbank_properties(n_mels):
    fb = slaney_mel_filterbank(16000, 512, n_mels).double()
    assert fb.shape == (n_mels, 257) and (fb >= 0).all() and (fb.sum(1) > 0).all()
    assert (fb.argmax(1).diff() >= 0).all()  # peaks ascend
    # Edges evenly spaced in Slaney mels; filter m spans edges m .. m + 2 with height
    # 2 / bandwidth (unit area), so the triangles times bandwidth / 2 add up to exactly 1.
    edges = mel_to_hz(torch.linspace(0, float(hz_to_mel(torch.tensor(8000.0))), n_mels + 2))
    bandwidth = (edges[2:] - edges[:-2]).double()
    bins = torch.linspace(0, 8000, 257)
    inside = (bins >= edges[1]) & (bins <= edges[-2])
    partition = (fb * bandwidth[:, None] / 2).sum(0)
    torch.testing.assert_close(
        partition[inside], torch.ones_like(partition[inside]), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("n_mels", [80, 128])
def test_slaney_filterbank_equals_librosa(n_mels):
    librosa = pytest.importorskip("librosa", reason="librosa is only a reference (not installed)")
    expected = librosa.filters.mel(
        sr=16000, n_fft=512, n_mels=n_mels, fmin=0, fmax=8000, norm="slaney"
    )
    torch.testing.assert_close(
        slaney_mel_filterbank(16000, 512, n_mels), torch.from_numpy(expected), rtol=1e-5, atol=1e-8
    )


# ----------------------------------------------------------------------------------- features


def test_features_equal_an_independent_computation():
    cfg = FeatureConfig()
    audio = speechlike(12345, seed=0)
    features, frames = LogMelFeatures(cfg).eval()(audio[None], torch.tensor([12345]))
    filterbank = slaney_mel_filterbank(16000, 512, 80).double().numpy()
    expected = reference_features(audio.double().numpy(), cfg, filterbank)
    assert frames.tolist() == [12345 // 160]
    assert features.shape == (1, 80, 12345 // 160 + 1)
    np.testing.assert_allclose(features[0, :, : frames[0]].numpy(), expected, atol=1e-4, rtol=0)
    assert (features[0, :, frames[0] :] == 0).all()


def test_padding_never_leaks_into_features():
    extractor = LogMelFeatures(FeatureConfig(n_mels=128)).eval()
    lengths = torch.tensor([16000, 9001, 4321])
    batch = torch.randn(3, 16000)  # loud noise in the padding
    for i, n in enumerate(lengths.tolist()):
        batch[i, :n] = speechlike(n, seed=i)
    features, frames = extractor(batch, lengths)
    assert frames.tolist() == (lengths // 160).tolist()
    for i, n in enumerate(lengths.tolist()):
        alone, alone_frames = extractor(batch[i : i + 1, :n], lengths[i : i + 1])
        valid = int(alone_frames)
        torch.testing.assert_close(features[i, :, :valid], alone[0, :, :valid], atol=1e-5, rtol=0)
        assert (features[i, :, valid:] == 0).all()


def test_features_stay_float32_in_a_bfloat16_model():
    extractor = LogMelFeatures(FeatureConfig()).eval()
    audio, lengths = speechlike(8000, seed=4)[None], torch.tensor([8000])
    expected, _ = extractor(audio, lengths)
    features, _ = extractor.to(torch.bfloat16)(audio.bfloat16(), lengths)
    assert features.dtype == torch.float32
    torch.testing.assert_close(features, extractor(audio.bfloat16().float(), lengths)[0])
    assert not torch.equal(features, expected)  # only the input was rounded


def test_frame_counts_follow_nemo():
    extractor = LogMelFeatures(FeatureConfig())
    lengths = torch.tensor([0, 1, 159, 160, 161, 16000, 16159])
    assert extractor.output_lengths(lengths).tolist() == [0, 0, 0, 1, 1, 100, 100]
    assert torch.equal(feature_lengths(FeatureConfig(), lengths), extractor.output_lengths(lengths))


def test_one_valid_frame_is_finite_and_zero():
    features, frames = LogMelFeatures(FeatureConfig()).eval()(
        torch.randn(1, 200), torch.tensor([200])
    )
    assert frames.tolist() == [1] and torch.isfinite(features).all() and (features == 0).all()


def test_dither_only_in_training():
    extractor = LogMelFeatures(FeatureConfig(dither=1e-3))
    audio, lengths = speechlike(4000, seed=3)[None], torch.tensor([4000])
    extractor.eval()
    torch.testing.assert_close(extractor(audio, lengths)[0], extractor(audio, lengths)[0])
    extractor.train()
    torch.manual_seed(0)
    first = extractor(audio, lengths)[0]
    torch.manual_seed(0)
    assert torch.equal(first, extractor(audio, lengths)[0])
    assert not torch.equal(first, extractor(audio, lengths)[0])


def test_bad_inputs_are_named():
    extractor = LogMelFeatures(FeatureConfig())
    with pytest.raises(ValueError, match="mono"):
        extractor(torch.zeros(2, 2, 1600), torch.tensor([1600, 1600]))
    with pytest.raises(ValueError, match=r"audio_lengths=\[1600, 1700\] must lie in \[0, 1600\]"):
        extractor(torch.zeros(2, 1600), torch.tensor([1600, 1700]))
    with pytest.raises(ValueError, match="must have shape"):
        extractor(torch.zeros(2, 1600), torch.tensor([1600]))


def test_feature_config_is_validated():
    with pytest.raises(ConfigError, match="window_size=0.05 is 800 samples"):
        FeatureConfig(window_size=0.05)
    with pytest.raises(ConfigError, match="normalize='all'"):
        FeatureConfig(normalize="all")
    with pytest.raises(ConfigError, match="preemph=1.5"):
        FeatureConfig(preemph=1.5)
    assert (FeatureConfig().win_length, FeatureConfig().hop_length) == (400, 160)


@pytest.mark.reference
def test_features_equal_nemo():
    reference = nemo_reference()
    from salm_megatron.config import encoder_preset

    for n_mels in (80, 128):
        cfg = encoder_preset("tiny", features=dict(n_mels=n_mels))
        clips = reference.synthetic_audio(16000)
        audio, lengths = reference.pad_batch(clips)
        expected, expected_frames = reference.nemo_preprocessor(cfg)(
            input_signal=audio, length=lengths
        )
        features, frames = LogMelFeatures(cfg.features).eval()(audio, lengths)
        assert torch.equal(frames, expected_frames)
        abs_err, _ = reference.max_errors(features, expected, frames, time_dim=2)
        assert abs_err < 1e-4, f"{n_mels} mels: max abs error {abs_err:.2e} against NeMo"


# -------------------------------------------------------------------------------- SpecAugment


def augment_padded(cfg: SpecAugmentConfig, seed: int):
    torch.manual_seed(seed)
    features = torch.randn(4, 80, 300) + 10  # never 0 by chance
    lengths = torch.tensor([300, 250, 120, 7])
    for i, n in enumerate(lengths.tolist()):
        features[i, :, n:] = 99.0  # padding marker
    module = SpecAugment(cfg).train()
    return features, lengths, module(features, lengths)


def test_specaugment_is_the_identity_in_eval():
    features = torch.randn(2, 80, 50)
    module = SpecAugment(SpecAugmentConfig()).eval()
    assert torch.equal(module(features, torch.tensor([50, 20])), features)


def test_specaugment_masks_only_valid_frames():
    features, lengths, out = augment_padded(SpecAugmentConfig(), seed=0)
    masked = out == 0
    assert masked.any()
    for i, n in enumerate(lengths.tolist()):
        assert torch.equal(out[i, :, n:], features[i, :, n:])  # padding untouched
    assert torch.equal(out[~masked], features[~masked])  # everything else untouched


def test_specaugment_mask_widths():
    # One time mask of at most 5% of each utterance, one frequency mask of at most 10 bins.
    _, lengths, out = augment_padded(SpecAugmentConfig(1, 10, 1, 0.05), seed=1)
    for i, n in enumerate(lengths.tolist()):
        valid = out[i, :, :n] == 0
        rows = valid.all(dim=1).nonzero().flatten()  # masked mel bins (whole rows)
        columns = valid.all(dim=0).nonzero().flatten()  # masked frames
        assert len(rows) <= 10 and (len(rows) == 0 or rows[-1] - rows[0] + 1 == len(rows))
        assert len(columns) <= int(0.05 * n)
        assert len(columns) == 0 or columns[-1] - columns[0] + 1 == len(columns)


def test_specaugment_time_width_in_frames_and_determinism():
    cfg = SpecAugmentConfig(freq_masks=0, time_masks=3, time_width=40)
    _, lengths, first = augment_padded(cfg, seed=5)
    _, _, again = augment_padded(cfg, seed=5)
    _, _, other = augment_padded(cfg, seed=6)
    assert torch.equal(first, again) and not torch.equal(first, other)
    masked_frames = (first == 0).all(dim=1).sum(dim=1)
    assert (masked_frames <= torch.clamp(lengths, max=3 * 40)).all()


def test_specaugment_config_is_validated():
    with pytest.raises(ConfigError, match="time_width=2.5"):
        SpecAugmentConfig(time_width=2.5)
    with pytest.raises(ConfigError, match="freq_masks=-1"):
        SpecAugmentConfig(freq_masks=-1)
