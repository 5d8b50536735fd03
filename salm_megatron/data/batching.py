"""Length bucketing into micro-batches, and weighted mixing of datasets, both exactly resumable.

Cost of a sample = its token-equivalent length: text tokens plus the audio frames the encoder and
adapter will make of it (what the LLM or the cross-attention reads). Batching works on windows:
read ``window`` samples, sort them by cost, cut batches (up to ``max_tokens`` of padded cost, or
``batch_size`` samples), shuffle the batches with a seeded RNG and emit them. A window is a pure
function of the source's state at its start, so the resumable state is just that source state
plus how many of the window's batches were already emitted.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Optional, Protocol

import torch

from ..audio.adapters import audio_embedding_lengths
from ..config import Config
from .collate import SpeechSample


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


class BucketBatcher:
    """Micro-batches of samples of similar cost from a resumable sample stream."""

    def __init__(
        self,
        source: Resumable,
        cost: Callable[[Any], int],
        *,
        max_tokens: Optional[int] = None,
        batch_size: Optional[int] = None,
        window: int = 1000,
        seed: int = 0,
    ):
        if (max_tokens is None) == (batch_size is None):
            raise ValueError("give exactly one of max_tokens (dynamic) or batch_size (fixed)")
        for name, value in (("max_tokens", max_tokens), ("batch_size", batch_size),
                            ("window", window)):  # fmt: skip
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be at least 1")
        self.source, self.cost = source, cost
        self.max_tokens, self.batch_size, self.window, self.seed = (
            max_tokens, batch_size, window, seed,
        )  # fmt: skip
        self._resume: Optional[dict] = None
        self._state = {"source": source.state_dict(), "window": 0, "emitted": 0}

    def _cut(self, samples: list) -> list[list]:
        """Batches of the window's samples, shortest first (each sample joins the longest so
        far, so a batch's padded cost is its last sample's cost times its size)."""
        costs = [self.cost(s) for s in samples]
        batches, current = [], []
        for i in sorted(range(len(samples)), key=costs.__getitem__):
            if self.max_tokens is not None and costs[i] > self.max_tokens:
                raise ValueError(
                    f"a sample costs {costs[i]} tokens, more than max_tokens={self.max_tokens}; "
                    "raise max_tokens or filter long samples"
                )
            fits = (
                len(current) < self.batch_size
                if self.batch_size is not None
                else costs[i] * (len(current) + 1) <= self.max_tokens
            )
            if current and not fits:
                batches.append(current)
                current = []
            current.append(samples[i])
        if current:
            batches.append(current)
        return batches

    def __iter__(self) -> Iterator[list]:
        if self._resume is not None:
            self.source.load_state_dict(self._resume["source"])
            window_index, skip = self._resume["window"], self._resume["emitted"]
            self._resume = None
        else:
            window_index, skip = self._state["window"], 0
        stream = iter(self.source)
        while True:
            start = self.source.state_dict()
            samples = list(itertools.islice(stream, self.window))
            if not samples:
                return
            batches = self._cut(samples)
            random.Random(f"{self.seed}-{window_index}").shuffle(batches)
            for emitted, batch in enumerate(batches, start=1):
                if emitted <= skip:
                    continue
                self._state = {"source": start, "window": window_index, "emitted": emitted}
                yield batch
            window_index, skip = window_index + 1, 0

    def state_dict(self) -> dict:
        """Enough to continue after the last emitted batch."""
        return dict(self._state)

    def load_state_dict(self, state: dict) -> None:
        self._resume = dict(state)
        self._state = dict(state)


class GlobalBatches:
    """Groups of ``num_microbatches`` micro-batches and the one sequence length they share.

    Pipeline stages exchange activations of one shape, so every micro-batch of a global batch is
    padded to the longest (``length`` of a sample, e.g. :func:`llm_sequence_length`, rounded up
    to ``multiple``). A trailing group with fewer micro-batches is dropped.
    """

    def __init__(
        self,
        microbatches: Resumable,
        num_microbatches: int,
        length: Callable[[Any], int],
        multiple: int = 1,
    ):
        if num_microbatches < 1 or multiple < 1:
            raise ValueError(
                f"num_microbatches={num_microbatches} and multiple={multiple} must be >= 1"
            )
        self.source, self.num_microbatches = microbatches, num_microbatches
        self.length, self.multiple = length, multiple

    def __iter__(self) -> Iterator[tuple[list, int]]:
        stream = iter(self.source)
        while (
            len(group := list(itertools.islice(stream, self.num_microbatches)))
            == self.num_microbatches
        ):
            longest = max(self.length(sample) for batch in group for sample in batch)
            yield group, -(-longest // self.multiple) * self.multiple

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
