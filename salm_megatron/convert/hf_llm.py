"""Hugging Face Llama / Mistral / Qwen2 / Qwen3 / Qwen3-MoE checkpoints <-> our LLM as a Megatron
dist checkpoint.

``hf-to-mcore`` writes what ``checkpoint.pretrained_llm`` loads at any TP/PP: the GPTModel's keys
(norms under the Transformer Engine names, layers stacked), with ``llm.yaml`` (our llm.* fields),
the source ``config.json`` and the tokenizer beside it. ``mcore-to-hf`` reads such a folder or a
training checkpoint of a speech model (its LLM only) back into a folder transformers loads.

Both stream: HF shards are read one at a time and the converted tensors staged in memory-mapped
files until the single dist-checkpoint save; the export reads the checkpoint a layer at a time.
The families are a table (``llm_families.py``), the tensors rules (``llm_rules.py``). A MoE
layer's experts are one stacked checkpoint tensor, so they load at any expert-parallel size.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import yaml
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
from megatron.core.models.gpt import GPTModel
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from .. import parallel
from ..config import ConfigError, LLMConfig, ParallelConfig, config_from_dict
from ..data.prompts import generation_prompt
from ..data.tokenizers import Tokenizer, load_tokenizer
from ..llm.model import transformer_config
from ..llm.specs import decoder_spec
from .hf_io import (
    ConversionError,
    SafetensorsFolder,
    ShardedSafetensorsWriter,
    atomic_folder,
    copy_tokenizer,
    read_json,
)
from .llm_families import (
    HF_CONFIG_FILE,
    NUMERIC_FIELDS,
    SHAPE_FIELDS,
    family_of,
    hf_config_from_llm,
    llm_config_from_hf,
)
from .llm_rules import Rule, check_hf_tensors, conversion_rules

log = logging.getLogger("salm.convert")

LLM_CONFIG_FILE = "llm.yaml"  # our llm.* fields, beside a converted checkpoint
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_MODELS = ("tokenizer.json", "tokenizer.model")  # what load_tokenizer reads in a folder
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# -------------------------------------------------------------------------------------- config


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def write_llm_config(llm: LLMConfig, path: Path, source: str) -> None:
    moe = ("num_moe_experts", "moe_")  # fields of MoE LLMs only
    fields = [
        name
        for name in SHAPE_FIELDS + NUMERIC_FIELDS
        if (llm.is_moe or not name.startswith(moe)) and (name != "kv_channels" or llm.kv_channels)
    ]
    header = (
        f"# Converted from {source} by `salm convert hf-to-mcore`. Train from it with these\n"
        "# llm.* fields and checkpoint.pretrained_llm (and data.tokenizer) set to this folder.\n"
    )
    body = yaml.safe_dump({"llm": {name: getattr(llm, name) for name in fields}}, sort_keys=False)
    path.write_text(header + body)


def read_llm_config(path: Path) -> LLMConfig:
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data.get("llm"), dict):
        raise ConversionError(f"{path} has no llm: section")
    try:
        return config_from_dict({"llm": data["llm"]}).llm
    except ConfigError as err:
        raise ConversionError(f"{path}: {err}") from None


# --------------------------------------------------------------------- the checkpoint's layout


@contextlib.contextmanager
def single_process() -> Iterator[None]:
    """Megatron's parallel state for this one process (TP=PP=1), unless the caller has it up."""
    if parallel.is_initialized():
        tp = parallel_state.get_tensor_model_parallel_world_size()
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        if (tp, pp) != (1, 1):
            raise ConversionError(f"conversion runs at TP=PP=1; this process has TP={tp} PP={pp}")
    with parallel.single_process():
        yield


