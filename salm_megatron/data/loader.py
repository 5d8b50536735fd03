"""Samples from webdataset shards: split by data-parallel rank and worker, shuffled, filtered,
resumable exactly.

A shard is a webdataset tar: each sample is ``<key>.flac`` (or ``.wav``, ``.ogg``, ``.mp3``) plus
``<key>.json`` with ``answer`` (or ``text``), optional ``context``, ``task``, ``lang``,
``duration`` and any extra fields (kept in ``extra``). A sample with neither ``task`` nor
``context`` is a bare transcript, ASR by NeMo's manifest convention (``default_task``); a sample
without a context is prompted with ``default_context``, else its task's default instruction.
A sample whose JSON has ``conversation`` is a conversation: its turns there, its audio segments
``<key>.0.flac``, ``<key>.1.flac``, ... (none: text only); see ``data/conversation.py``.

Pipeline of one consumer (one DataLoader worker of one DP rank), per epoch:

1. shard order permuted with ``Random(seed, epoch)`` (the same on every rank);
2. split over the ``n = dp_size * num_workers`` consumers (consumer ``c = dp_rank * num_workers +
   worker``; every DP rank must use the same ``num_workers``; TP/PP ranks of one DP rank pass the
   same ``dp_rank`` and see the same samples): with at least ``n`` shards, consumer ``c`` reads
   shards ``c, c + n, ...`` of the epoch's order (whole shards: counts may differ by one shard);
   with fewer, every consumer reads every shard and keeps samples ``c, c + n, ...`` of the global
   sample order (round-robin, reading but not decoding the others), so no rank starves;
3. a shuffle buffer of *raw* records (tar bytes, not decoded audio), seeded by
   ``(seed, epoch, dp_rank, worker)``;
4. decode, parse and filter; bad samples are skipped and counted by reason (:data:`SKIP_REASONS`,
   ``stats``; a warning names the shard and key for the first ``max_warnings``), never raised.
   An epoch in which every record is skipped raises :class:`NoSamplesError` (``repeat=True``
   would otherwise never yield); it names the skip reasons and the first skipped sample.
   ``duration`` is measured on the decoded audio (a manifest's ``duration`` is not trusted).

Steps 1-3 depend only on the seed, the epoch and the tar contents, so the *i*-th raw record after
the shuffle buffer is always the same. A yielded sample carries that index in ``position``; the
state is "records consumed per worker". On resume, each worker replays its first ``consumed``
records without decoding them and continues exactly after the last sample the trainer received:
nothing lost, nothing seen twice.

With a DataLoader the stream objects live in the workers, so the main process learns the state
from the samples: call :meth:`SampleStream.observe` (or :meth:`LoaderState.observe`) on each
sample received, in the order received, then ``state_dict()``. Load the state with
``load_state_dict`` *before* making the DataLoader iterator (workers copy the stream when they
start). Iterating the stream directly (no workers) observes by itself. Observe samples in the
order the stream delivers them: a later stage that holds samples back (bucketing) must keep its
own held samples in its state, or observe only what it has passed on in the same order.
Skip counts are diagnostics: after a resume, shard-level problems met while replaying may be
counted again.
"""

from __future__ import annotations

import copy
import functools
import glob
import hashlib
import json
import logging
import os
import random
import tarfile
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import torch
from braceexpand import braceexpand
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .audio_io import AudioError, decode
from .conversation import conversation_sample
from .prompts import instruction

logger = logging.getLogger(__name__)

