"""Length bucketing into micro-batches, and weighted mixing of datasets, both exactly resumable.

Cost of a sample = its token-equivalent length: text tokens plus the audio frames the encoder and
adapter will make of it (what the LLM or the cross-attention reads). Batching works on windows:
read ``window`` samples, sort them by cost, cut batches (up to ``max_tokens`` of padded cost, or
``batch_size`` samples), shuffle the batches with a seeded RNG and emit them. A window is a pure
function of the source's state at its start, so the resumable state is just that source state
plus how many of the window's batches were already emitted (and the samples skipped before it).

A repeating stream of a small dataset (a data-parallel rank's share shorter than the window)
puts several copies of a sample in one window, with equal cost: they go to different batches
(see :meth:`BucketBatcher._cut`), never side by side in one. A sample costing more than
``max_tokens`` is skipped and counted (``skipped``), not raised mid-run. The window and resume
machinery lives in :class:`WindowBatcher`, shared with the sequence packer (``packing.py``).
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Any, Optional, Protocol

import torch

from ..audio.adapters import audio_embedding_lengths
from ..config import Config
from .collate import SpeechSample

logger = logging.getLogger(__name__)

SKIP_REASONS = ("over_max_tokens",)  # samples BucketBatcher skips, by reason (see its skipped)
MAX_WARNINGS = 5  # skipped samples named in the log, per batcher


class Resumable(Protocol):
    def __iter__(self) -> Iterator[Any]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def audio_frames(cfg: Config, num_samples: list[int]) -> list[int]:
    """Frames each waveform becomes after features, encoder and adapter (no weights needed)."""
    if not num_samples:
        return []
    return audio_embedding_lengths(cfg.encoder, cfg.adapter, torch.tensor(num_samples)).tolist()


def token_cost(cfg: Config) -> Callable[[SpeechSample], int]:
    """Token-equivalent length of a sample for ``cfg``'s encoder and adapter."""

    def cost(sample: SpeechSample) -> int:
        return len(sample.input_ids) + sum(audio_frames(cfg, [len(w) for w in sample.audio]))

    return cost


def llm_sequence_length(cfg: Config) -> Callable[[SpeechSample], int]:
    """Positions a sample takes in the LLM's sequence: SALM replaces each placeholder with its
    segment's frames; BESTOW's sequence is its text."""

    def length(sample: SpeechSample) -> int:
        if cfg.model.arch == "bestow":
            return len(sample.input_ids)
        frames = audio_frames(cfg, [len(w) for w in sample.audio])
        return len(sample.input_ids) - len(sample.audio) + sum(frames)

    return length


def copy_key(sample: Any) -> Hashable:
    """What the copies of one record share: a :class:`SpeechSample`'s key, tokens and audio
    lengths (two datasets may share keys, hardly also their text and audio); any other item is
    its own key."""
    if isinstance(sample, SpeechSample):
        return sample.key, tuple(sample.input_ids), tuple(len(w) for w in sample.audio)
    return sample


