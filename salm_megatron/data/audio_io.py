"""Audio in and out: any file soundfile reads -> float32 mono at the models' rate, and FLAC out.

Decoding errors become :class:`AudioError` naming the source, so callers can skip and count a
bad sample instead of crashing. Resampling is polyphase (scipy), exact for integer rate ratios.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import soundfile
import torch
from scipy.signal import resample_poly


class AudioError(ValueError):
    """Audio that cannot be decoded or is empty; the message names where it came from."""


def to_mono(frames: np.ndarray) -> np.ndarray:
    """``[n, channels]`` -> ``[n]`` by averaging the channels."""
    return frames.mean(axis=1) if frames.shape[1] > 1 else frames[:, 0]


def resample(wave: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    if rate == target_rate:
        return wave
    g = math.gcd(rate, target_rate)
    return resample_poly(wave, target_rate // g, rate // g).astype(np.float32)


def decode(
    source: bytes | str | Path,
    target_rate: int = 16000,
    *,
    offset: float = 0.0,
    duration: float | None = None,
    name: str | None = None,
) -> torch.Tensor:
    """Read ``source`` (encoded bytes or a path), optionally the segment ``offset`` +
    ``duration`` seconds, as a 1-D float32 tensor at ``target_rate``, mixed down to mono."""
    where = name or (str(source) if not isinstance(source, bytes) else "audio bytes")
    handle = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with soundfile.SoundFile(handle) as f:
            rate = f.samplerate
            start = round(offset * rate)
            if start > f.frames:
                raise AudioError(
                    f"{where}: offset {offset} s is past the end ({f.frames / rate:.3f} s)"
                )
            f.seek(start)
            count = -1 if duration is None else round(duration * rate)
            frames = f.read(count, dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as err:
        raise AudioError(f"{where}: cannot decode audio ({err})") from err
    if duration is not None and len(frames) < round(duration * rate) - 1:
        raise AudioError(
            f"{where}: segment of {duration} s at {offset} s runs past the end of the audio"
        )
    if len(frames) == 0:
        raise AudioError(f"{where}: no audio samples")
    wave = resample(to_mono(frames), rate, target_rate)
    return torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))


def encode_flac(wave: torch.Tensor | np.ndarray, rate: int = 16000) -> bytes:
    """16-bit FLAC bytes of a 1-D waveform in [-1, 1] (clipped)."""
    data = np.clip(np.asarray(wave, dtype=np.float32), -1.0, 1.0)
    out = io.BytesIO()
    soundfile.write(out, data, rate, format="FLAC", subtype="PCM_16")
    return out.getvalue()
