"""Hugging Face Qwen2-Audio (``Qwen2AudioForConditionalGeneration``) <-> our SALM:
``salm import --format qwen2-audio`` and ``salm export --format qwen2-audio``.

Qwen2-Audio is Whisper's encoder (its final LayerNorm after an average pooling of 2 frames), a
linear projector with bias, and a Qwen2 LLM; each ``<|AUDIO|>`` of the prompt stands for one
pooled frame. Ours: ``encoder.type: whisper`` with ``final_norm: false`` and
``features.silence_padding: true`` (its processor pads audio to 30 s, so the convolutions read
the log-mel of silence at an utterance's end), ``adapter.type: pool_linear`` (pool 2,
LayerNorm, Linear), SALM with ``<|AUDIO|>`` as the placeholder it expands.

The tensors are one table, :data:`LAYOUT`: a Hugging Face name prefix and ours, first match wins,
every tensor below one is the other's as it is; the LLM's (``language_model.``) go through the
Qwen2 rules of ``llm_rules.py`` (q/k/v fused per query group, gate and up fused, vocabulary
padded). The hub's names are written; transformers 5's in-memory names are read too.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import torch

from ..config import Config, ConfigError, config_from_dict
from ..data.chat import find_template
from ..data.tokenizers import QWEN2_AUDIO_TOKEN, load_tokenizer
from .hf_io import (
    ConversionError,
    SafetensorsFolder,
    ShardedSafetensorsWriter,
    atomic_folder,
    copy_tokenizer,
    read_json,
    refuse_links,
)
from .hf_llm import open_megatron, single_process, write_token_ids
from .llm_families import HF_CONFIG_FILE, hf_config_from_llm, llm_config_from_hf
from .llm_rules import Rule, check_hf_tensors, conversion_rules
from .speech_model import SpeechParts, _load_speech_parts, _tensors, write_imported
from .whisper_encoder import whisper_encoder_config

log = logging.getLogger("salm.convert")

ARCHITECTURE, MODEL_TYPE = "Qwen2AudioForConditionalGeneration", "qwen2_audio"
LLM_PREFIX = "language_model."  # + the Qwen2ForCausalLM names of llm_rules.py
# (Hugging Face name prefix, ours): first match wins; below the prefixes the names are equal.
LAYOUT = (
    ("audio_tower.embed_positions.weight", "audio.encoder.embed_positions"),
    ("audio_tower.layer_norm.", "audio.adapter.norm."),  # after the pooling: our adapter's
    ("multi_modal_projector.linear.", "audio.adapter.proj."),
    ("audio_tower.", "audio.encoder."),
    (LLM_PREFIX, "llm."),  # by the Qwen2 rules
)
# transformers 5's names in memory (what its save_pretrained turns back into the hub's).
ALIASES = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.audio_tower.", "audio_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "chat_template.json")
# Qwen2-Audio's feature extractor: Whisper's, 30 s windows with an attention mask.
EXTRACTOR = {
    "feature_extractor_type": "WhisperFeatureExtractor",
    "chunk_length": 30,
    "hop_length": 160,
    "n_fft": 400,
    "n_samples": 480000,
    "nb_max_frames": 3000,
    "padding_side": "right",
    "padding_value": 0.0,
    "processor_class": "Qwen2AudioProcessor",
    "return_attention_mask": True,
    "sampling_rate": 16000,
}


def hf_name(ours: str) -> str:
    """The Hugging Face name of our speech tensor ``ours`` (by :data:`LAYOUT`)."""
    for theirs, mine in LAYOUT:
        if ours.startswith(mine):
            return theirs + ours[len(mine) :]
    raise ConversionError(f"tensor {ours} has no place in Qwen2-Audio's layout")


def _canonical(name: str) -> str:
    for alias, hub in ALIASES:
        if name.startswith(alias):
            return hub + name[len(alias) :]
    return name


# ------------------------------------------------------------------------------------- config


def config_from_hf(folder: Path) -> Config:
    """Our config for the Qwen2-Audio folder ``folder`` (``config.json``, and the feature
    extractor's ``preprocessor_config.json`` when there); what we cannot reproduce is an error
    naming the file and field."""
    path = folder / HF_CONFIG_FILE
    hf = read_json(path)
    if hf.get("architectures") != [ARCHITECTURE] or hf.get("model_type") != MODEL_TYPE:
        raise ConversionError(
            f"{path}: architectures={hf.get('architectures')} model_type="
            f"{hf.get('model_type')!r} is not Qwen2-Audio ({ARCHITECTURE}, {MODEL_TYPE})"
        )
    audio, text = hf.get("audio_config") or {}, dict(hf.get("text_config") or {})
    if text.get("model_type", "qwen2") != "qwen2":
        raise ConversionError(f"{path}: text_config.model_type={text['model_type']!r} (only qwen2)")
    text.setdefault("model_type", "qwen2")
    text["architectures"] = ["Qwen2ForCausalLM"]
    llm = llm_config_from_hf(text, f"{path}: text_config")
    extractor_path = folder / "preprocessor_config.json"
    extractor = read_json(extractor_path) if extractor_path.is_file() else None
    limit = audio.get("max_source_positions", 1500)
    if limit != 1500:  # its processor pads to 30 s, what 1500 positions hold
        raise ConversionError(
            f"{path}: audio_config.max_source_positions={limit} is not supported (1500: 30 s)"
        )
    try:
        encoder = whisper_encoder_config(
            audio, path, extractor, extractor_path,
            final_norm=False, features={"silence_padding": True},
        )  # fmt: skip
        cfg = config_from_dict({
            "llm": dataclasses.asdict(llm),
            "encoder": dataclasses.asdict(encoder),
            "adapter": {"type": "pool_linear", "stack": 2},
            "model": {"arch": "salm", "audio_token_id": hf.get("audio_token_index", 151646)},
            "data": {
                "tokenizer": str(folder),
                "prompt_format": "chat" if find_template(folder / "tokenizer.json") else "plain",
                "max_duration": 30.0,
            },
        })  # fmt: skip
    except ConfigError as err:
        raise ConversionError(f"{path}: {err}") from None
    tokenizer = load_tokenizer(folder)
    if tokenizer.audio_token_id != cfg.model.audio_token_id:
        raise ConversionError(
            f"{path}: audio_token_index={cfg.model.audio_token_id}, but the tokenizer of {folder} "
            f"has {QWEN2_AUDIO_TOKEN} at {tokenizer.token_id(QWEN2_AUDIO_TOKEN)}"
        )
    return cfg


def hf_config(cfg: Config, dtype: torch.dtype) -> dict:
    """The ``config.json`` of a Qwen2-Audio with ``cfg``'s parts."""
    enc = cfg.encoder
    text = hf_config_from_llm(cfg.llm, dtype)
    del text["architectures"], text["torch_dtype"]
    return {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "audio_config": {
            "model_type": "qwen2_audio_encoder",
            "d_model": enc.d_model,
            "encoder_layers": enc.num_layers,
            "encoder_attention_heads": enc.num_heads,
            "encoder_ffn_dim": enc.d_model * enc.ff_expansion_factor,
            "num_mel_bins": enc.features.n_mels,
            "max_source_positions": enc.max_source_positions,
            "dropout": enc.dropout,
            "attention_dropout": enc.dropout_att,
            "activation_function": "gelu",
        },
        "text_config": text,
        "audio_token_index": cfg.placeholder_id,
        "dtype": str(dtype).removeprefix("torch."),
    }


def check_exportable(cfg: Config, where: Path) -> None:
    """Qwen2-Audio's layout, field by field."""
    enc, features = cfg.encoder, cfg.encoder.features
    wanted = (
        ("model.arch", cfg.model.arch, "salm"),
        ("encoder.type", enc.type, "whisper"),
        ("encoder.final_norm", enc.final_norm, False),
        ("encoder.max_source_positions", enc.max_source_positions, 1500),
        ("encoder.features.sample_rate", features.sample_rate, 16000),
        ("encoder.features.n_fft", features.n_fft, 400),
        ("encoder.features.hop_length", features.hop_length, 160),
        ("adapter.type", cfg.adapter.type, "pool_linear"),
        ("adapter.stack", cfg.adapter.stack, 2),
        ("model.ctc_weight", cfg.model.ctc_weight, 0.0),
    )
    for field, value, needed in wanted:
        if value != needed:
            raise ConversionError(
                f"{where}: {field}={value!r} has no place in Qwen2-Audio (it needs {needed!r})"
            )
    if not features.silence_padding:
        log.warning(
            "%s was trained with encoder.features.silence_padding=false; Qwen2-Audio's processor "
            "pads with silence, so its outputs at an utterance's end will differ", where
        )  # fmt: skip


# ------------------------------------------------------------------------------------- import


def import_qwen2_audio(hf: str | Path, out: str | Path) -> Path:
    """The Qwen2-Audio folder ``hf`` as our checkpoint folder ``out`` (whole model, any TP/PP
    loads it; ``config.yaml``, tokenizer and processor files beside)."""
    hf, out = Path(hf), Path(out)
    if not hf.is_dir():
        raise FileNotFoundError(f"Qwen2-Audio folder {hf} does not exist")
    refuse_links(hf)
    cfg = config_from_hf(hf)
    weights = SafetensorsFolder(hf)
    where = f"{hf} ({', '.join(weights.shards)})"
    found = weights.names_and_shapes()
    spelled = {_canonical(name): name for name in found}  # hub name -> the file's
    shapes = {hub: found[name] for hub, name in spelled.items()}
    llm_rules = [
        dataclasses.replace(rule, hf=tuple(LLM_PREFIX + n for n in rule.hf))
        for group in conversion_rules(cfg.llm)
        for rule in group
    ]
    expected = {k: v.shape for k, v in _tensors(SpeechParts(cfg, torch.float32)).items()}
    speech_rules = [_same(ours, hf_name(ours), tuple(shape)) for ours, shape in expected.items()]
    check_hf_tensors(shapes, llm_rules + speech_rules, cfg.llm, where)
    rules = [  # as the file spells them
        dataclasses.replace(r, hf=tuple(spelled[n] for n in r.hf)) for r in llm_rules
    ]
    speech = {}
    for tensors in weights.read_shards():
        for rule in speech_rules:
            if spelled[rule.hf[0]] in tensors:
                speech[rule.megatron] = tensors[spelled[rule.hf[0]]]
    files = [name for name in PROCESSOR_FILES if (hf / name).is_file()]
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=str(out.resolve())))
    return write_imported(hf, out, cfg, weights, rules, speech, files)