class WindowBatcher:
    """Micro-batches cut window by window from a resumable sample stream, exactly resumable.

    Reads ``window`` samples, cuts them into micro-batches (:meth:`_cut`, the subclass's rule),
    shuffles those with ``random.Random(f"{seed}-{window_index}")`` and emits them. A window is a
    pure function of the source's state at its start, so the state is that source state, the
    window's index, the micro-batches of it already emitted and the samples skipped before it.
    A sample over the subclass's limit is skipped and counted under :attr:`skip_reason`.
    """

    # Set by each subclass, for ``skipped`` and the messages:
    skip_reason: str  # the key of ``skipped``
    limit_name: str  # the parameter a skipped sample exceeds
    size_words: tuple[str, str]  # "a sample <verb> N <unit>"

    def __init__(
        self,
        source: Resumable,
        *,
        limit: Optional[int],
        window: int,
        seed: int,
        copy_key: Callable[[Any], Hashable],
    ):
        if window < 1:
            raise ValueError(f"window={window} must be at least 1")
        self.source, self.window, self.seed, self.copy_key = source, window, seed, copy_key
        self._limit = limit  # samples over it are skipped (None: none is)
        self._resume: Optional[dict] = None
        self._state = {"source": source.state_dict(), "window": 0, "emitted": 0, "skipped": 0}
        self._skipped = 0  # over the limit, in the windows cut so far
        self._unfit: Optional[set] = set()  # keys skipped while no sample fitted (None: one did)
        self._warned_copies = False

    @property
    def skipped(self) -> dict[str, int]:
        """Samples skipped, by reason (:data:`SKIP_REASONS`), in the windows read so far."""
        return {self.skip_reason: self._skipped}

    def _cut(self, samples: list) -> list[list]:
        """The window's micro-batches (before the shuffle); skip samples with :meth:`_within`."""
        raise NotImplementedError

    def _copy_numbers(self, keys: list[Hashable]) -> list[int]:
        """Which copy of its sample each one is (0: the first in the window); a window with
        copies is said once, since it means the data is shorter than the window."""
        numbers, seen = [], {}
        for key in keys:
            numbers.append(seen.get(key, 0))
            seen[key] = numbers[-1] + 1
        if len(seen) < len(keys) and not self._warned_copies:
            self._warned_copies = True
            logger.warning(
                "a batching window of %d samples holds %d copies (a data-parallel rank's share "
                "of the data is shorter than the window): they go to different micro-batches; a "
                "window no longer than the share sorts each sample once",
                len(keys), len(keys) - len(seen),
            )  # fmt: skip
        return numbers

    def _within(
        self, order: list[int], samples: list, sizes: list[int], keys: list[Hashable]
    ) -> list[int]:
        """The indices in ``order`` of the samples within the limit; the others are skipped
        (counted, the first few named in the log) in that order."""
        if self._limit is None:
            self._unfit = None
            return list(order)
        if any(sizes[i] <= self._limit for i in order):
            self._unfit = None  # this stream has a sample that fits: skipping cannot loop
        kept = []
        for i in order:
            if sizes[i] <= self._limit:
                kept.append(i)
            else:
                self._skip(samples[i], sizes[i], keys[i])
        return kept

    def _skip(self, sample: Any, size: int, key: Hashable) -> None:
        """Count a sample over the limit; a repeating stream of which no sample fits would
        skip forever, so the first skipped sample seen again before any fitted is an error."""
        verb, unit = self.size_words
        if self._unfit is not None:
            if key in self._unfit:
                raise ValueError(
                    f"every sample {verb} more than {self.limit_name}={self._limit} {unit} (e.g. "
                    f"{getattr(sample, 'key', None) or sample!r}: {size}); raise {self.limit_name}"
                )
            self._unfit.add(key)
        self._skipped += 1
        if self._skipped <= MAX_WARNINGS:
            logger.warning(
                "skipping %s (%s): it %s %d %s, more than %s=%d",
                getattr(sample, "key", None) or repr(sample), self.skip_reason, verb, size, unit,
                self.limit_name, self._limit,
            )  # fmt: skip

    def __iter__(self) -> Iterator[list]:
        if self._resume is not None:
            self.source.load_state_dict(self._resume["source"])
            window_index, skip = self._resume["window"], self._resume["emitted"]
            self._skipped = self._resume.get("skipped", 0)
            self._resume = None
        else:
            window_index, skip = self._state["window"], 0
        stream = iter(self.source)
        while True:
            start, skipped_before = self.source.state_dict(), self._skipped
            samples = list(itertools.islice(stream, self.window))
            if not samples:
                return
            batches = self._cut(samples)
            random.Random(f"{self.seed}-{window_index}").shuffle(batches)
            for emitted, batch in enumerate(batches, start=1):
                if emitted <= skip:
                    continue
                self._state = {
                    "source": start, "window": window_index, "emitted": emitted,
                    "skipped": skipped_before,
                }  # fmt: skip
                yield batch
            window_index, skip = window_index + 1, 0

    def state_dict(self) -> dict:
        """Enough to continue after the last emitted batch."""
        return dict(self._state)

    def load_state_dict(self, state: dict) -> None:
        self._resume = dict(state)
        self._state = dict(state)


class BucketBatcher(WindowBatcher):
    """Micro-batches of samples of similar cost from a resumable sample stream."""

    skip_reason, limit_name, size_words = "over_max_tokens", "max_tokens", ("costs", "tokens")

    def __init__(
        self,
        source: Resumable,
        cost: Callable[[Any], int],
        *,
        max_tokens: Optional[int] = None,
        batch_size: Optional[int] = None,
        window: int = 1000,
        seed: int = 0,
        copy_key: Callable[[Any], Hashable] = copy_key,
    ):
        if (max_tokens is None) == (batch_size is None):
            raise ValueError("give exactly one of max_tokens (dynamic) or batch_size (fixed)")
        for name, value in (("max_tokens", max_tokens), ("batch_size", batch_size)):
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be at least 1")
        super().__init__(source, limit=max_tokens, window=window, seed=seed, copy_key=copy_key)
        self.cost, self.max_tokens, self.batch_size = cost, max_tokens, batch_size

    def _fits(self, size: int, cost: int) -> bool:
        """Whether a sample of ``cost`` (the longest yet) joins a batch of ``size`` samples."""
        if self.batch_size is not None:
            return size < self.batch_size
        return cost * (size + 1) <= self.max_tokens

    def _cut(self, samples: list) -> list[list]:
        """Batches of the window's samples, shortest first (ties in arrival order; each further
        copy of a sample in a later pass). Each batch takes, in that order, the first samples
        left that are no copy of one it holds, until the next does not fit (padded cost: the
        longest times the size, or ``batch_size``): without copies, a plain cut of the sorted
        window; a copy waits for the next batch, so no batch holds two."""
        costs = [self.cost(s) for s in samples]
        keys = [self.copy_key(s) for s in samples]
        copy_number = self._copy_numbers(keys)
        order = sorted(range(len(samples)), key=lambda i: (copy_number[i], costs[i]))
        queue = self._within(order, samples, costs, keys)
        batches = []
        while queue:
            taken, held, longest, waiting = [], set(), 0, []
            for position, i in enumerate(queue):
                if keys[i] in held:
                    waiting.append(i)
                elif not taken or self._fits(len(taken), max(longest, costs[i])):
                    taken.append(i)
                    held.add(keys[i])
                    longest = max(longest, costs[i])
                else:
                    waiting += queue[position:]
                    break
            batches.append([samples[i] for i in taken])
            queue = waiting
        return batches


