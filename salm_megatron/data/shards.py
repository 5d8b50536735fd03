"""``salm shards``: NeMo-style JSONL manifests -> shuffled webdataset shards + ``index.json``.

Each sample is ``<key>.flac`` (16-bit mono FLAC at ``--sample-rate``, the row's ``offset`` +
``duration`` segment only) and ``<key>.json`` (``answer``, ``context`` when given, every other
field of the row, and the written audio's ``duration``). The parent reads and checks the manifests,
shuffles the rows with ``--seed``, lets ``--workers`` processes decode and re-encode the audio
(``imap``: results come back in the shuffled order, so the shards do not depend on the number of
workers), and writes the shards itself. A shard is written as ``shard-NNNNNN.tar.tmp`` and renamed
when complete; ``index.json`` is written last, so a run that stopped early has none.

A NeMo multi-turn conversation row (``conversations``, see :mod:`.manifest`) becomes one sample:
``<key>.0.flac``, ``<key>.1.flac``, ... (each audio turn's segment, in order; none for a
text-only conversation) and ``<key>.json`` with ``conversation`` (the turns, audio parts naming
their segment: see :mod:`.conversation`), the row's other fields and the ``duration`` of all its
audio. A conversation with a bad audio turn is a bad row, named by that turn's file.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import random
import re
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import soundfile
import webdataset as wds

from ..config import ConfigError
from .audio_io import AudioError, decode, encode_flac
from .conversation import conversation_json
from .manifest import REASONS, BadRow, ConversationRow, ManifestRow, key_prefixes, read_manifest

log = logging.getLogger(__name__)

INDEX = "index.json"
SHARD_NAME = "shard-{:06d}.tar"
INDEX_FORMAT = "salm-shards/1"
ON_ERROR = ("skip", "fail")
# A segment may end this far past the end of its audio (durations in manifests are often rounded);
# it is cut at the end. Further out, the row is bad (segment_past_end).
SEGMENT_SLACK_S = 0.02
_MAX_LISTED_BAD_ROWS = 100  # bad rows listed in index.json and printed; all are counted

_BLOCK = 512  # tar: each member is a 512-byte header + its data padded to 512 bytes;
_RECORD = 20 * _BLOCK  # the archive ends with two zero blocks, padded to a 10240-byte record


def _member_bytes(size: int) -> int:
    return _BLOCK + -(-size // _BLOCK) * _BLOCK


def _tar_bytes(members: int) -> int:
    """Size on disk of a tar whose members take ``members`` bytes (headers included)."""
    return -(-(members + 2 * _BLOCK) // _RECORD) * _RECORD


class ShardsError(RuntimeError):
    """The conversion cannot go on: ``--on-error fail`` met a bad row."""


@dataclass
class ShardsConfig:
    """The settings of one conversion (the flags of ``salm shards``), checked when built."""

    manifests: list[str]
    out: str
    max_shard_samples: int = 10000
    max_shard_bytes: int = 1_000_000_000
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    seed: int = 0
    on_error: str = "skip"
    sample_rate: int = 16000
    overwrite: bool = False

    def __post_init__(self):
        def require(ok: bool, message: str):
            if not ok:
                raise ConfigError(message)

        def integer(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        require(bool(self.manifests), "no manifest given")
        for name in ("max_shard_samples", "workers"):
            value, flag = getattr(self, name), "--" + name.replace("_", "-")
            require(integer(value) and value > 0, f"{flag}={value!r} must be a positive integer")
        require(
            integer(self.max_shard_bytes) and self.max_shard_bytes >= _RECORD,
            f"--max-shard-bytes={self.max_shard_bytes!r} must be at least {_RECORD} "
            "(one tar record)",
        )
        require(integer(self.seed), f"--seed={self.seed!r} must be an integer")
        require(
            self.on_error in ON_ERROR,
            f"--on-error={self.on_error!r} is not one of {', '.join(map(repr, ON_ERROR))}",
        )
        require(
            integer(self.sample_rate) and 1000 <= self.sample_rate <= 655350,
            f"--sample-rate={self.sample_rate!r} must be an integer in [1000, 655350] Hz "
            "(16000 for the models)",
        )
        for manifest in self.manifests:
            require(Path(manifest).is_file(), f"manifest {manifest} is not a file")
        out = Path(self.out)
        require(not out.exists() or out.is_dir(), f"--out {self.out} exists and is not a folder")
        if out.is_dir() and not self.overwrite:
            entries = sorted(p.name for p in out.iterdir())
            require(
                not entries,
                f"--out {self.out} is not empty (holds {', '.join(entries[:3])}"
                f"{', ...' if len(entries) > 3 else ''}); pass --overwrite to replace its shards",
            )


@dataclass
class EncodedSample:
    """A converted row, as it goes into the tar."""

    key: str
    audio: dict[str, bytes]  # member extension -> FLAC bytes: "flac", or "0.flac", "1.flac", ...
    meta: bytes  # the .json member
    seconds: float


def _read_segment(bad, audio: str, offset: float, duration: float | None, sample_rate: int):
    """The waveform of ``audio`` from ``offset`` for ``duration`` seconds, or the :class:`BadRow`
    (``bad(reason, message)``) saying why not."""
    if not os.path.isfile(audio):
        return bad("missing_file", f"audio file {audio} not found")
    try:
        info = soundfile.info(audio)
        length = info.frames / info.samplerate
    except Exception as err:  # soundfile raises several types for files it cannot parse
        return bad("unreadable_audio", f"{audio}: cannot read audio ({err})")
    if offset >= length:
        return bad(
            "offset_past_end",
            f"offset {offset} s is at or past the end of {audio} ({length:.3f} s)",
        )
    if duration is not None:
        if offset + duration > length + SEGMENT_SLACK_S:
            return bad(
                "segment_past_end",
                f"offset {offset} s + duration {duration} s runs past the end of {audio} "
                f"({length:.3f} s)",
            )
        duration = min(duration, length - offset)
    try:
        return decode(audio, sample_rate, offset=offset, duration=duration)
    except AudioError as err:
        return bad("unreadable_audio", str(err))


def encode_row(
    row: ManifestRow | ConversationRow, sample_rate: int = 16000
) -> EncodedSample | BadRow:
    """Decode the row's segment, re-encode it as FLAC and build its JSON; or say why not.

    Runs in the worker processes, so it returns bad rows instead of raising."""

    def bad(reason: str, message: str) -> BadRow:
        return BadRow(reason, row.manifest, row.line, message)

    if isinstance(row, ConversationRow):
        return _encode_conversation(row, bad, sample_rate)
    wave = _read_segment(bad, row.audio, row.offset, row.duration, sample_rate)
    if isinstance(wave, BadRow):
        return wave
    seconds = len(wave) / sample_rate
    meta = {"answer": row.answer}
    if row.context is not None:
        meta["context"] = row.context
    meta.update(row.extra)
    meta["duration"] = round(seconds, 6)
    return EncodedSample(
        key=row.key,
        audio={"flac": encode_flac(wave, sample_rate)},
        meta=json.dumps(meta, ensure_ascii=False).encode("utf-8"),
        seconds=seconds,
    )


def _encode_conversation(row: ConversationRow, bad, sample_rate: int) -> EncodedSample | BadRow:
    audio, samples = {}, 0
    for i, segment in enumerate(row.segments):
        wave = _read_segment(bad, segment.audio, segment.offset, segment.duration, sample_rate)
        if isinstance(wave, BadRow):
            return wave
        audio[f"{i}.flac"] = encode_flac(wave, sample_rate)
        samples += len(wave)
    said = {i: s.transcript for i, s in enumerate(row.segments) if s.transcript is not None}
    meta = {"conversation": conversation_json(list(row.messages), said), **row.extra}
    meta["duration"] = round(samples / sample_rate, 6)
    return EncodedSample(
        key=row.key,
        audio=audio,
        meta=json.dumps(meta, ensure_ascii=False).encode("utf-8"),
        seconds=samples / sample_rate,
    )


class _ShardSink:
    """Writes samples into ``shard-NNNNNN.tar`` files no larger than the caps (a single sample
    larger than ``max_bytes`` gets a shard of its own), each under a temporary name until done."""

    def __init__(self, out: Path, max_samples: int, max_bytes: int):
        self.out, self.max_samples, self.max_bytes = out, max_samples, max_bytes
        self.shards: list[dict] = []
        self.writer = None
        self.tmp = None

    def add(self, sample: EncodedSample) -> None:
        members = sum(_member_bytes(len(b)) for b in (*sample.audio.values(), sample.meta))
        if self.writer is not None and _tar_bytes(self.members + members) > self.max_bytes:
            self.close()
        if self.writer is None:
            name = SHARD_NAME.format(len(self.shards))
            self.tmp = self.out / (name + ".tmp")
            # mtime fixed: the same input gives byte-identical shards
            self.writer = wds.TarWriter(str(self.tmp), encoder=False, mtime=0)
            self.name, self.count, self.members, self.seconds = name, 0, 0, 0.0
        self.writer.write({"__key__": sample.key, **sample.audio, "json": sample.meta})
        self.count += 1
        self.members += members
        self.seconds += sample.seconds
        if self.count == self.max_samples:  # full: complete it now, not when the next one comes
            self.close()

    def close(self) -> None:
        """Finish the open shard (if any) and give it its final name."""
        if self.writer is None:
            return
        self.writer.close()
        self.writer = None
        final = self.out / self.name
        os.replace(self.tmp, final)
        self.tmp = None
        self.shards.append(
            {
                "path": self.name,
                "samples": self.count,
                "bytes": final.stat().st_size,
                "hours": round(self.seconds / 3600, 9),
            }
        )

    def abort(self, remove_finished: bool) -> None:
        """Drop the open shard; with ``remove_finished`` also the shards this run completed."""
        if self.writer is not None:
            try:
                self.writer.close()
            finally:
                self.writer = None
                self.tmp.unlink(missing_ok=True)
        if remove_finished:
            for shard in self.shards:
                (self.out / shard["path"]).unlink(missing_ok=True)
            self.shards = []


class Progress:
    """One progress line on stderr: samples done/total, hours written, rate, ETA. Redrawn in place
    on a terminal (at most twice a second), a new line every ``interval`` seconds in a log file."""

    def __init__(self, total: int, stream=None, interval: float | None = None):
        self.total, self.stream = total, stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval = interval if interval is not None else (0.5 if self.tty else 30.0)
        self.start = self.last = time.monotonic()
        self.width = 0

    @staticmethod
    def _clock(seconds: float) -> str:
        seconds = int(seconds)
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"

    def update(self, done: int, audio_seconds: float, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.interval:
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        rate = done / elapsed
        eta = self._clock((self.total - done) / rate) if rate > 0 else "?"
        line = (
            f"salm shards: {done}/{self.total} samples, {audio_seconds / 3600:.2f} h, "
            f"{rate:.1f} samples/s ({audio_seconds / elapsed:.0f} audio s/s), "
            f"elapsed {self._clock(elapsed)}, ETA {eta}"
        )
        if self.tty:
            self.stream.write("\r" + line.ljust(self.width))
            self.width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def finish(self, done: int, audio_seconds: float) -> None:
        self.update(done, audio_seconds, force=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _clear_outputs(out: Path) -> None:
    """Remove what an earlier run wrote to ``out`` (shards, unfinished shards, the index)."""
    for path in out.iterdir():
        if path.name == INDEX or re.fullmatch(r"shard-\d+\.tar(\.tmp)?", path.name):
            path.unlink()


def write_shards(config: ShardsConfig, progress_stream=None) -> dict:
    """Convert ``config.manifests`` into shards under ``config.out``; return the index written.

    Raises :class:`ShardsError` when ``on_error="fail"`` meets a bad row (then no shard of this
    run is left behind) and OSError when a manifest cannot be read."""
    skipped: Counter = Counter()
    listed: list[str] = []

    def reject(row: BadRow) -> None:
        if config.on_error == "fail":
            raise ShardsError(f"{row} (pass --on-error skip to skip and count bad rows)")
        skipped[row.reason] += 1
        if len(listed) < _MAX_LISTED_BAD_ROWS:
            listed.append(str(row))
            log.warning("skipping %s", row)
            if len(listed) == _MAX_LISTED_BAD_ROWS:
                log.warning("further bad rows are counted but not listed")

    rows: list[ManifestRow | ConversationRow] = []
    read = 0
    for manifest, prefix in zip(config.manifests, key_prefixes(config.manifests), strict=True):
        for row in read_manifest(manifest, prefix):
            read += 1
            if isinstance(row, BadRow):
                reject(row)
            else:
                rows.append(row)
    random.Random(config.seed).shuffle(rows)

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    _clear_outputs(out)
    sink = _ShardSink(out, config.max_shard_samples, config.max_shard_bytes)
    progress = Progress(len(rows), progress_stream)
    convert = partial(encode_row, sample_rate=config.sample_rate)
    pool = None
    done, seconds = 0, 0.0
    try:
        if config.workers > 1 and len(rows) > 1:
            # spawn: the workers do not inherit the parent's threads (torch, a test runner)
            pool = multiprocessing.get_context("spawn").Pool(min(config.workers, len(rows)))
            chunk = max(1, min(16, len(rows) // (config.workers * 8)))
            results = pool.imap(convert, rows, chunksize=chunk)
        else:
            results = map(convert, rows)
        for result in results:
            if isinstance(result, BadRow):
                reject(result)
            else:
                sink.add(result)
                seconds += result.seconds
            done += 1
            progress.update(done, seconds)
        sink.close()
    except BaseException as err:
        sink.abort(remove_finished=isinstance(err, ShardsError))
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    progress.finish(done, seconds)

    index = {
        "format": INDEX_FORMAT,
        "shards": sink.shards,
        "total_samples": sum(s["samples"] for s in sink.shards),
        "total_hours": round(seconds / 3600, 9),
        "total_bytes": sum(s["bytes"] for s in sink.shards),
        "rows": read,
        "skipped": {reason: skipped[reason] for reason in REASONS if skipped[reason]},
        "skipped_rows": listed,  # the first bad rows, as "manifest:line: reason: message"
        "settings": {
            **asdict(config),
            "manifests": [str(Path(m).resolve()) for m in config.manifests],
            "out": str(out.resolve()),
        },
    }
    tmp = out / (INDEX + ".tmp")
    tmp.write_text(json.dumps(index, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, out / INDEX)
    return index


_SIZE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_SIZE_UNITS.update({f"{u}i": 1024 ** "kmgt".index(u) * 1024 for u in "kmgt"})


def parse_size(text: str) -> int:
    """``"500M"`` -> 500000000; K/M/G/T are powers of 1000, Ki/Mi/Gi/Ti of 1024, ``B`` optional."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 500000000, 500M or 1GiB")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2) or ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="salm shards",
        description="Convert NeMo-style JSONL manifests (audio_filepath, duration, offset, "
        "text/answer, context/question, other fields kept; or NeMo speechlm2 multi-turn "
        "conversations: id, conversations of from/type/value turns) into shuffled webdataset "
        "shards of 16 kHz mono FLAC + JSON, and DIR/index.json.",
        epilog="example: salm shards train_asr.jsonl train_ast.jsonl --out /data/shards/train "
        "--max-shard-bytes 500M --workers 16 --seed 1",
    )
    parser.add_argument("manifests", nargs="+", metavar="MANIFEST", help="JSONL manifest(s)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the shards")
    parser.add_argument(
        "--max-shard-samples",
        type=int,
        default=10000,
        metavar="N",
        help="samples per shard at most (default 10000)",
    )
    parser.add_argument(
        "--max-shard-bytes",
        type=parse_size,
        default=1_000_000_000,
        metavar="B",
        help="bytes per shard at most, e.g. 500M or 1GiB (default 1G)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        metavar="W",
        help="processes decoding audio (default: the CPU count)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, metavar="S", help="seed of the shuffle (default 0)"
    )
    parser.add_argument(
        "--on-error",
        choices=ON_ERROR,
        default="skip",
        help="bad rows: skip and count them (default), or stop at the first with exit code 2",
    )
    parser.add_argument(
        "--sample-rate", type=int, default=16000, metavar="HZ", help="audio rate (default 16000)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the shards of an earlier run in --out"
    )
    args = parser.parse_args(argv)
    try:
        config = ShardsConfig(
            manifests=args.manifests,
            out=args.out,
            max_shard_samples=args.max_shard_samples,
            max_shard_bytes=args.max_shard_bytes,
            workers=args.workers,
            seed=args.seed,
            on_error=args.on_error,
            sample_rate=args.sample_rate,
            overwrite=args.overwrite,
        )
        index = write_shards(config)
    except (ConfigError, ShardsError, OSError) as err:
        print(f"salm shards: error: {err}", file=sys.stderr)
        return 2
    print(
        f"wrote {len(index['shards'])} shards, {index['total_samples']} samples, "
        f"{index['total_hours']:.2f} h, {index['total_bytes'] / 1e6:.1f} MB to {args.out}"
    )
    if index["skipped"]:
        counts = ", ".join(f"{reason} {n}" for reason, n in index["skipped"].items())
        print(f"skipped {sum(index['skipped'].values())} of {index['rows']} rows: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