def checkpoint_layout(llm: LLMConfig, prefix: str = "") -> dict:
    """GPTModel's sharded state dict at TP=PP=1, built on the meta device (nothing allocated):
    the checkpoint's keys, layer stacking and extra-state objects, exactly as training saves."""
    local = dataclasses.replace(llm, transformer_impl="local", fp8=None, recompute="none")
    config = dataclasses.replace(
        transformer_config(local, ParallelConfig()), use_cpu_initialization=True
    )
    with torch.device("meta"):
        model = GPTModel(
            config=config,
            transformer_layer_spec=decoder_spec(local, config),
            vocab_size=llm.padded_vocab_size,
            max_sequence_length=llm.max_position_embeddings,
            share_embeddings_and_output_weights=llm.tie_embeddings,
            position_embedding_type="rope",
        )
    return model.sharded_state_dict(prefix=prefix)


def _filled(entry, name: str, tensor: torch.Tensor) -> ShardedTensor:
    """``entry`` of the layout holding ``tensor``. SwiGLU's factory (which splits gate and up
    into two views, each copied when saved) becomes one tensor of the same global shape, at the
    same place on the axes stacked in front of it (the layer; an expert's layer and index)."""
    if isinstance(entry, ShardedTensorFactory):
        gate = entry.build()[0]
        stacked = range(gate.prepend_axis_num)
        return ShardedTensor.from_rank_offsets(
            entry.key,
            tensor,
            *((axis, gate.global_offset[axis], gate.global_shape[axis]) for axis in stacked),
            replica_id=entry.replica_id,
            prepend_axis_num=gate.prepend_axis_num,
        )
    if tuple(tensor.shape) != tuple(entry.local_shape):
        raise ConversionError(
            f"tensor {name} has shape {list(tensor.shape)}, the model expects "
            f"{list(entry.local_shape)}"
        )
    return dataclasses.replace(entry, data=tensor, dtype=tensor.dtype)


# ------------------------------------------------------------------------------- HF -> Megatron