def _same(ours: str, theirs: str, shape: tuple[int, ...]) -> Rule:
    return Rule(ours, (theirs,), (shape,), lambda t: t, lambda t: (t,))


# ------------------------------------------------------------------------------------- export


def export_qwen2_audio(
    checkpoint: str | Path, out: str | Path, tokenizer: str | Path | None = None
) -> Path:
    """The model of training checkpoint ``checkpoint`` (LoRA merged) as a Qwen2-Audio folder
    ``out`` that ``Qwen2AudioForConditionalGeneration.from_pretrained`` and its processor load."""
    from ..inference import loading

    out = Path(out)
    found = loading.find_checkpoint(checkpoint)
    cfg = loading.saved_config(found)
    check_exportable(cfg, found)
    tokenizer = Path(tokenizer or cfg.data.tokenizer or "")
    if not tokenizer.name or not tokenizer.is_dir():
        raise ConversionError(
            f"the tokenizer {str(tokenizer) or '(none)'} of {found} (data.tokenizer) is not a "
            "tokenizer folder; pass --tokenizer"
        )
    with atomic_folder(out) as tmp, single_process():
        writer = ShardedSafetensorsWriter(tmp, 5 * 2**30)
        source = open_megatron(found)
        dtype = None
        for group in conversion_rules(cfg.llm):
            tensors = source.read([rule.megatron for rule in group])
            for rule in group:
                for name, tensor in zip(rule.hf, rule.split(tensors[rule.megatron]), strict=True):
                    dtype = dtype or tensor.dtype
                    writer.add(LLM_PREFIX + name, tensor)
        for name, tensor in _tensors(_load_speech_parts(cfg, found)).items():
            writer.add(hf_name(name), tensor)
        writer.finish()
        (tmp / HF_CONFIG_FILE).write_text(json.dumps(hf_config(cfg, dtype), indent=2) + "\n")
        copy_tokenizer(tokenizer, tmp)
        write_token_ids(tmp, load_tokenizer(tokenizer), cfg.data.prompt_format)
        for name in PROCESSOR_FILES:
            if (tokenizer / name).is_file():
                shutil.copy2(tokenizer / name, tmp / name)
        if not (tmp / "preprocessor_config.json").is_file():
            extractor = EXTRACTOR | {
                "feature_size": cfg.encoder.features.n_mels,
                "dither": cfg.encoder.features.dither,
            }
            (tmp / "preprocessor_config.json").write_text(json.dumps(extractor, indent=2) + "\n")
    log.info("wrote %s (Qwen2-Audio)", out)
    return out


__all__ = ["LAYOUT", "config_from_hf", "export_qwen2_audio", "hf_name", "import_qwen2_audio"]
