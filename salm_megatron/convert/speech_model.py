"""A whole speech model <-> one portable folder: ``salm export`` and ``salm import``.

``salm export`` turns a training checkpoint (SALM or BESTOW, any TP/PP layout) into::

    config.json, model.safetensors   the LLM as Hugging Face writes it (LoRA merged), which
                                     AutoModelForCausalLM loads on its own (``mcore-to-hf``)
    speech.safetensors               every other tensor of the model: encoder (BatchNorm running
                                     statistics included), adapter, BESTOW block, CTC head; and
                                     the LLM's padded vocabulary rows, which Hugging Face has no
                                     place for (``llm_vocab_padding.*``)
    speech_config.json               the config sections that build the rest: model, encoder,
                                     adapter, bestow, decode, lora (off), the data facts decoding
                                     needs (prompt format, tokenizer file, durations), precision,
                                     and the llm.* settings config.json does not carry
    tokenizer files                  the run's data.tokenizer, whose BOS/EOS/PAD ids config.json
                                     and generation_config.json carry

``salm import`` reverses it into a folder that is itself a training-format checkpoint holding the
whole model's weights (no optimizer, no data state) with ``config.yaml`` and the tokenizer beside:
``salm eval`` / ``salm transcribe --checkpoint`` take it as they take a step folder, and a new run
starts from it with ``checkpoint.pretrained_model`` (at any TP/PP; resuming needs optimizer and
data-stream state an exported model no longer has). Export then import gives back every tensor
bitwise. An imported folder may come from elsewhere: the names it gives (data.tokenizer, shards)
must be plain names inside it, and a symbolic link in it is refused.

On export the LLM is read a layer at a time by ``hf_llm`` (built whole, in its stored dtype, only
to merge LoRA); the speech parts are read whole without it. Import builds the whole model once,
at TP=PP=1.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
import yaml
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.transformer.utils import sharded_state_dict_default
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint import FileSystemReader

from ..config import Config, ConfigError, config_from_dict
from ..data.tokenizers import load_tokenizer
from ..models.audio_path import AudioPath, CTCHead
from ..models.bestow import BestowCrossAttention
from .hf_io import (
    TOKENIZER_FILES,
    ConversionError,
    SafetensorsFolder,
    atomic_folder,
    copy_tokenizer,
    plain_name,
    read_json,
    refuse_links,
)
from .hf_llm import (
    _checkpoint_reader,
    _convert_shards,
    _parser,
    _run,
    mcore_to_hf,
    single_process,
    write_token_ids,
)
from .llm_families import HF_CONFIG_FILE, llm_config_from_hf
from .llm_rules import check_hf_tensors, conversion_rules

log = logging.getLogger("salm.convert")

SPEECH_WEIGHTS = "speech.safetensors"
SPEECH_CONFIG = "speech_config.json"
SPEECH_FORMAT = "salm-megatron-speech/1"
IMPORTED_CONFIG = "config.yaml"
PADDING = "llm_vocab_padding."  # + the LLM tensor whose rows beyond llm.vocab_size these are
VOCAB_TENSORS = ("embedding.word_embeddings.weight", "output_layer.weight")
# Config sections a speech model needs besides the LLM (whole), and the data facts decoding needs.
SECTIONS = ("model", "encoder", "adapter", "bestow", "lora", "decode")
DATA_FIELDS = ("prompt_format", "chat_template_kwargs", "min_duration", "max_duration")


class SpeechParts(torch.nn.Module):
    """The non-LLM modules of a speech model, under the names ``SpeechLLM`` gives them (so
    their state-dict and checkpoint keys are the model's): built without the LLM."""

    def __init__(self, cfg: Config, dtype: torch.dtype):
        super().__init__()
        self.audio = AudioPath(cfg, dtype)  # fp32 weights, as in training
        if cfg.model.ctc_weight:
            self.ctc = CTCHead(cfg.encoder.d_model, cfg.model.ctc_vocab_size or cfg.llm.vocab_size)
        if cfg.model.arch == "bestow":
            self.cross_attention = BestowCrossAttention(cfg.llm.hidden_size, cfg.bestow).to(dtype)


def _tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}


# ---------------------------------------------------------------------------------- export