class GlobalBatches:
    """Groups of ``num_microbatches`` micro-batches and the one sequence length they share.

    Pipeline stages exchange activations of one shape, so every micro-batch of a global batch is
    padded to the longest (``length`` of a sample, e.g. :func:`llm_sequence_length`, rounded up
    to ``multiple``). A trailing group with fewer micro-batches is dropped (training's endless
    stream), or kept with ``drop_last=False`` (validation's one pass: nothing is left out). With
    ``one_size`` a group also ends before a micro-batch of another size than its first (pipeline
    stages exchange one batch size too); it reads one micro-batch ahead, so its ``state_dict``
    is not exact (validation saves none).
    """

    def __init__(
        self,
        microbatches: Resumable,
        num_microbatches: int,
        length: Callable[[Any], int],
        multiple: int = 1,
        *,
        drop_last: bool = True,
        one_size: bool = False,
    ):
        if num_microbatches < 1 or multiple < 1:
            raise ValueError(
                f"num_microbatches={num_microbatches} and multiple={multiple} must be >= 1"
            )
        if drop_last and one_size:
            raise ValueError("one_size ends groups early, which drop_last would drop: not both")
        self.source, self.num_microbatches = microbatches, num_microbatches
        self.length, self.multiple = length, multiple
        self.drop_last, self.one_size = drop_last, one_size

    def _shaped(self, group: list) -> tuple[list, int]:
        longest = max(self.length(sample) for batch in group for sample in batch)
        return group, -(-longest // self.multiple) * self.multiple

    def __iter__(self) -> Iterator[tuple[list, int]]:
        stream = iter(self.source)
        if not self.one_size:
            while group := list(itertools.islice(stream, self.num_microbatches)):
                if self.drop_last and len(group) < self.num_microbatches:
                    return
                yield self._shaped(group)
            return
        group = []
        for batch in stream:
            if group and (len(group) == self.num_microbatches or len(batch) != len(group[0])):
                yield self._shaped(group)
                group = []
            group.append(batch)
        if group:
            yield self._shaped(group)

    def state_dict(self) -> dict:
        return self.source.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state)


class WeightedMix:
    """Interleave several resumable streams, picking each next sample by weight (seeded).

    A stream that ends leaves the mix; the mix ends when all have ended.
    """

    def __init__(self, sources: list[Resumable], weights: list[float], seed: int = 0):
        if len(sources) != len(weights) or not sources:
            raise ValueError(f"{len(sources)} datasets but {len(weights)} weights")
        if any(w <= 0 for w in weights):
            raise ValueError(f"dataset weights {weights} must all be positive")
        self.sources, self.weights, self.seed = sources, list(weights), seed
        self.drawn = 0  # picks made so far (the RNG is replayed to here on resume)
        self.ended: set[int] = set()

    def __iter__(self) -> Iterator[Any]:
        rng = random.Random(self.seed)
        for _ in range(self.drawn):  # replay the picks already made
            rng.random()
        streams = [iter(s) for s in self.sources]
        live = [i for i in range(len(streams)) if i not in self.ended]
        while live:
            total = sum(self.weights[i] for i in live)
            point, pick = rng.random() * total, live[-1]
            for i in live:
                point -= self.weights[i]
                if point < 0:
                    pick = i
                    break
            self.drawn += 1
            try:
                yield next(streams[pick])
            except StopIteration:
                live.remove(pick)
                self.ended.add(pick)

    def state_dict(self) -> dict:
        return {
            "drawn": self.drawn,
            "ended": sorted(self.ended),
            "sources": [s.state_dict() for s in self.sources],
        }

    def load_state_dict(self, state: dict) -> None:
        saved = f"mixing {len(state['sources'])} datasets" if "drawn" in state else "from one"
        if saved != f"mixing {len(self.sources)} datasets":
            raise ValueError(
                f"data state was saved {saved}, this run mixes {len(self.sources)} datasets: "
                "resuming would not replay the same samples"
            )
        self.drawn, self.ended = state["drawn"], set(state["ended"])
        for source, sub in zip(self.sources, state["sources"], strict=True):
            source.load_state_dict(sub)


class ListSource:
    """A resumable stream over an in-memory list (tests, small datasets)."""

    def __init__(self, items: Iterable[Any]):
        self.items, self.position = list(items), 0

    def __iter__(self) -> Iterator[Any]:
        while self.position < len(self.items):
            self.position += 1
            yield self.items[self.position - 1]

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]