def hf_to_mcore(hf_dir: str | Path, out: str | Path, extra_tokens: int | None = None) -> LLMConfig:
    """Convert the Hugging Face folder ``hf_dir`` into the dist checkpoint folder ``out``, with
    ``extra_tokens`` zero embedding rows after the vocabulary (None: the audio placeholder's
    row when the tokenizer and the padded rows have no room for it, else none)."""
    hf_dir, out = Path(hf_dir), Path(out)
    hf_config = read_json(hf_dir / HF_CONFIG_FILE)
    source = llm_config_from_hf(hf_config, str(hf_dir / HF_CONFIG_FILE))
    if extra_tokens is None:
        extra_tokens = placeholder_rows(hf_dir, source)
    if extra_tokens < 0:
        raise ConversionError(f"extra_tokens={extra_tokens} must be >= 0")
    llm = dataclasses.replace(source, vocab_size=source.vocab_size + extra_tokens)
    hf_config["vocab_size"] = llm.vocab_size  # the config.json beside describes what is written
    weights = SafetensorsFolder(hf_dir)
    rules = [rule for group in conversion_rules(llm, source.vocab_size) for rule in group]
    check_hf_tensors(weights.names_and_shapes(), rules, llm, hf_dir)

    with atomic_folder(out) as tmp, single_process():
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
        try:
            converted = _convert_shards(weights, rules, staging)
            layout = checkpoint_layout(llm)
            sharded = {name: _filled(layout[name], name, t) for name, t in converted.items()}
            sharded.update({k: v for k, v in layout.items() if k not in sharded})  # extra state
            log.info("saving the dist checkpoint (%d tensors)", len(converted))
            dist_checkpointing.save(sharded, str(tmp))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        write_llm_config(llm, tmp / LLM_CONFIG_FILE, str(hf_dir))
        (tmp / HF_CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
        copied = copy_tokenizer(hf_dir, tmp)
        if not any(name.startswith("tokenizer") for name in copied):
            log.warning("%s holds no tokenizer files; none copied", hf_dir)
    log.info("wrote %s (%d tensors, %s)", out, len(rules), family_of(llm).name)
    return llm


def placeholder_rows(hf_dir: Path, llm: LLMConfig) -> int:
    """Embedding rows to add so that the audio placeholder of the folder's tokenizer has one:
    none when it is one of the tokenizer's own tokens or falls in the padded rows."""
    if not any((hf_dir / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        log.warning(
            "%s has no tokenizer.json or tokenizer.model: no embedding row added for the audio "
            "placeholder (pass --extra-tokens 1 when the tokenizer has no spare token)",
            hf_dir,
        )
        return 0
    tokenizer = load_tokenizer(hf_dir)
    if tokenizer.audio_token_id < llm.padded_vocab_size:
        return 0
    extra = tokenizer.audio_token_id + 1 - llm.vocab_size
    log.info(
        "the audio placeholder of %s goes at id %d (%s) past the embedding's %d rows: adding %d",
        hf_dir, tokenizer.audio_token_id, tokenizer.audio_token_origin, llm.padded_vocab_size,
        extra,
    )  # fmt: skip
    return extra


def _convert_shards(weights: SafetensorsFolder, rules: list[Rule], staging: Path) -> dict:
    """Megatron tensors from the HF shards, read one shard at a time. Each shard's converted
    tensors go to a staging file and come back memory-mapped, so memory holds about one shard
    (plus the parts of a fused tensor whose other parts are in a later shard)."""
    rule_of = {name: rule for rule in rules for name in rule.hf}
    pending: dict[str, torch.Tensor] = {}
    parts = []
    for k, tensors in enumerate(weights.read_shards()):
        staged = {}
        for name, tensor in tensors.items():
            rule = rule_of.get(name)
            if rule is None:
                continue  # checked to be ignorable
            pending[name] = tensor
            if all(source in pending for source in rule.hf):
                staged[rule.megatron] = rule.join(*(pending.pop(s) for s in rule.hf)).contiguous()
        del tensors
        part = staging / f"part{k:05d}.pt"
        torch.save(staged, part)
        parts.append(part)
        del staged
    converted = {}
    for part in parts:
        converted.update(torch.load(part, mmap=True, weights_only=True))
    log.info("converted %d tensors from %d shards", len(converted), len(parts))
    return converted


# ------------------------------------------------------------------------------- Megatron -> HF


@dataclasses.dataclass
class MegatronSource:
    """What an export reads: the LLM's config, how to fetch its tensors, and what goes beside."""

    path: Path
    llm: LLMConfig
    read: Callable[[list[str]], dict[str, torch.Tensor]]  # state-dict names -> tensors
    hf_config: Path | None  # the source family's config.json, when known
    tokenizer: Path | None
    prompt_format: str | None = None  # a training run's data.prompt_format: where answers end


class _RegionPlanner(DefaultLoadPlanner):
    """Reads one region of each checkpoint tensor (a layer of the stacked layer tensors), so
    an export holds a layer at a time. The state dict maps DCP keys to the region's tensor."""

    def __init__(self, offsets: dict[str, tuple[int, ...]]):
        super().__init__()
        self.offsets = offsets

    def create_local_plan(self) -> LoadPlan:
        items = []
        for key, tensor in self.state_dict.items():
            chunk = ChunkStorageMetadata(offsets=torch.Size(self.offsets[key]), sizes=tensor.size())
            saved = self.metadata.state_dict_metadata[key]
            items += create_read_items_for_chunk_list(key, saved, [chunk])
        return LoadPlan(items)

    def lookup_tensor(self, index) -> torch.Tensor:
        return self.state_dict[index.fqn]  # the region itself, whatever its offset


def _checkpoint_reader(path: Path, llm: LLMConfig, prefix: str):
    """Read LLM tensors from a dist checkpoint a group at a time, in the checkpoint's dtype.

    Megatron's ``torch_dist`` format is PyTorch DCP keyed by the sharded keys, layers stacked
    on a leading axis; the layout built for ``llm`` says where each tensor lies.
    """
    layout = checkpoint_layout(llm, prefix)
    reader = FileSystemReader(str(path))
    saved = reader.read_metadata().state_dict_metadata

    def region(name: str) -> tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(key, offsets, region shape, tensor shape) of state-dict entry ``name``."""
        entry = layout[prefix + name]
        if isinstance(entry, ShardedTensorFactory):  # SwiGLU: [gate; up] of one layer
            part = entry.build()[0]
            shape = tuple(entry.data.shape)
        else:
            part, shape = entry, tuple(entry.local_shape)
        if part.key not in saved:
            raise ConversionError(f"{path} has no tensor {part.key}")
        expected, found = tuple(part.global_shape), tuple(saved[part.key].size)
        if found != expected:
            raise ConversionError(
                f"{path}: tensor {part.key} has shape {list(found)}, the LLM config expects "
                f"{list(expected)}"
            )
        return part.key, tuple(part.global_offset), (1,) * part.prepend_axis_num + shape, shape

    def read(names: list[str]) -> dict[str, torch.Tensor]:
        regions = {name: region(name) for name in names}
        # One box per checkpoint key around the regions read from it: a layer's experts are
        # one tensor, each expert a region of it.
        boxes: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # key -> (low, high) corners
        for key, offset, size, _ in regions.values():
            low, high = torch.tensor(offset), torch.tensor(offset) + torch.tensor(size)
            if key in boxes:
                low, high = torch.minimum(boxes[key][0], low), torch.maximum(boxes[key][1], high)
            boxes[key] = low, high
        state = {
            key: torch.empty((high - low).tolist(), dtype=saved[key].properties.dtype)
            for key, (low, high) in boxes.items()
        }
        offsets = {key: tuple(low.tolist()) for key, (low, _) in boxes.items()}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, storage_reader=reader, planner=_RegionPlanner(offsets), no_dist=True)

        def cut(key, offset, size, shape) -> torch.Tensor:
            start = (torch.tensor(offset) - boxes[key][0]).tolist()
            box = tuple(slice(a, a + n) for a, n in zip(start, size, strict=True))
            return state[key][box].reshape(shape)

        return {name: cut(*region) for name, region in regions.items()}

    return read


def _state_reader(state: dict[str, torch.Tensor], where: Path):
    def read(names: list[str]) -> dict[str, torch.Tensor]:
        missing = [n for n in names if n not in state]
        if missing:
            raise ConversionError(f"{where}: the merged LLM has no tensor {missing[0]}")
        return {n: state[n] for n in names}

    return read


def open_megatron(path: str | Path) -> MegatronSource:
    """A folder from ``hf-to-mcore``, or a training checkpoint (a run folder, its
    ``checkpoints/`` or one step) whose LLM is exported; LoRA adapters are merged first."""
    path = Path(path)
    if (path / LLM_CONFIG_FILE).is_file():
        llm = read_llm_config(path / LLM_CONFIG_FILE)
        hf_config = path / HF_CONFIG_FILE
        return MegatronSource(
            path,
            llm,
            _checkpoint_reader(path, llm, ""),
            hf_config if hf_config.is_file() else None,
            path,
        )
    from ..inference import loading
    from ..training import checkpoint

    found = loading.find_checkpoint(path)
    cfg = loading.saved_config(found)
    pretrained = cfg.checkpoint.pretrained_llm
    hf_config = Path(pretrained) / HF_CONFIG_FILE if pretrained else None
    tokenizer = Path(cfg.data.tokenizer) if cfg.data.tokenizer else None
    lora_rank = getattr(getattr(cfg, "lora", None), "rank", 0) or 0
    if "llm." in checkpoint.left_out(found):  # frozen: its weights are the pretrained ones
        if not pretrained:
            raise ConversionError(
                f"{found} left out its frozen LLM, and its config names no "
                "checkpoint.pretrained_llm to take it from"
            )
        base, prefix = Path(pretrained), ""
    else:
        base, prefix = found, "llm."
    if lora_rank > 0:
        read = _merged_lora_reader(cfg, found, lora_rank, _stored_dtype(base, cfg.llm, prefix))
    else:
        read = _checkpoint_reader(base, cfg.llm, prefix)
    return MegatronSource(
        found,
        cfg.llm,
        read,
        hf_config if hf_config is not None and hf_config.is_file() else None,
        tokenizer if tokenizer is not None and tokenizer.exists() else None,
        cfg.data.prompt_format,
    )


def _stored_dtype(path: Path, llm: LLMConfig, prefix: str) -> torch.dtype:
    """The dtype the LLM weights of dist checkpoint ``path`` are stored in."""
    key = checkpoint_layout(llm, prefix)[prefix + "embedding.word_embeddings.weight"].key
    saved = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    if key not in saved:
        raise ConversionError(f"{path} has no tensor {key}")
    return saved[key].properties.dtype


def _merged_lora_reader(cfg, found: Path, rank: int, dtype: torch.dtype):
    """The whole speech model at TP=PP=1, built in ``dtype`` (the stored one: a bf16 model
    never widens to fp32 in memory), with its LoRA adapters folded into the LLM."""
    try:
        from ..models.lora import merge_lora
    except ImportError as err:
        raise ConversionError(
            f"{found} was trained with LoRA (lora.rank={rank}), but salm_megatron.models.lora "
            f"cannot be imported to merge it ({err})"
        ) from None
    from ..inference import loading

    model = loading.load_model(loading.generation_config(cfg, 1, []), found, dtype)
    merge_lora(model)
    state = {n: t.detach() for n, t in model.llm.state_dict().items() if t is not None}
    log.info("merged the LoRA adapters (rank %d) into the LLM, in %s", rank, _dtype_name(dtype))
    return _state_reader(state, found)


def mcore_to_hf(
    checkpoint: str | Path,
    out: str | Path,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Export the LLM of ``checkpoint`` as a Hugging Face folder ``out`` (``dtype``: cast to
    it; None keeps the checkpoint's)."""
    out = Path(out)
    with atomic_folder(out) as tmp, single_process():
        source = open_megatron(checkpoint)
        llm = source.llm
        writer = ShardedSafetensorsWriter(tmp, max_shard_bytes)
        groups = conversion_rules(llm)
        saved_dtype = None
        for i, group in enumerate(groups):
            tensors = source.read([rule.megatron for rule in group])
            for rule in group:
                parts = rule.split(tensors[rule.megatron])
                for name, shape, tensor in zip(rule.hf, rule.hf_shapes, parts, strict=True):
                    if tuple(tensor.shape) != shape:
                        raise ConversionError(
                            f"{source.path}: {rule.megatron} gives {name} of shape "
                            f"{list(tensor.shape)}, expected {list(shape)}"
                        )
                    saved_dtype = saved_dtype or tensor.dtype
                    writer.add(name, tensor if dtype is None else tensor.to(dtype))
            if (i + 1) % 8 == 0 or i + 1 == len(groups):
                log.info("exported %d/%d tensor groups", i + 1, len(groups))
        shards = writer.finish()
        _write_hf_config(source, tmp / HF_CONFIG_FILE, dtype or saved_dtype)
        if source.tokenizer is None or not copy_tokenizer(source.tokenizer, tmp):
            log.warning("no tokenizer files found for %s; add them to %s", source.path, out)
        elif _holds_tokenizer(source.tokenizer):
            write_token_ids(tmp, load_tokenizer(source.tokenizer), source.prompt_format)
        else:
            log.warning(
                "%s has no tokenizer.json or tokenizer.model: %s keeps the token ids it has",
                source.tokenizer, HF_CONFIG_FILE,
            )  # fmt: skip
    log.info("wrote %s (%d safetensors shard(s))", out, shards)
    return out


def _write_hf_config(source: MegatronSource, path: Path, dtype: torch.dtype) -> None:
    if source.hf_config is not None:
        config = read_json(source.hf_config)
        if _shape_differs(config, source):
            raise ConversionError(
                f"{source.hf_config} does not describe the checkpoint's LLM ({source.path})"
            )
        for key in ("dtype", "torch_dtype"):
            if key in config:
                config[key] = _dtype_name(dtype)
    else:
        config = hf_config_from_llm(source.llm, dtype)
    path.write_text(json.dumps(config, indent=2) + "\n")


def write_token_ids(folder: Path, tokenizer: Tokenizer, prompt_format: str | None) -> None:
    """The tokenizer's BOS, EOS and PAD (where it has its own) into the folder's ``config.json``,
    and ``generation_config.json`` (which transformers' ``generate`` reads before the model
    config) with those and, as its EOS, every token decoding stops at: EOS and, for a training
    run, the end of an answer in its prompt format (Llama 3's ``<|eot_id|>``). Other fields of
    a ``generation_config.json`` the tokenizer brought (sampling defaults) are kept."""
    eos = tokenizer.eos_id
    pad = tokenizer.pad_id if tokenizer.pad_id != eos else None  # EOS stands in for a missing one
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": eos, "pad_token_id": pad}
    ids = {key: value for key, value in ids.items() if value is not None}
    stops = {eos}
    if prompt_format is not None:
        stops.add(generation_prompt(tokenizer, prompt_format, "", 0)[1])
    generation = ids | {"eos_token_id": sorted(stops) if len(stops) > 1 else eos}
    for name, update in ((HF_CONFIG_FILE, ids), (GENERATION_CONFIG_FILE, generation)):
        path = folder / name
        config = read_json(path) if path.is_file() else {}
        path.write_text(json.dumps(config | update, indent=2) + "\n")


def _holds_tokenizer(path: Path) -> bool:
    """Whether ``path`` is a tokenizer file or a folder with one (not its config alone)."""
    return path.is_file() or any((path / n).is_file() for n in TOKENIZER_MODELS)


def _shape_differs(config: dict, source: MegatronSource) -> bool:
    """Whether ``config.json`` gives another model shape than the checkpoint's llm.* fields."""
    a, b = llm_config_from_hf(config, str(source.hf_config)), source.llm
    return any(getattr(a, k) != getattr(b, k) for k in SHAPE_FIELDS)


# ------------------------------------------------------------------------------------ commands


def _parser(prog: str, description: str, epilog: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _run(prog: str, work: Callable[[], object]) -> int:
    try:
        work()
    except (ConversionError, ConfigError, FileNotFoundError, ValueError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    return 0


def hf_to_mcore_main(argv: list[str]) -> int:
    parser = _parser(
        "salm convert hf-to-mcore",
        "Hugging Face Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3 or Qwen3-MoE folder -> Megatron "
        "dist checkpoint of the LLM (for checkpoint.pretrained_llm; loads at any TP/PP/EP), with "
        "llm.yaml, the HF config.json and the tokenizer beside it.",
        "example: salm convert hf-to-mcore --hf hf/Llama-3.2-1B --out ckpt/llama3.2-1b",
    )
    parser.add_argument("--hf", required=True, help="local Hugging Face model folder")
    parser.add_argument("--out", required=True, help="new output folder")
    parser.add_argument(
        "--extra-tokens",
        type=int,
        metavar="N",
        help="zero embedding rows to add after the vocabulary (default: 1 when the tokenizer has "
        "no <|audio|> or reserved token and the padded rows none to spare, as for Llama 2; else 0)",
    )
    args = parser.parse_args(argv)
    return _run(parser.prog, lambda: hf_to_mcore(args.hf, args.out, args.extra_tokens))


def mcore_to_hf_main(argv: list[str]) -> int:
    parser = _parser(
        "salm convert mcore-to-hf",
        "The LLM of a Megatron checkpoint (from hf-to-mcore, or a speech-model training "
        "checkpoint, LoRA merged) -> Hugging Face folder for AutoModelForCausalLM.",
        "example: salm convert mcore-to-hf --checkpoint runs/salm --out hf/salm-llm "
        "--dtype bfloat16",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="hf-to-mcore folder, or a run folder, its checkpoints/, or one step_N folder",
    )
    parser.add_argument("--out", required=True, help="new output folder")
    parser.add_argument("--dtype", choices=list(DTYPES), help="cast weights (default: as saved)")
    parser.add_argument(
        "--max-shard-gb", type=float, default=5.0, help="safetensors shard size (default 5)"
    )
    args = parser.parse_args(argv)
    dtype = DTYPES[args.dtype] if args.dtype else None
    size = int(args.max_shard_gb * 2**30)
    return _run(parser.prog, lambda: mcore_to_hf(args.checkpoint, args.out, dtype, size))
