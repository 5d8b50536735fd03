"""Check our log-mel features and FastConformer against NeMo's own modules (the reference).

Builds NeMo's ``AudioToMelSpectrogramPreprocessor`` (dither 0, pad_to 0) and ``ConformerEncoder``
(dw_striding, rel_pos) with random weights in eval mode, loads NeMo's weights into ours through
``nemo_state_dict_to_ours``, runs both on the same audio (a padded batch of utterances of
different lengths: espeak-ng speech when it is installed, else chirps, tones and noise with
digital silence) and prints the largest errors over the valid frames. Exits 1 above tolerance.

NeMo is not a dependency of this project; run this where ``nemo-toolkit[asr]`` is installed:

    python tools/check_nemo_reference.py                  # tiny (3 variants) and large
    python tools/check_nemo_reference.py --sizes tiny xl  # also: xl (about 5 GB of memory)
"""

from __future__ import annotations

import argparse
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from salm_megatron.audio import FastConformerEncoder, LogMelFeatures, nemo_state_dict_to_ours
from salm_megatron.config import EncoderConfig, encoder_preset

FEATURE_TOLERANCE = 1e-4  # max abs error; features are normalised (unit std per mel bin)
ENCODER_TOLERANCE = 1e-4  # max abs error; outputs come out of a LayerNorm

CASES = {
    "tiny": lambda: encoder_preset("tiny"),
    "tiny-context": lambda: encoder_preset("tiny", att_context_size=[4, 1]),
    "tiny-variants": lambda: encoder_preset(
        "tiny",
        use_bias=False,
        conv_norm_type="layer_norm",
        xscaling=False,
        features=dict(n_mels=128),
    ),
    "large": lambda: encoder_preset("fastconformer-large"),
    "xl": lambda: encoder_preset("fastconformer-xl"),
}

SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Speech models read log mel features.",
    "Hello.",
)


def nemo_preprocessor(cfg: EncoderConfig):
    """NeMo's preprocessor with our feature settings, dither and padding off, eval mode."""
    from nemo.collections.asr.modules import AudioToMelSpectrogramPreprocessor

    f = cfg.features
    return AudioToMelSpectrogramPreprocessor(
        sample_rate=f.sample_rate,
        normalize=f.normalize,
        window_size=f.window_size,
        window_stride=f.window_stride,
        window="hann",
        features=f.n_mels,
        n_fft=f.n_fft,
        preemph=f.preemph,
        log=True,
        log_zero_guard_type="add",
        log_zero_guard_value=f.log_zero_guard,
        frame_splicing=1,
        dither=0.0,
        pad_to=0,
        pad_value=0.0,
    ).eval()