AUDIO_EXTENSIONS = ("flac", "wav", "ogg", "mp3")
KNOWN_FIELDS = ("answer", "text", "context", "task", "lang", "duration")
SKIP_REASONS = (
    "bad_shard",  # the tar cannot be opened or read to its end (rest of the shard skipped)
    "empty_shard",  # a tar with no samples
    "no_audio",  # no audio member for the key
    "empty_audio",  # a zero-byte audio member
    "bad_audio",  # undecodable, truncated or without samples (AudioError)
    "no_json",  # no .json member for the key
    "bad_json",  # not a JSON object, or answer/context/task/lang not a string
    "bad_conversation",  # a conversation's turns malformed, or audio no turn names
    "no_answer",  # JSON without answer or text
    "empty_answer",  # answer is blank (when drop_empty_answer)
    "no_instruction",  # no context, no default_context, and no default instruction for its task
    "too_short",  # decoded duration < min_duration
    "too_long",  # decoded duration > max_duration
)
STATE_VERSION = 1
# What else decides the raw record order (besides seed, DP layout and shard names), recorded in
# the state too; a state saved before they were lacks them and is not checked for them.
ORDER_SETTINGS = ("shuffle", "shuffle_buffer", "shard_sizes")


class NoSamplesError(ValueError):
    """An epoch of a data-parallel rank's share of the shards yielded no sample: every record
    was skipped. In a DataLoader worker it travels as the stream's last item (DataLoader would
    wrap a raised one in its traceback); :class:`LoadedStream` raises it."""


def expand_shards(shards: str | Sequence[str]) -> list[str]:
    """Brace patterns and globs -> the list of shard paths; a missing path is an error naming it."""
    patterns = [shards] if isinstance(shards, (str, os.PathLike)) else list(shards)
    paths: list[str] = []
    missing: list[str] = []
    for pattern in patterns:
        for item in braceexpand(str(pattern)):
            if any(ch in item for ch in "*?["):
                found = sorted(glob.glob(item))
                if not found:
                    raise FileNotFoundError(f"shard pattern {item!r} matches no file")
                paths += found
            elif not os.path.isfile(item):
                missing.append(item)
            else:
                paths.append(item)
    if missing:
        shown = ", ".join(map(repr, missing[:5])) + (", ..." if len(missing) > 5 else "")
        raise FileNotFoundError(
            f"{len(missing)} of {len(paths) + len(missing)} shards do not exist: {shown}"
        )
    if not paths:
        raise ValueError(f"no shards given ({shards!r})")
    return paths


def _is_text(value: Any, field: str) -> bool:
    """A JSON text field: a string; the optional ones may also be absent (null)."""
    return isinstance(value, str) or (value is None and field != "answer")