def export_speech_model(
    checkpoint: str | Path, out: str | Path, tokenizer: str | Path | None = None
) -> Path:
    """Write the model of training checkpoint ``checkpoint`` as the folder ``out`` (see the
    module docstring); ``tokenizer`` replaces the checkpoint's data.tokenizer."""
    from ..inference import loading

    out = Path(out)
    found = loading.find_checkpoint(checkpoint)
    cfg = loading.saved_config(found)
    tokenizer = Path(tokenizer or cfg.data.tokenizer or "")
    if not tokenizer.name or not tokenizer.exists():
        raise ConversionError(
            f"the tokenizer {str(tokenizer) or '(none)'} of {found} (data.tokenizer) does not "
            "exist; pass --tokenizer"
        )
    with atomic_folder(out) as tmp, single_process():
        mcore_to_hf(found, tmp / "llm")  # the LLM, LoRA merged, and the tokenizer
        for entry in (tmp / "llm").iterdir():
            os.replace(entry, tmp / entry.name)
        (tmp / "llm").rmdir()
        tensors = _tensors(_load_speech_parts(cfg, found))
        tensors.update(_vocab_padding(cfg, found))
        save_file(tensors, tmp / SPEECH_WEIGHTS, metadata={"format": "pt"})
        name = _copy_tokenizer(tokenizer, tmp)
        # The ids of the tokenizer just copied (mcore_to_hf wrote the config's data.tokenizer's).
        write_token_ids(tmp, load_tokenizer(tokenizer), cfg.data.prompt_format)
        speech = _speech_config(cfg, tmp / HF_CONFIG_FILE, name, found)
        (tmp / SPEECH_CONFIG).write_text(json.dumps(speech, indent=2) + "\n")
    log.info("wrote %s (%s; %d speech tensors)", out, cfg.model.arch, len(tensors))
    return out


def _load_speech_parts(cfg: Config, found: Path) -> SpeechParts:
    """The speech parts' weights from the checkpoint, in its dtype; a frozen encoder it left
    out comes from its ``checkpoint.pretrained_encoder`` (its buffers are in the checkpoint)."""
    from ..training import checkpoint

    saved = FileSystemReader(str(found)).read_metadata().state_dict_metadata
    parts = SpeechParts(cfg, torch.float32)
    with torch.no_grad():  # each tensor in its saved dtype (training keeps the audio path fp32)
        for name, tensor in (*parts.named_parameters(), *parts.named_buffers()):
            if name in saved and tensor.is_floating_point():
                tensor.data = tensor.data.to(saved[name].properties.dtype)
    group = parallel_state.get_tensor_model_parallel_group()
    sharded = sharded_state_dict_default(parts, prefix="", tp_group=group)
    # A frozen encoder's weights may be left out (its buffers are saved); nothing else may be.
    from_pretrained = "audio.encoder." in checkpoint.left_out(found)
    absent = [k for k in sharded if k not in saved]
    unexplained = [k for k in absent if not (from_pretrained and k.startswith("audio.encoder."))]
    if unexplained:
        raise ConversionError(
            f"{found} has no tensor {unexplained[0]}, which its config's {cfg.model.arch} model has"
        )
    if from_pretrained:
        if not cfg.checkpoint.pretrained_encoder:
            raise ConversionError(
                f"{found} left out its frozen encoder, and its config names no "
                "checkpoint.pretrained_encoder to take it from"
            )
        checkpoint.load_pretrained(
            parts.audio.encoder, cfg.checkpoint.pretrained_encoder, "encoder"
        )
    present = {k: v for k, v in sharded.items() if k in saved}
    state = dist_checkpointing.load(present, str(found))  # also gives the common state
    result = parts.load_state_dict({k: state[k] for k in present}, strict=False)
    if set(result.missing_keys) - set(absent) or result.unexpected_keys:
        raise ConversionError(f"{found}: the speech parts did not load ({result})")
    return parts


def _vocab_padding(cfg: Config, found: Path) -> dict[str, torch.Tensor]:
    """The LLM's embedding (and output layer) rows beyond ``llm.vocab_size``; LoRA leaves
    them alone, so they are read from the checkpoint (or its pretrained LLM when left out)."""
    from ..training import checkpoint

    llm = cfg.llm
    if llm.padded_vocab_size == llm.vocab_size:
        return {}
    if "llm." in checkpoint.left_out(found):
        read = _checkpoint_reader(Path(cfg.checkpoint.pretrained_llm), llm, "")
    else:
        read = _checkpoint_reader(found, llm, "llm.")
    names = VOCAB_TENSORS[:1] if llm.tie_embeddings else VOCAB_TENSORS
    return {PADDING + n: t[llm.vocab_size :].clone() for n, t in read(list(names)).items()}