def nemo_encoder(cfg: EncoderConfig):
    """NeMo's ConformerEncoder with our shape, eval mode."""
    from nemo.collections.asr.modules import ConformerEncoder

    return ConformerEncoder(
        feat_in=cfg.features.n_mels,
        feat_out=-1,
        n_layers=cfg.num_layers,
        d_model=cfg.d_model,
        subsampling="dw_striding",
        subsampling_factor=cfg.subsampling_factor,
        subsampling_conv_channels=cfg.subsampling_conv_channels,
        causal_downsampling=False,
        ff_expansion_factor=cfg.ff_expansion_factor,
        self_attention_model="rel_pos",
        n_heads=cfg.num_heads,
        att_context_size=list(cfg.att_context_size),
        att_context_style="regular",
        xscaling=cfg.xscaling,
        untie_biases=True,
        conv_kernel_size=cfg.conv_kernel_size,
        conv_norm_type=cfg.conv_norm_type,
        use_bias=cfg.use_bias,
        dropout=cfg.dropout,
        dropout_pre_encoder=cfg.dropout_pre_encoder,
        dropout_emb=cfg.dropout_emb,
        dropout_att=cfg.dropout_att,
    ).eval()


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Make every parameter and BatchNorm statistic matter: NeMo initialises the position biases
    to zero and BatchNorm to the identity, which would hide mistakes in their use."""
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in module.state_dict().items():
        if not tensor.is_floating_point():
            continue
        noise = torch.randn(tensor.shape, generator=generator)
        if name.endswith("running_var"):
            tensor.copy_(0.5 + noise.abs())
        elif tensor.dim() == 1 or "pos_bias" in name:  # norms, biases, BN statistics
            tensor.add_(0.1 * noise)


def espeak_audio(sample_rate: int) -> list[torch.Tensor] | None:
    """A few spoken sentences from espeak-ng (resampled), or None where it is not installed."""
    if shutil.which("espeak-ng") is None:
        return None
    import soundfile
    from scipy.signal import resample_poly

    clips = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, text in enumerate(SENTENCES):
            path = Path(tmp) / f"{i}.wav"
            subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
            audio, rate = soundfile.read(path, dtype="float32")
            gcd = math.gcd(sample_rate, rate)
            audio = resample_poly(audio, sample_rate // gcd, rate // gcd)
            clips.append(torch.tensor(audio, dtype=torch.float32))
    return clips


def synthetic_audio(sample_rate: int, seed: int = 0) -> list[torch.Tensor]:
    """Chirps, harmonic tones, noise and stretches of digital silence, of different lengths."""
    generator = torch.Generator().manual_seed(seed)
    clips = []
    for seconds in (3.37, 2.0, 0.731):
        n = int(seconds * sample_rate)
        t = torch.arange(n, dtype=torch.float64) / sample_rate
        f0 = 100 + 60 * torch.sin(2 * math.pi * 0.7 * t)  # a wobbling pitch
        phase = 2 * math.pi * torch.cumsum(f0, 0) / sample_rate
        voice = sum(torch.sin(k * phase) / k for k in range(1, 20))
        chirp = torch.sin(2 * math.pi * (200 * t + 1500 * t**2))
        noise = torch.randn(n, generator=generator, dtype=torch.float64)
        audio = 0.3 * voice + 0.2 * chirp + 0.02 * noise
        audio[n // 3 : n // 3 + sample_rate // 10] = 0.0  # digital silence (log guard)
        clips.append((0.5 * audio / audio.abs().max()).float())
    return clips


def pad_batch(clips: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(c) for c in clips])
    batch = torch.zeros(len(clips), int(lengths.max()))
    for i, clip in enumerate(clips):
        batch[i, : len(clip)] = clip
    return batch, lengths


def max_errors(
    ours: torch.Tensor, reference: torch.Tensor, lengths: torch.Tensor, time_dim: int
) -> tuple[float, float]:
    """Max abs error and max abs error / max abs reference, over valid frames only."""
    abs_err, scale = 0.0, 0.0
    for i, length in enumerate(lengths.tolist()):
        a = ours[i].narrow(time_dim - 1, 0, length)
        b = reference[i].narrow(time_dim - 1, 0, length)
        abs_err = max(abs_err, (a - b).abs().max().item() if a.numel() else 0.0)
        scale = max(scale, b.abs().max().item() if b.numel() else 0.0)
    return abs_err, abs_err / max(scale, 1e-12)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def check_case(name: str, cfg: EncoderConfig, clips: list[torch.Tensor]) -> dict:
    """Errors of features and encoder for one encoder shape; and the parameter counts."""
    torch.manual_seed(0)
    clips = [*clips, clips[-1][:800]]  # and a 50 ms one: 5 feature frames, 1 encoded frame
    audio, audio_lengths = pad_batch(clips)

    reference_features, reference_frames = nemo_preprocessor(cfg)(
        input_signal=audio, length=audio_lengths
    )
    features, frames = LogMelFeatures(cfg.features).eval()(audio, audio_lengths)
    if not torch.equal(frames, reference_frames):
        raise AssertionError(f"{name}: frames {frames.tolist()} != NeMo's {reference_frames}")
    feature_errors = max_errors(features, reference_features, frames, time_dim=2)

    reference_encoder = nemo_encoder(cfg)
    randomize_(reference_encoder, seed=1)
    encoder = FastConformerEncoder(cfg).eval()
    encoder.load_state_dict(nemo_state_dict_to_ours(reference_encoder.state_dict()), strict=True)
    # Same features into both, to measure the encoder alone.
    reference_encoded, reference_lengths = reference_encoder(
        audio_signal=reference_features, length=reference_frames
    )
    encoded, lengths = encoder(reference_features, reference_frames)
    if not torch.equal(lengths, reference_lengths):
        raise AssertionError(f"{name}: lengths {lengths.tolist()} != NeMo's {reference_lengths}")
    if not torch.equal(encoder.output_lengths(frames), lengths):
        raise AssertionError(f"{name}: output_lengths disagrees with the encoder")
    encoder_errors = max_errors(encoded, reference_encoded.transpose(1, 2), lengths, time_dim=1)
    # Our features through our encoder: the whole audio path against NeMo's.
    end_to_end, _ = encoder(features, frames)
    pipeline_errors = max_errors(end_to_end, reference_encoded.transpose(1, 2), lengths, 1)
    return dict(
        features=feature_errors,
        encoder=encoder_errors,
        pipeline=pipeline_errors,
        parameters=(count(encoder), count(reference_encoder), cfg.num_parameters()),
        utterances=len(clips),
        frames=frames.tolist(),
        encoded=lengths.tolist(),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="example: python tools/check_nemo_reference.py --sizes tiny large --audio synthetic",
    )
    parser.add_argument(
        "--sizes",
        nargs="+",
        choices=list(CASES),
        default=["tiny", "tiny-context", "tiny-variants", "large"],
    )
    parser.add_argument(
        "--audio",
        choices=("auto", "espeak", "synthetic"),
        default="auto",
        help="auto: espeak-ng speech where espeak-ng is installed, else synthetic audio",
    )
    args = parser.parse_args(argv)
    try:
        import nemo.collections.asr  # noqa: F401
    except ImportError as err:
        print(f"NeMo is not importable ({err}); install nemo-toolkit[asr] to run this check.")
        return 2
    torch.set_num_threads(max(1, torch.get_num_threads()))
    failed = False
    for name in args.sizes:
        cfg = CASES[name]()
        rate = cfg.features.sample_rate
        clips = None if args.audio == "synthetic" else espeak_audio(rate)
        if clips is None and args.audio == "espeak":
            print("espeak-ng is not installed (apt-get install espeak-ng)")
            return 2
        source = "espeak-ng speech" if clips else "synthetic audio"
        clips = clips or synthetic_audio(rate)
        result = check_case(name, cfg, clips)
        ours, nemo, formula = result["parameters"]
        print(
            f"{name}: {source}, {result['utterances']} utterances, "
            f"feature frames {result['frames']}, encoded frames {result['encoded']}\n"
            f"  parameters: ours {ours:,}  NeMo {nemo:,}  EncoderConfig.num_parameters {formula:,}"
        )
        for part, tolerance in (
            ("features", FEATURE_TOLERANCE),
            ("encoder", ENCODER_TOLERANCE),
            ("pipeline", ENCODER_TOLERANCE),
        ):
            abs_err, rel_err = result[part]
            ok = abs_err <= tolerance
            failed |= not ok
            print(
                f"  {part:9s} max abs error {abs_err:.2e}  relative to max {rel_err:.2e}  "
                f"(tolerance {tolerance:.0e}) {'ok' if ok else 'FAIL'}"
            )
        if not ours == nemo == formula:
            print("  parameter counts differ: FAIL")
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
