"""Sequence packing: whole samples packed into rows of ``pack_tokens`` LLM positions, resumable.

Each micro-batch is one packed row: a list of whole samples whose lengths (``length``, e.g.
:func:`.batching.llm_sequence_length`) sum to at most ``pack_tokens``; the model lays them one
after another. Packing works on windows of ``window`` samples, best-fit decreasing: longest first
(ties in arrival order), each into the open row with the least room left that still fits it, else
into a new row; a row keeps its samples in the order they were placed. Copies of one sample (a
repeating stream of a small dataset) never share a row. A sample longer than ``pack_tokens`` is
skipped and counted, never truncated. The rows of a window are shuffled with a seeded RNG; a
window is a pure function of the source's state at its start, so the resumable state is that
source state, the window's index, the rows of it already emitted and the samples skipped before
it (:class:`.batching.WindowBatcher`, shared with length bucketing).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Hashable
from typing import Any

from .batching import Resumable, WindowBatcher, copy_key

SKIP_REASONS = ("over_pack_tokens",)  # samples PackBatcher skips, by reason (see its skipped)


class PackBatcher(WindowBatcher):
    """Packed rows (one list of whole samples per micro-batch) from a resumable sample stream."""

    skip_reason, limit_name, size_words = "over_pack_tokens", "pack_tokens", ("takes", "positions")

    def __init__(
        self,
        source: Resumable,
        length: Callable[[Any], int],
        *,
        pack_tokens: int,
        window: int = 1000,
        seed: int = 0,
        copy_key: Callable[[Any], Hashable] = copy_key,
    ):
        if pack_tokens < 1:
            raise ValueError(f"pack_tokens={pack_tokens} must be at least 1")
        super().__init__(source, limit=pack_tokens, window=window, seed=seed, copy_key=copy_key)
        self.length, self.pack_tokens = length, pack_tokens

    def _cut(self, samples: list) -> list[list]:
        """Rows of the window's samples, best-fit decreasing. Longest first leaves the short
        samples to fill the gaps; least room left keeps roomy rows open for what comes next. A
        row holding a copy of the sample is passed over, so copies land in different rows."""
        lengths = [self.length(s) for s in samples]
        keys = [self.copy_key(s) for s in samples]
        self._copy_numbers(keys)  # says once that windows hold copies
        longest_first = sorted(range(len(samples)), key=lambda i: -lengths[i])  # stable: ties
        rows: list[list[int]] = []
        held: list[set] = []  # copy keys in each row
        rooms: list[tuple[int, int]] = []  # (positions left, row index), ascending
        for i in self._within(longest_first, samples, lengths, keys):
            at = bisect.bisect_left(rooms, (lengths[i], -1))  # the tightest row that fits
            while at < len(rooms) and keys[i] in held[rooms[at][1]]:
                at += 1
            if at < len(rooms):
                room, row = rooms.pop(at)
            else:
                room, row = self.pack_tokens, len(rows)
                rows.append([])
                held.append(set())
            rows[row].append(i)
            held[row].add(keys[i])
            bisect.insort(rooms, (room - lengths[i], row))
        return [[samples[i] for i in row] for row in rows]