def _copy_tokenizer(tokenizer: Path, dest: Path) -> str:
    """Copy the tokenizer (a file with the known tokenizer files beside it, or a folder);
    returns what ``data.tokenizer`` names inside ``dest``."""
    for stale in TOKENIZER_FILES:  # hf_llm copied the config's tokenizer; this one counts
        (dest / stale).unlink(missing_ok=True)
    if tokenizer.is_dir():
        if not any(n.startswith("tokenizer") for n in copy_tokenizer(tokenizer, dest)):
            raise ConversionError(f"tokenizer folder {tokenizer} holds no tokenizer files")
        return "."
    copy_tokenizer(tokenizer.parent, dest)  # tokenizer.json reads tokenizer_config.json beside
    shutil.copy2(tokenizer, dest / tokenizer.name)
    return tokenizer.name


def _speech_config(cfg: Config, hf_config: Path, tokenizer: str, found: Path) -> dict:
    whole = cfg.to_dict()
    speech = {"format": SPEECH_FORMAT}
    speech.update({section: whole[section] for section in SECTIONS})
    speech["lora"] = dataclasses.asdict(dataclasses.replace(cfg.lora, rank=0))  # merged
    described = llm_config_from_hf(read_json(hf_config), str(hf_config))
    speech["llm"] = {  # what config.json does not say (training settings, overridden values)
        k: v for k, v in whole["llm"].items() if getattr(described, k) != getattr(cfg.llm, k)
    }
    speech["data"] = {k: whole["data"][k] for k in DATA_FIELDS} | {"tokenizer": tokenizer}
    speech["train"] = {"precision": cfg.train.precision}
    common = dist_checkpointing.load_common_state_dict(str(found)).get("common", {})
    speech["exported_from"] = {
        "checkpoint": str(found.resolve()),
        "step": common.get("step"),
        "lora_merged": {"rank": cfg.lora.rank, "alpha": cfg.lora.alpha} if cfg.lora.rank else None,
    }
    return speech


# ---------------------------------------------------------------------------------- import


def read_speech_config(folder: Path, tokenizer_root: Path | None = None) -> tuple[Config, str]:
    """The config of an exported folder (``speech_config.json`` with the LLM of
    ``config.json``), its data.tokenizer under ``tokenizer_root`` (default: ``folder``); and
    the tokenizer's name inside the folder."""
    path = folder / SPEECH_CONFIG
    speech = read_json(path)
    if speech.get("format") != SPEECH_FORMAT:
        raise ConversionError(
            f"{path} has format {speech.get('format')!r}, expected {SPEECH_FORMAT!r} "
            "(written by `salm export`)"
        )
    for section in (*SECTIONS, "llm", "data", "train"):
        if not isinstance(speech.get(section), dict):
            raise ConversionError(f"{path} has no {section} section")
    described = llm_config_from_hf(read_json(folder / HF_CONFIG_FILE), str(folder / HF_CONFIG_FILE))
    data = dict(speech["data"])
    name = data.pop("tokenizer", None)
    if name != ".":  # the folder itself, or one file in it
        plain_name(name, f"{path}: data.tokenizer")
    if not (folder / name).exists():
        raise ConversionError(f"{path}: data.tokenizer {name!r} is not in {folder}")
    data["tokenizer"] = str((tokenizer_root or folder) / name)
    try:
        cfg = config_from_dict({
            **{section: speech[section] for section in SECTIONS},
            "llm": dataclasses.asdict(described) | speech["llm"],
            "data": data,
            "train": speech["train"],
        })  # fmt: skip
    except ConfigError as err:
        raise ConversionError(f"{path}: {err}") from None
    return cfg, name


