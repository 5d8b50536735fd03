"""Check our Whisper front end and encoder against Hugging Face transformers (the reference).

Builds transformers' ``WhisperFeatureExtractor`` and ``WhisperEncoder`` (random weights, norms and
biases perturbed so each matters) in the shape of an ``encoder_preset``, loads the encoder's
weights into ours through ``hf_state_dict_to_ours`` and prints the largest errors on the same
audio: features on a 30 s padded input (Hugging Face always pads to 30 s), the encoder on the same
features, and the whole path (our features into our encoder). Then shows that without the
padding our features keep the same valid frames. Exits 1 above tolerance.

transformers is not a dependency of this project; run this where it is installed:

    python tools/check_whisper_reference.py                        # tiny-whisper, whisper-small
    python tools/check_whisper_reference.py --sizes whisper-large-v3  # about 6 GB of memory
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from salm_megatron.audio.whisper import WhisperEncoder, WhisperLogMel, hf_state_dict_to_ours
from salm_megatron.config import EncoderConfig, encoder_preset

TOLERANCE = 1e-4  # max abs error; features lie near [-1, 1], encoder outputs leave a LayerNorm
SIZES = ("tiny-whisper", "whisper-small", "whisper-large-v3")
CHUNK_SECONDS = 30


def hf_encoder(cfg: EncoderConfig, seed: int):
    """transformers' WhisperEncoder of this shape, eval mode, every parameter made to matter."""
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder as Reference

    torch.manual_seed(seed)
    config = WhisperConfig(
        d_model=cfg.d_model,
        encoder_layers=cfg.num_layers,
        encoder_attention_heads=cfg.num_heads,
        encoder_ffn_dim=cfg.d_model * cfg.ff_expansion_factor,
        num_mel_bins=cfg.features.n_mels,
        max_source_positions=cfg.max_source_positions,
    )
    encoder = Reference(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in encoder.parameters():
            if tensor.dim() == 1:
                tensor.add_(0.1 * torch.randn(tensor.shape, generator=generator))
    return encoder


def test_audio(sample_rate: int) -> list[torch.Tensor]:
    """Harmonic tones with a drifting pitch, a chirp and noise, a stretch of digital silence."""
    generator = torch.Generator().manual_seed(0)
    clips = []
    for seconds in (7.31, 2.0, 0.5):
        n = int(seconds * sample_rate)
        t = torch.arange(n, dtype=torch.float64) / sample_rate
        phase = 2 * math.pi * torch.cumsum(120 + 50 * torch.sin(2 * math.pi * 0.5 * t), 0)
        voice = sum(torch.sin(k * phase / sample_rate) / k for k in range(1, 15))
        chirp = torch.sin(2 * math.pi * (300 * t + 900 * t**2))
        audio = 0.3 * voice + 0.1 * chirp + 0.01 * torch.randn(n, generator=generator)
        audio[n // 4 : n // 4 + sample_rate // 20] = 0.0
        clips.append((0.5 * audio / audio.abs().max()).float())
    return clips


@torch.no_grad()
def check(name: str) -> dict[str, float]:
    from transformers import WhisperFeatureExtractor

    cfg = encoder_preset(name)
    rate = cfg.features.sample_rate
    clips = test_audio(rate)
    n = CHUNK_SECONDS * rate
    padded = torch.zeros(len(clips), n)
    for i, clip in enumerate(clips):
        padded[i, : len(clip)] = clip
    extractor = WhisperFeatureExtractor(feature_size=cfg.features.n_mels, sampling_rate=rate)
    reference = extractor([c.numpy() for c in clips], sampling_rate=rate, return_tensors="pt")
    reference = reference.input_features
    features_module = WhisperLogMel(cfg.features).eval()
    features, frames = features_module(padded, torch.full((len(clips),), n))

    errors = {"features (30 s)": (features - reference).abs().max().item()}
    lengths = torch.tensor([len(c) for c in clips])
    unpadded, unpadded_frames = features_module(padded[:, : int(lengths.max())], lengths)
    errors["unpadded features vs padded"] = max(
        (unpadded[i, :, :f] - features[i, :, :f]).abs().max().item()
        for i, f in enumerate(unpadded_frames.tolist())
    )

    reference_encoder = hf_encoder(cfg, seed=1)
    encoder = WhisperEncoder(cfg).eval()
    encoder.load_state_dict(hf_state_dict_to_ours(reference_encoder.state_dict()), strict=True)
    expected = reference_encoder(reference).last_hidden_state
    encoded, _ = encoder(reference, frames)
    errors["encoder"] = (encoded - expected).abs().max().item()
    end_to_end, _ = encoder(features, frames)
    errors["pipeline"] = (end_to_end - expected).abs().max().item()
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="example: python tools/check_whisper_reference.py --sizes tiny-whisper",
    )
    parser.add_argument("--sizes", nargs="+", choices=SIZES, default=list(SIZES[:2]))
    args = parser.parse_args(argv)
    try:
        import transformers  # noqa: F401
    except ImportError as err:
        print(f"transformers is not importable ({err}); install it to run this check.")
        return 2
    failed = False
    for name in args.sizes:
        print(f"{name}:")
        for part, error in check(name).items():
            ok = error <= TOLERANCE
            failed |= not ok
            print(f"  {part:28s} max abs error {error:.2e} (tolerance {TOLERANCE:.0e}) "
                  f"{'ok' if ok else 'FAIL'}")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
