"""``salm convert hf-whisper-encoder``: the encoder of a local Hugging Face Whisper folder, as ours.

The folder holds ``config.json`` (``model_type: whisper``) and the weights of a
``WhisperForConditionalGeneration``, ``WhisperModel`` or ``WhisperEncoder``: ``model.safetensors``,
sharded safetensors with ``model.safetensors.index.json``, or ``pytorch_model.bin`` (read with
``torch.load(weights_only=True)``). Only the encoder's tensors are read; the decoder is dropped.
``preprocessor_config.json``, when present, gives the front end's settings.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from salm_megatron.audio.whisper import hf_state_dict_to_ours
from salm_megatron.config import ConfigError, EncoderConfig, encoder_from_dict
from salm_megatron.convert.encoder_checkpoint import run_cli, write_encoder

log = logging.getLogger("salm.convert")

ENCODER_PREFIXES = ("model.encoder.", "encoder.")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object")
    return data


def encoder_config_from_hf(folder: Path) -> EncoderConfig:
    """Our encoder config from ``config.json`` (and ``preprocessor_config.json`` if there)."""
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (not a Hugging Face model folder)")
    hf = _read_json(path)
    if hf.get("model_type") != "whisper":
        raise ConfigError(f"{path}: model_type={hf.get('model_type')!r} is not 'whisper'")
    extractor_path = folder / "preprocessor_config.json"
    extractor = _read_json(extractor_path) if extractor_path.is_file() else None
    return whisper_encoder_config(hf, path, extractor, extractor_path)


def whisper_encoder_config(
    hf: dict[str, Any],
    path: Path,
    extractor: dict[str, Any] | None = None,
    extractor_path: Path | None = None,
    **overrides: Any,
) -> EncoderConfig:
    """Our encoder config from a Whisper encoder's config (``path``'s, or the ``audio_config``
    in it) and its feature extractor's (``preprocessor_config.json``), with ``overrides``."""

    def need(key: str, default: Any, ok, supported: str) -> Any:
        value = hf.get(key, default)
        if not ok(value):
            raise ConfigError(f"{path}: {key}={value!r} is not supported ({supported})")
        return value

    need("activation_function", "gelu", lambda v: v == "gelu", "only 'gelu'")
    d_model = hf.get("d_model", 384)
    ffn = hf.get("encoder_ffn_dim", 1536)
    need("encoder_ffn_dim", ffn, lambda v: v % d_model == 0, f"a multiple of d_model={d_model}")
    for key in ("activation_dropout", "encoder_layerdrop"):
        if hf.get(key):
            log.warning("%s: %s=%s (training only) is not used", path, key, hf[key])
    n_mels = hf.get("num_mel_bins", 80)
    features = dict(
        sample_rate=16000,
        n_mels=n_mels,
        n_fft=400,
        window_size=0.025,
        window_stride=0.01,
        preemph=None,
        normalize=None,
    )
    if extractor is not None:
        if extractor.get("feature_size", n_mels) != n_mels:
            raise ConfigError(
                f"{extractor_path}: feature_size={extractor['feature_size']} differs from "
                f"num_mel_bins={n_mels} in {path}"
            )
        rate = extractor.get("sampling_rate", 16000)
        if rate != 16000:  # its mel filters stop at 8 kHz, half of 16 kHz
            raise ConfigError(f"{extractor_path}: sampling_rate={rate} is not supported (16000)")
        n_fft = extractor.get("n_fft", 400)
        features.update(
            sample_rate=rate,
            n_fft=n_fft,
            window_size=n_fft / rate,
            window_stride=extractor.get("hop_length", 160) / rate,
            dither=float(extractor.get("dither", 0.0)),
        )
    encoder = dict(
        type="whisper",
        d_model=d_model,
        num_layers=hf.get("encoder_layers", 4),
        num_heads=hf.get("encoder_attention_heads", 6),
        ff_expansion_factor=ffn // d_model,
        subsampling_factor=2,
        dropout=float(hf.get("dropout", 0.0)),
        dropout_att=float(hf.get("attention_dropout", 0.0)),
        max_source_positions=hf.get("max_source_positions", 1500),
        features=features,
    )
    for key, value in overrides.items():
        encoder[key] = dict(encoder[key], **value) if isinstance(value, dict) else value
    try:
        return encoder_from_dict(encoder)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        return [folder / name for name in shards]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name]
    raise FileNotFoundError(
        f"{folder} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin"
    )


def read_encoder_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The encoder's tensors of a Whisper checkpoint, in our names (others are not loaded)."""
    state: dict[str, torch.Tensor] = {}
    skipped = 0
    for file in _weight_files(folder):
        if not file.is_file():
            raise FileNotFoundError(f"{file} (listed in the safetensors index) does not exist")
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as f:
                keys = list(f.keys())
                wanted = [k for k in keys if not k.startswith(("model.decoder.", "decoder."))]
                wanted = [k for k in wanted if k != "proj_out.weight"]
                state.update({k: f.get_tensor(k) for k in wanted})
                skipped += len(keys) - len(wanted)
        else:
            loaded = torch.load(file, map_location="cpu", weights_only=True)
            if not isinstance(loaded, dict):
                raise ValueError(f"{file} is not a state dict")
            state.update(loaded)
    ours = hf_state_dict_to_ours(state)
    skipped += len(state) - len(ours)
    log.info("dropped %d tensors that are not the encoder's (decoder, output projection)", skipped)
    return ours


def convert(hf: str | Path, out: str | Path) -> EncoderConfig:
    """Write the encoder of Whisper folder ``hf`` to ``out`` (dist checkpoint + encoder.yaml)."""
    folder = Path(hf)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    cfg = encoder_config_from_hf(folder)
    write_encoder(cfg, read_encoder_weights(folder), out, str(folder))
    return cfg


EXAMPLE = """example:
  huggingface-cli download openai/whisper-large-v3 --local-dir whisper-large-v3
  salm convert hf-whisper-encoder --hf whisper-large-v3 --out encoders/whisper-large-v3
  salm train run.yaml checkpoint.pretrained_encoder=encoders/whisper-large-v3

writes OUT/ (a dist checkpoint of the encoder, for checkpoint.pretrained_encoder) and
OUT/encoder.yaml (the encoder: section to put in the run config: type whisper, sizes, front end).
"""


def main(argv: list[str] | None = None) -> int:
    return run_cli(
        argv,
        "salm convert hf-whisper-encoder",
        "The encoder of a local Hugging Face Whisper model folder, as ours.",
        ("--hf", "a Whisper folder: config.json + weights"),
        convert,
        EXAMPLE,
    )


if __name__ == "__main__":
    sys.exit(main())