def import_speech_model(hf: str | Path, out: str | Path) -> Path:
    """Build, from the exported folder ``hf``, the checkpoint folder ``out`` (see the module
    docstring)."""
    hf, out = Path(hf), Path(out)
    if not hf.is_dir():
        raise FileNotFoundError(f"exported model folder {hf} does not exist")
    refuse_links(hf)  # what it copies and reads are its own files (names checked where read)
    cfg, name = read_speech_config(hf, out.resolve())
    speech = _read_speech_weights(hf / SPEECH_WEIGHTS, cfg)
    weights = SafetensorsFolder(hf)
    rules = [rule for group in conversion_rules(cfg.llm) for rule in group]
    check_hf_tensors(weights.names_and_shapes(), rules, cfg.llm, hf)
    return write_imported(hf, out, cfg, weights, rules, speech, [name] if name != "." else [])


def write_imported(
    hf: Path,
    out: Path,
    cfg: Config,
    weights: SafetensorsFolder,
    rules: list,
    speech: dict[str, torch.Tensor],
    files: list[str] = (),
) -> Path:
    """The checkpoint folder ``out`` of the model ``cfg`` describes: its LLM from ``weights``
    by ``rules``, every other tensor from ``speech``; the tokenizer files of ``hf`` and its
    ``files`` copied beside."""
    from ..inference import loading
    from ..models import build_speech_llm
    from ..training import checkpoint

    with atomic_folder(out) as tmp, single_process():
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=tmp))
        llm = _convert_shards(weights, rules, staging)
        dtype = llm[rules[0].megatron].dtype
        (model,) = build_speech_llm(loading.generation_config(cfg, 1, []), params_dtype=dtype)
        _fill(model, llm, speech, cfg, hf)
        del llm
        shutil.rmtree(staging)
        scratch = tmp / ".checkpoints"
        common = {"config": cfg.to_dict(), "step": 0, "imported_from": str(hf.resolve())}
        step = checkpoint.save(scratch, 0, [model], None, common, {}, None)
        for entry in step.iterdir():  # the checkpoint is the folder itself
            os.replace(entry, tmp / entry.name)
        shutil.rmtree(scratch)
        copy_tokenizer(hf, tmp)
        for name in files:
            shutil.copy2(hf / name, tmp / name)
        header = f"# Imported from {hf} by `salm import`; its weights are this folder.\n"
        (tmp / IMPORTED_CONFIG).write_text(header + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    log.info("wrote %s (%s)", out, cfg.model.arch)
    return out


def _read_speech_weights(path: Path, cfg: Config) -> dict[str, torch.Tensor]:
    """``speech.safetensors``, checked against the model ``cfg`` describes: every tensor there
    with its shape, nothing else."""
    if not path.is_file():
        raise ConversionError(f"{path} does not exist")
    expected = {k: tuple(v.shape) for k, v in _tensors(SpeechParts(cfg, torch.float32)).items()}
    llm = cfg.llm
    if llm.padded_vocab_size > llm.vocab_size:
        rows = (llm.padded_vocab_size - llm.vocab_size, llm.hidden_size)
        names = VOCAB_TENSORS[:1] if llm.tie_embeddings else VOCAB_TENSORS
        padding = {PADDING + n: rows for n in names}
    else:
        padding = {}
    with safe_open(path, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    for name, shape in expected.items():
        if name not in tensors:
            raise ConversionError(
                f"{path}: tensor {name} is missing (the {cfg.model.arch} model of "
                f"{SPEECH_CONFIG} has it, shape {list(shape)})"
            )
    for name, tensor in tensors.items():
        shape = expected.get(name, padding.get(name))
        if shape is None:
            raise ConversionError(
                f"{path}: unexpected tensor {name} (not in the {cfg.model.arch} model "
                f"{SPEECH_CONFIG} describes)"
            )
        if tuple(tensor.shape) != shape:
            raise ConversionError(
                f"{path}: tensor {name} has shape {list(tensor.shape)}, the model of "
                f"{SPEECH_CONFIG} expects {list(shape)}"
            )
    for name in padding.keys() - tensors.keys():
        log.info("%s has no %s: the padded vocabulary rows start at zero", path, name)
    return tensors


@torch.no_grad()
def _fill(model, llm: dict, speech: dict, cfg: Config, hf: Path) -> None:
    """Every tensor of ``model`` from the converted LLM, its padding rows and the speech
    tensors; one left unset is an error (nothing keeps its random initialisation)."""
    state = _tensors(model)
    unset = set(state)
    for name, tensor in llm.items():
        state["llm." + name].copy_(tensor)
        unset.discard("llm." + name)
    vocab = cfg.llm.vocab_size
    for name, tensor in speech.items():
        if name.startswith(PADDING):
            state["llm." + name.removeprefix(PADDING)][vocab:].copy_(tensor)
            continue
        target = state[name]
        if tensor.dtype != target.dtype:
            log.warning("%s: %s is %s, the model %s: cast", hf, name, tensor.dtype, target.dtype)
        target.copy_(tensor)
        unset.discard(name)
    if unset:
        raise ConversionError(f"{hf} gives no value for the model's tensor {sorted(unset)[0]}")


# ------------------------------------------------------------------------------------ commands


EXPORT_EXAMPLE = """example:
  salm export --checkpoint runs/salm --out exported/salm
  salm export --checkpoint runs/bestow/checkpoints/step_0002000 --out exported/bestow-2k

writes the LLM as a Hugging Face folder (config.json, model.safetensors, tokenizer; LoRA merged)
plus speech.safetensors (encoder, adapter, BESTOW block, CTC head) and speech_config.json.
  salm export --format qwen2-audio runs/q2a --out hf/q2a   # Qwen2AudioForConditionalGeneration
"""

IMPORT_EXAMPLE = """example:
  salm import --hf exported/salm --out ckpt/salm
  salm transcribe --checkpoint ckpt/salm call.wav
  salm train run.yaml checkpoint.pretrained_model=ckpt/salm     # fine-tune from it

writes a checkpoint folder with the whole model's weights (any TP/PP loads it), its config.yaml
and the tokenizer.
  salm import --format qwen2-audio Qwen2-Audio-7B-Instruct --out ckpt/q2a   # a hub folder
"""
FORMATS = ("salm", "qwen2-audio")  # salm: this module's folder; qwen2-audio: convert/qwen2_audio


def export_main(argv: list[str]) -> int:
    parser = _parser(
        "salm export",
        "A speech model's training checkpoint -> Hugging Face LLM folder + speech.safetensors "
        "+ speech_config.json + tokenizer.",
        EXPORT_EXAMPLE,
    )
    parser.add_argument("source", nargs="?", metavar="CHECKPOINT", help="as --checkpoint")
    parser.add_argument("--checkpoint", help="a run folder, its checkpoints/, or one step_N folder")
    parser.add_argument("--out", required=True, help="new output folder")
    parser.add_argument("--tokenizer", help="instead of the checkpoint's data.tokenizer")
    _format_argument(parser)
    args = parser.parse_args(argv)
    checkpoint = _one_source(parser, args.source, args.checkpoint, "--checkpoint")
    if args.format == "qwen2-audio":
        from .qwen2_audio import export_qwen2_audio as export
    else:
        export = export_speech_model
    return _run(parser.prog, lambda: export(checkpoint, args.out, args.tokenizer))


def import_main(argv: list[str]) -> int:
    parser = _parser(
        "salm import",
        "A folder from `salm export` -> checkpoint folder for salm eval / transcribe and "
        "checkpoint.pretrained_model.",
        IMPORT_EXAMPLE,
    )
    parser.add_argument("source", nargs="?", metavar="DIR", help="as --hf")
    parser.add_argument("--hf", help="folder written by `salm export` (or a Qwen2-Audio folder)")
    parser.add_argument("--out", required=True, help="new output folder")
    _format_argument(parser)
    args = parser.parse_args(argv)
    folder = _one_source(parser, args.source, args.hf, "--hf")
    if args.format == "qwen2-audio":
        from .qwen2_audio import import_qwen2_audio as convert
    else:
        convert = import_speech_model
    return _run(parser.prog, lambda: convert(folder, args.out))


def _format_argument(parser) -> None:
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="salm",
        help="salm (default): our folder (speech.safetensors + speech_config.json); qwen2-audio: "
        "Hugging Face's Qwen2AudioForConditionalGeneration",
    )


def _one_source(parser, positional: str | None, flag: str | None, name: str) -> str:
    if (positional is None) == (flag is None):
        parser.error(f"give the input folder once: as {name} or as the positional argument")
    return positional or flag


__all__ = [
    "SpeechParts",
    "export_main",
    "export_speech_model",
    "import_main",
    "import_speech_model",
    "read_speech_config",
    "write_imported",
]
