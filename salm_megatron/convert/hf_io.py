"""Hugging Face folders on disk: safetensors read one shard at a time, written in size-capped
shards with an index, and output folders that appear only when complete."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

log = logging.getLogger("salm.convert")

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Files of a Hugging Face tokenizer (whichever the model has) and its generation defaults.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
)


class ConversionError(ValueError):
    """Input that cannot be converted; the message names the file, tensor or field."""


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConversionError(f"{path} does not exist") from None
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path} is not valid JSON: {err}") from None


class SafetensorsFolder:
    """The weights of a Hugging Face folder: ``model.safetensors``, or shards listed by
    ``model.safetensors.index.json``. Tensors are read shard by shard, so memory holds one."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConversionError(f"{index} has no weight_map")
            names = {plain_name(s, f"{index}: weight_map[{t!r}]") for t, s in weight_map.items()}
            self.shards = sorted(names)
        elif (self.folder / SINGLE_FILE).is_file():
            self.shards = [SINGLE_FILE]
        else:
            raise ConversionError(
                f"{self.folder} holds neither {SINGLE_FILE} nor {INDEX_FILE} "
                "(only safetensors weights are read)"
            )
        for shard in self.shards:
            if not (self.folder / shard).is_file():
                raise ConversionError(f"shard {self.folder / shard} is missing")

    def names_and_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's name and shape, from the shard headers (no tensor is read)."""
        shapes = {}
        for shard in self.shards:
            with safe_open(self.folder / shard, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        return shapes

    def read_shards(self) -> Iterator[dict[str, torch.Tensor]]:
        """Each shard's tensors in turn (the previous shard is released when the next is read)."""
        for i, shard in enumerate(self.shards):
            log.info("reading shard %d/%d: %s", i + 1, len(self.shards), shard)
            with safe_open(self.folder / shard, framework="pt") as f:
                tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
            yield tensors
            del tensors


class ShardedSafetensorsWriter:
    """Write tensors as they come into shards of at most ``max_shard_bytes`` (a tensor larger
    than that gets a shard of its own); :meth:`finish` names them ``model-0000k-of-0000n`` and
    writes the index, or a single ``model.safetensors`` when one shard suffices."""

    def __init__(self, folder: Path, max_shard_bytes: int):
        self.folder, self.max_shard_bytes = folder, max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names)
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        name = f"part-{len(self.written):05d}.safetensors"
        save_file(self.pending, self.folder / name, metadata={"format": "pt"})
        self.written.append((name, list(self.pending)))
        log.info("wrote shard %d (%d tensors)", len(self.written), len(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> int:
        """Name the shards and write the index; returns the number of shards."""
        if self.pending:
            self._flush()
        count = len(self.written)
        if count == 1:
            os.replace(self.folder / self.written[0][0], self.folder / SINGLE_FILE)
            return 1
        weight_map = {}
        for k, (part, names) in enumerate(self.written):
            final = f"model-{k + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.folder / part, self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return count


def plain_name(name: object, where: str) -> str:
    """``name``, read from a file (``where`` names the file and field), when it is a plain file
    name: joined to its folder, it stays inside (no ``..``, no separator, not absolute)."""
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name:
        raise ConversionError(f"{where} {name!r} must be a plain name inside the folder")
    return name


def refuse_links(folder: Path) -> None:
    """A folder from elsewhere holds its own files: a symbolic link in it could make a copy or a
    read reach any file of this machine, so it is refused."""
    for entry in sorted(folder.iterdir()):
        if entry.is_symlink():
            raise ConversionError(
                f"{entry} is a symbolic link (to {os.readlink(entry)}); {folder} must hold its "
                "own files, links are refused"
            )


def copy_tokenizer(source: Path, dest: Path) -> list[str]:
    """Copy the tokenizer files ``source`` has (a folder, or one tokenizer file) to ``dest``."""
    if source.is_file():
        shutil.copy2(source, dest / source.name)
        return [source.name]
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, dest / name)
            copied.append(name)
    return copied


@contextlib.contextmanager
def atomic_folder(out: str | Path) -> Iterator[Path]:
    """A temporary folder beside ``out``, renamed to ``out`` when the block succeeds and
    removed when it fails; ``out`` must not exist yet (nothing is overwritten)."""
    out = Path(out)
    if out.exists():
        raise ConversionError(f"output folder {out} already exists; remove it or choose another")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.replace(tmp, out)