def _split_key(name: str) -> tuple[str, str]:
    """``dir/abc.flac`` -> (``dir/abc``, ``flac``): webdataset's rule (key ends at the first dot of
    the file name)."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), (ext.lower() if dot else "")


class _ShardReadError(Exception):
    pass


def _read_shard(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample, members grouped by consecutive key as webdataset
    does. Raises :class:`_ShardReadError` when the tar cannot be read to its end."""
    key, members = None, {}
    try:
        with tarfile.open(path, "r|*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                name_key, ext = _split_key(info.name)
                if name_key != key:
                    if key is not None:
                        yield key, members
                    key, members = name_key, {}
                handle = tar.extractfile(info)
                members[ext] = handle.read() if handle is not None else b""
    except (tarfile.TarError, OSError, EOFError) as err:
        raise _ShardReadError(f"{type(err).__name__}: {err}") from err
    if key is not None:
        yield key, members


class LoaderState:
    """What the consumer has received, per worker: ``{worker: {"epoch", "consumed", "skipped"}}``.

    ``consumed`` counts raw records (after the shuffle buffer, before filtering) up to and
    including the last sample received from that worker; ``skipped`` is that worker's skip counts.
    Workers that never delivered a sample have no entry and start from the stream's epoch.
    """

    def __init__(self):
        self.workers: dict[int, dict[str, Any]] = {}
        self.num_workers: Optional[int] = None

    def observe(self, sample: dict) -> dict:
        """Record ``sample`` as received (returns it, so it can wrap a loop)."""
        pos = sample["position"]
        self.num_workers = pos["num_workers"]
        self.workers[pos["worker"]] = {
            "epoch": pos["epoch"],
            "consumed": pos["consumed"],
            "skipped": dict(pos["skipped"]),
        }
        return sample

    @property
    def stats(self) -> dict[str, int]:
        """Skip counts summed over workers (as of each worker's last delivered sample)."""
        total = dict.fromkeys(SKIP_REASONS, 0)
        for entry in self.workers.values():
            for reason, count in entry["skipped"].items():
                total[reason] = total.get(reason, 0) + count
        return total

    def state_dict(self) -> dict:
        return {
            "num_workers": self.num_workers,
            "workers": {str(w): copy.deepcopy(e) for w, e in sorted(self.workers.items())},
        }

    def load_state_dict(self, state: dict) -> None:
        self.num_workers = state["num_workers"]
        self.workers = {int(w): copy.deepcopy(e) for w, e in state["workers"].items()}


class SampleStream(IterableDataset):
    """Raw samples ``{"key", "shard", "audio", "sample_rate", "answer", "context", "task", "lang",
    "duration", "extra", "position"}`` from webdataset shards (see the module docstring).

    ``audio`` is a 1-D float32 tensor at ``sample_rate`` (mono); ``duration`` is measured on it.
    ``context`` is the instruction the prompt carries (the sample's own, ``default_context``, or
    the task's default); ``task`` is the sample's own, or ``default_task`` for a bare transcript.
    ``repeat=False`` iterates one epoch (call :meth:`set_epoch` between epochs); ``repeat=True``
    runs epochs ``epoch, epoch + 1, ...`` forever, each worker advancing on its own.
    """

    def __init__(
        self,
        shards: str | Sequence[str],
        *,
        sample_rate: int = 16000,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        epoch: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        min_duration: Optional[float] = None,
        max_duration: Optional[float] = None,
        drop_empty_answer: bool = True,
        default_task: Optional[str] = "asr",
        default_context: Optional[str] = None,
        repeat: bool = False,
        max_warnings: int = 5,
    ):
        super().__init__()
        if not (isinstance(dp_size, int) and dp_size > 0):
            raise ValueError(f"dp_size={dp_size!r} must be a positive integer")
        if not (isinstance(dp_rank, int) and 0 <= dp_rank < dp_size):
            raise ValueError(f"dp_rank={dp_rank!r} must be in [0, dp_size={dp_size})")
        if not (isinstance(shuffle_buffer, int) and shuffle_buffer >= 0):
            raise ValueError(f"shuffle_buffer={shuffle_buffer!r} must be an integer >= 0")
        if min_duration is not None and max_duration is not None and min_duration > max_duration:
            raise ValueError(f"min_duration={min_duration} is above max_duration={max_duration}")
        self.shards = expand_shards(shards)
        self.sample_rate = sample_rate
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed, self.epoch = seed, epoch
        self.shuffle, self.shuffle_buffer = shuffle, shuffle_buffer
        self.min_duration, self.max_duration = min_duration, max_duration
        self.drop_empty_answer = drop_empty_answer
        self.default_task, self.default_context = default_task, default_context
        self.repeat = repeat
        self.max_warnings = max_warnings
        self.tracker = LoaderState()
        # DataLoader worker ``i`` reads as worker ``(i + worker_offset) % num_workers``: a resume
        # starts the round-robin at the worker that was next (LoadedStream sets it)
        self.worker_offset = 0
        self._warned = 0
        self._first_skip: Optional[str] = None

    # ------------------------------------------------------------------------------------ state

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` afresh (without it, iterating again continues where the last
        iteration stopped, as after :meth:`load_state_dict`)."""
        self.epoch = epoch
        self.tracker = LoaderState()

    def observe(self, sample: dict) -> dict:
        """Record a sample the trainer received (main process, DataLoader with workers)."""
        return self.tracker.observe(sample)

    @property
    def stats(self) -> dict[str, int]:
        """Skipped samples by reason (see :data:`SKIP_REASONS`)."""
        return self.tracker.stats

    def _fingerprint(self) -> str:
        names = "\n".join(os.path.basename(p) for p in self.shards).encode()
        return hashlib.sha1(names, usedforsecurity=False).hexdigest()

    @functools.cached_property
    def shard_sizes(self) -> str:
        """``"<n> shards, sha1 <digest>"`` of the shards' names and byte sizes: shards rewritten
        under the same names (other samples, another order) change it."""
        listing = "\n".join(f"{os.path.basename(p)} {os.path.getsize(p)}" for p in self.shards)
        digest = hashlib.sha1(listing.encode(), usedforsecurity=False).hexdigest()
        return f"{len(self.shards)} shards, sha1 {digest[:16]}"

    def state_dict(self) -> dict:
        """Plain (JSON-able) state of this DP rank's stream: epoch, and per worker the records
        consumed in its epoch."""
        epochs = [e["epoch"] for e in self.tracker.workers.values()]
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "epoch": min(epochs) if epochs else self.epoch,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "shards": len(self.shards),
            "shards_fingerprint": self._fingerprint(),
            **{name: getattr(self, name) for name in ORDER_SETTINGS},
            **self.tracker.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue after the samples recorded in ``state``; the same shards (names and sizes),
        seed, shuffling and DP layout are required (anything else would not replay the same
        order)."""
        expected = {
            "version": STATE_VERSION,
            "seed": self.seed,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "shards": len(self.shards),
            "shards_fingerprint": self._fingerprint(),
            **{name: getattr(self, name) for name in ORDER_SETTINGS if name in state},
        }
        for name, value in expected.items():
            if state.get(name) != value:
                raise ValueError(
                    f"loader state has {name}={state.get(name)!r}, this stream has {value!r}: "
                    "resuming would not replay the same samples"
                )
        self.epoch = state["epoch"]
        self.tracker.load_state_dict(state)

    # -------------------------------------------------------------------------------- iteration

    def _warn(self, reason: str, shard: str, key: Optional[str], detail: str) -> None:
        where = f"{shard}: {key}" if key is not None else shard
        self._first_skip = self._first_skip or f"{where} ({reason}): {detail}"
        if self._warned < self.max_warnings:
            self._warned += 1
            logger.warning("skipping %s (%s): %s", where, reason, detail)

    def _no_samples(
        self, epoch: int, worker: int, consumers: int, skipped: dict[str, int]
    ) -> NoSamplesError:
        reader = f"DP rank {self.dp_rank} worker {worker}"
        shards = f"{len(self.shards)} shard{'s' * (len(self.shards) != 1)}"
        share = f"its share of {shards} for {consumers} reader{'s' * (consumers != 1)}"
        share += f", epoch {epoch}"
        counts = ", ".join(f"{reason} {n}" for reason, n in skipped.items() if n)
        if not counts:
            return NoSamplesError(f"no sample to train on: {reader} found none in {share}")
        first = f"; the first: {self._first_skip}" if self._first_skip else ""
        return NoSamplesError(
            f"no sample to train on: {reader} skipped every sample of {share} ({counts}){first}"
        )

    def _shard_order(self, epoch: int) -> list[str]:
        order = list(self.shards)
        if self.shuffle:
            random.Random(f"salm-shards:{self.seed}:{epoch}").shuffle(order)
        return order

    def _raw_records(
        self, epoch: int, consumer: int, consumers: int, skipped: dict[str, int]
    ) -> Iterator[tuple[str, str, dict[str, bytes]]]:
        """(shard, key, members) of this consumer, before the shuffle buffer."""
        order = self._shard_order(epoch)
        by_shard = len(order) >= consumers
        mine = order[consumer::consumers] if by_shard else order
        # when every worker reads every shard, only the rank's first worker counts shard problems
        count_shards = by_shard or consumer % (consumers // self.dp_size) == 0
        index = 0  # global sample index (sample split)
        for shard in mine:
            count = 0
            try:
                for key, members in _read_shard(shard):
                    count += 1
                    index += 1
                    if by_shard or (index - 1) % consumers == consumer:
                        yield shard, key, members
            except _ShardReadError as err:
                if count_shards:
                    skipped["bad_shard"] = skipped.get("bad_shard", 0) + 1
                    self._warn("bad_shard", shard, None, f"{err} after {count} samples")
                continue
            if count == 0 and count_shards:
                skipped["empty_shard"] = skipped.get("empty_shard", 0) + 1
                self._warn("empty_shard", shard, None, "no samples")

    def _shuffled(self, records: Iterator, rng: random.Random) -> Iterator:
        if not self.shuffle or self.shuffle_buffer <= 1:
            yield from records
            return
        buffer = []
        for record in records:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(record)
                continue
            i = rng.randrange(len(buffer))
            yield buffer[i]
            buffer[i] = record
        rng.shuffle(buffer)
        yield from buffer

    def _make_sample(self, shard: str, key: str, members: dict[str, bytes]):
        """The sample dict, or the skip reason and a detail."""
        conversation = conversation_sample(
            shard, key, members, sample_rate=self.sample_rate, min_duration=self.min_duration,
            max_duration=self.max_duration, drop_empty_answer=self.drop_empty_answer,
        )  # fmt: skip
        if conversation is not None:
            return conversation
        audio_ext = next((e for e in AUDIO_EXTENSIONS if e in members), None)
        if audio_ext is None:
            return "no_audio", f"no {'/'.join(AUDIO_EXTENSIONS)} member (has {sorted(members)})"
        if "json" not in members:
            return "no_json", f"no json member (has {sorted(members)})"
        try:
            meta = json.loads(members["json"])
        except (ValueError, UnicodeDecodeError) as err:
            return "bad_json", f"invalid JSON ({err})"
        if not isinstance(meta, dict):
            return "bad_json", f"JSON is a {type(meta).__name__}, not an object"
        answer = meta.get("answer", meta.get("text"))
        if answer is None:
            return "no_answer", f"JSON has no answer or text (fields {sorted(meta)})"
        texts = {name: meta.get(name) for name in ("context", "task", "lang")}
        wrong = {n: v for n, v in {"answer": answer, **texts}.items() if not _is_text(v, n)}
        if wrong:
            shown = ", ".join(f"{n}={v!r}" for n, v in wrong.items())
            return "bad_json", f"{shown}: must be {'a string' if len(wrong) == 1 else 'strings'}"
        if self.drop_empty_answer and not answer.strip():
            return "empty_answer", "answer is blank"
        context, task, lang = texts["context"], texts["task"], texts["lang"]
        if task is None and not context:
            task = self.default_task  # a bare transcript
        try:
            context = instruction(task, context or self.default_context, lang)
        except ValueError as err:
            return "no_instruction", f"{err}; set data.default_context or data.default_task"
        data = members[audio_ext]
        if not data:
            return "empty_audio", f"{key}.{audio_ext} is empty"
        try:
            audio = decode(data, self.sample_rate, name=f"{key}.{audio_ext}")
        except AudioError as err:
            return "bad_audio", str(err)
        duration = audio.numel() / self.sample_rate
        if self.min_duration is not None and duration < self.min_duration:
            return "too_short", f"{duration:.3f} s < min_duration {self.min_duration}"
        if self.max_duration is not None and duration > self.max_duration:
            return "too_long", f"{duration:.3f} s > max_duration {self.max_duration}"
        return {
            "key": key,
            "shard": shard,
            "audio": audio,
            "sample_rate": self.sample_rate,
            "answer": answer,
            "context": context,
            "task": task,
            "lang": lang,
            "duration": duration,
            "extra": {k: v for k, v in meta.items() if k not in KNOWN_FIELDS},
        }

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (
            ((info.id + self.worker_offset) % info.num_workers, info.num_workers)
            if info is not None
            else (0, 1)
        )
        saved = self.tracker.num_workers
        if self.tracker.workers and saved is not None and saved != num_workers:
            raise ValueError(
                f"loader state was saved with {saved} DataLoader workers, resuming with "
                f"{num_workers}: use the same num_workers to resume exactly"
            )
        consumers = self.dp_size * num_workers
        consumer = self.dp_rank * num_workers + worker
        entry = self.tracker.workers.get(worker)
        if entry is not None and entry["epoch"] >= self.epoch:
            epoch, skip = entry["epoch"], entry["consumed"]
            skipped = dict(entry["skipped"])
        else:
            epoch, skip, skipped = self.epoch, 0, {}
        self.tracker.num_workers = num_workers
        while True:
            rng = random.Random(f"salm-buffer:{self.seed}:{epoch}:{self.dp_rank}:{worker}")
            records = self._shuffled(self._raw_records(epoch, consumer, consumers, skipped), rng)
            yielded = 0
            for index, (shard, key, members) in enumerate(records):
                if index < skip:
                    continue  # consumed before the resume: replay without decoding
                result = self._make_sample(shard, key, members)
                if isinstance(result, tuple):
                    reason, detail = result
                    skipped[reason] = skipped.get(reason, 0) + 1
                    self._warn(reason, shard, key, detail)
                    continue
                result["position"] = {
                    "worker": worker,
                    "num_workers": num_workers,
                    "epoch": epoch,
                    "consumed": index + 1,
                    "skipped": dict(skipped),
                }
                self.tracker.observe(result)
                yielded += 1
                yield result
            # keep trailing skips visible in-process (the workers' copies report through samples)
            self.tracker.workers.setdefault(
                worker, {"epoch": epoch, "consumed": skip, "skipped": {}}
            )["skipped"] = dict(skipped)
            if self.repeat and yielded == 0 and skip == 0:
                error = self._no_samples(epoch, worker, consumers, skipped)
                if info is None:
                    raise error
                yield error  # raised by LoadedStream in the main process
                return
            if not self.repeat:
                return
            epoch, skip = epoch + 1, 0


class LoadedStream:
    """A :class:`SampleStream` read by ``num_workers`` DataLoader worker processes.

    Observes each sample as it arrives, so ``state_dict`` covers exactly what was delivered;
    load a state before iterating (the workers start with it). A DataLoader takes samples from
    its workers in turn, starting with its first: the state also names the worker whose turn is
    next (``next_worker``), and a resumed stream starts there, so that the order goes on as it
    would have (a state taken after any number of samples, e.g. by a mix of datasets).
    """

    def __init__(self, stream: SampleStream, num_workers: int = 0, prefetch_factor: int = 2):
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers} must be >= 0")
        self.stream, self.num_workers, self.prefetch_factor = stream, num_workers, prefetch_factor
        self.next_worker = 0

    def __iter__(self) -> Iterator[dict]:
        if self.num_workers == 0:
            yield from self.stream
            return
        loader = DataLoader(
            self.stream,
            batch_size=None,
            num_workers=self.num_workers,
            prefetch_factor=self.prefetch_factor,
            # Its own generator: starting the workers must not draw from the global RNG, or
            # a resumed run (workers started later) would see different random numbers.
            generator=torch.Generator(),
        )
        self.stream.worker_offset = self.next_worker  # before the workers copy the stream
        for sample in loader:
            if isinstance(sample, NoSamplesError):
                raise sample
            self.next_worker = (sample["position"]["worker"] + 1) % self.num_workers
            yield self.stream.observe(sample)

    def state_dict(self) -> dict:
        return {**self.stream.state_dict(), "next_worker": self.next_worker}

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        self.next_worker = state.pop("next_worker", 0)  # absent: a state from before it was kept
        self.stream.load_state_dict(state)
