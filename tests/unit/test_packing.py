"""Proves the sequence packer: every sample once per pass in rows of at most pack_tokens, best-fit
packing (rows filled >= 95% on a LibriSpeech-like length mix), samples over pack_tokens skipped
and counted (also across a resume), copies of a small dataset's sample never in one row, an
all-too-long repeating stream an error rather than a hang, and exact resume at any row."""

import random

import pytest

from salm_megatron.data import PackBatcher
from salm_megatron.data.batching import ListSource
from salm_megatron.data.packing import SKIP_REASONS


def _lengths(count: int, seed: int, low: int = 20, high: int = 450) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(low, high) for _ in range(count)]


def _used(rows: list[list[int]], lengths: list[int]) -> list[int]:
    return [sum(lengths[i] for i in row) for row in rows]


def test_every_sample_once_rows_within_pack_tokens_and_long_ones_skipped():
    lengths = _lengths(600, seed=1)
    too_long = {3, 250, 599}
    for i in too_long:
        lengths[i] = 1001
    batcher = PackBatcher(ListSource(range(600)), lengths.__getitem__, pack_tokens=1000, window=128)
    rows = list(batcher)
    emitted = [i for row in rows for i in row]
    assert sorted(emitted) == sorted(set(range(600)) - too_long)
    assert max(_used(rows, lengths)) <= 1000
    assert batcher.skipped == {"over_pack_tokens": 3} and SKIP_REASONS == ("over_pack_tokens",)
    with pytest.raises(ValueError, match="pack_tokens=0 must be at least 1"):
        PackBatcher(ListSource([]), len, pack_tokens=0)


def test_best_fit_decreasing_on_a_hand_made_window():
    # 6+4 and 5+3+2 fill two rows of 10 exactly; first fit in arrival order would need three.
    lengths = {"a": 3, "b": 6, "c": 2, "d": 5, "e": 4}
    rows = list(PackBatcher(ListSource("abcde"), lengths.get, pack_tokens=10, window=5))
    assert sorted(rows) == [["b", "e"], ["d", "a", "c"]]  # each row in placement order
    # Least room left wins: 3 goes to the row with 3 left (after 7), not the one with 6 left.
    lengths = {"x": 7, "y": 4, "z": 3}
    rows = list(PackBatcher(ListSource("xyz"), lengths.get, pack_tokens=10, window=3))
    assert sorted(rows) == [["x", "z"], ["y"]]


def _packer(lengths: list[int]) -> PackBatcher:
    return PackBatcher(ListSource(range(len(lengths))), lengths.__getitem__, pack_tokens=512,
                       window=50, seed=7)  # fmt: skip


def test_resume_gives_exactly_the_uninterrupted_rows_and_skipped_count():
    lengths = _lengths(400, seed=2, low=10, high=300)
    for i in (5, 60, 61, 333):
        lengths[i] = 600
    full, skipped = [], []
    for row in (batcher := _packer(lengths)):
        full.append(row)
        skipped.append(batcher.skipped["over_pack_tokens"])
    assert skipped[-1] == 4
    per_window = len(list(_packer(lengths[:50])))  # rows of the first window alone
    for cut in (1, per_window - 1, per_window, per_window + 1, len(full) // 2, len(full) - 1):
        first = _packer(lengths)
        for taken, _ in enumerate(first, start=1):
            if taken == cut:
                break
        resumed = _packer(lengths)
        resumed.load_state_dict(first.state_dict())
        rest = [(row, resumed.skipped["over_pack_tokens"]) for row in resumed]
        assert [row for row, _ in rest] == full[cut:], cut
        assert [count for _, count in rest] == skipped[cut:], cut


def test_copies_of_a_small_dataset_never_share_a_row(caplog):
    order = []
    for epoch in range(10):  # 5 samples, each epoch shuffled, read in windows of 23
        epoch_order = list(range(5))
        random.Random(epoch).shuffle(epoch_order)
        order += epoch_order
    lengths = [30, 20, 50, 10, 40]
    with caplog.at_level("WARNING", logger="salm_megatron.data.batching"):
        rows = list(PackBatcher(ListSource(order), lengths.__getitem__, pack_tokens=200, window=23))
    assert sorted(i for row in rows for i in row) == sorted(order)
    for row in rows:
        assert len(set(row)) == len(row), row
    assert max(_used(rows, lengths)) <= 200
    assert sum("copies" in record.message for record in caplog.records) == 1  # said once


def test_repeating_stream_with_every_sample_too_long_is_an_error_not_a_hang():
    epochs = ListSource([i % 3 for i in range(300)])
    with pytest.raises(ValueError, match="every sample takes more than pack_tokens=50"):
        list(PackBatcher(epochs, lambda sample: 100, pack_tokens=50, window=5))
    # One fitting sample in the window is enough: the long copies are skipped, not an error.
    mixed = ListSource([0, 1, 0, 1, 2] * 20)
    batcher = PackBatcher(mixed, lambda sample: 100 if sample else 10, pack_tokens=50, window=5)
    assert sorted(i for row in batcher for i in row) == [0] * 40
    assert batcher.skipped == {"over_pack_tokens": 60}


def test_rows_are_filled_on_a_librispeech_like_length_mix():
    lengths = _lengths(5000, seed=0)
    rows = list(PackBatcher(ListSource(range(5000)), lengths.__getitem__, pack_tokens=2048))
    assert sorted(i for row in rows for i in row) == list(range(5000))
    fill = sum(lengths) / (len(rows) * 2048)
    assert fill >= 0.95, fill
