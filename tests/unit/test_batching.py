"""Proves length bucketing and weighted mixing: every sample once, caps respected, copies of a
small dataset's sample never in one micro-batch, samples over max_tokens skipped and counted
(also across a resume), pass-through global batches that drop nothing, exact resume."""

import random

import pytest
import torch

from salm_megatron.data.batching import (
    BucketBatcher,
    GlobalBatches,
    ListSource,
    WeightedMix,
    audio_frames,
    token_cost,
)
from salm_megatron.data.collate import SpeechSample
from tests.speech_fixtures import tiny_config


def _numbers(n):
    return ListSource(range(n))


def _keys(batches):
    return [k for batch in batches for k in batch]


def test_token_cost_counts_text_and_encoded_audio_frames():
    cfg = tiny_config("salm")  # x8 encoder, stack-2 adapter: 16 kHz -> 100 -> 12.5 -> 6.25 /s
    assert audio_frames(cfg, [16000, 8000]) == [7, 4]
    sample = SpeechSample([1, 2, 3], [0, 0, 1], [torch.zeros(16000), torch.zeros(8000)])
    assert token_cost(cfg)(sample) == 3 + 7 + 4


def test_dynamic_batches_respect_max_tokens_and_keep_every_sample():
    cost = lambda x: 1 + x % 17  # noqa: E731
    batcher = BucketBatcher(_numbers(500), cost, max_tokens=40, window=100, seed=1)
    batches = list(batcher)
    assert sorted(_keys(batches)) == list(range(500))
    for batch in batches:
        assert max(map(cost, batch)) * len(batch) <= 40
    # Buckets: within a window, batches hold similar lengths.
    spreads = [max(map(cost, b)) - min(map(cost, b)) for b in batches]
    assert sum(spreads) / len(spreads) < 3


def test_fixed_batch_size_and_determinism():
    def make(seed):
        cost = lambda x: x % 7  # noqa: E731
        return list(BucketBatcher(_numbers(103), cost, batch_size=8, window=50, seed=seed))

    first = make(0)
    assert sorted(_keys(first)) == list(range(103))
    assert all(len(b) <= 8 for b in first)
    assert sum(len(b) < 8 for b in first) <= 3  # one remainder per window of 50 at most
    assert make(0) == first and make(1) != first


def test_sample_over_max_tokens_is_skipped_counted_and_resumed():
    long = {7, 30, 31}
    cost = lambda x: 100 if x in long else 1 + x % 11  # noqa: E731

    def make():
        return BucketBatcher(_numbers(60), cost, max_tokens=30, window=20, seed=3)

    full, counts = [], []
    for batch in (batcher := make()):
        full.append(batch)
        counts.append(batcher.skipped["over_max_tokens"])
    assert sorted(_keys(full)) == sorted(set(range(60)) - long)
    assert batcher.skipped == {"over_max_tokens": 3}
    first = make()
    for seen, _ in enumerate(first, start=1):
        if seen == 4:
            break
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    rest = [(batch, resumed.skipped["over_max_tokens"]) for batch in resumed]
    assert [b for b, _ in rest] == full[4:] and [n for _, n in rest] == counts[4:]
    with pytest.raises(ValueError, match="exactly one of max_tokens"):
        BucketBatcher(_numbers(3), len, max_tokens=5, batch_size=2)


def test_repeating_stream_with_no_sample_under_max_tokens_is_an_error_not_a_hang():
    epochs = ListSource([i % 3 for i in range(300)])  # a repeating stream of 3 samples
    with pytest.raises(ValueError, match="every sample costs more than max_tokens=50"):
        list(BucketBatcher(epochs, lambda x: 100, max_tokens=50, window=5))


def _epochs(items: int, epochs: int, seed: int = 0) -> list[int]:
    """A small dataset read again and again, each epoch shuffled (as a training stream is)."""
    order = []
    for epoch in range(epochs):
        perm = list(range(items))
        random.Random(f"{seed}-{epoch}").shuffle(perm)
        order += perm
    return order


@pytest.mark.parametrize(
    "size", [{"batch_size": 4}, {"max_tokens": 24}], ids=["batch_size", "max_tokens"]
)
def test_small_dataset_copies_never_share_a_micro_batch(size, caplog):
    stream = _epochs(items=6, epochs=8)  # 6 distinct samples, windows of 16
    with caplog.at_level("WARNING", logger="salm_megatron.data.batching"):
        batches = list(BucketBatcher(ListSource(stream), lambda x: 1 + x % 3, window=16, **size))
    assert sorted(_keys(batches)) == sorted(stream)  # every sample, every epoch
    for batch in batches:
        assert len(set(batch)) == len(batch), batch
        if "max_tokens" in size:
            assert max(1 + x % 3 for x in batch) * len(batch) <= size["max_tokens"]
        else:
            assert len(batch) <= 4
    if "batch_size" in size:  # still mostly full
        assert sum(len(b) == 4 for b in batches) >= 0.75 * len(batches)
    warnings = [r for r in caplog.records if "holds" in r.message and "copies" in r.message]
    assert len(warnings) == 1  # said once


def test_global_batches_drop_the_last_group_in_training_only():
    def sizes(**kwargs):
        source = ListSource([[0] * n for n in (4, 4, 4, 4, 2)])
        groups = GlobalBatches(source, 3, lambda sample: 1, **kwargs)
        return [[len(b) for b in group] for group, _ in groups]

    assert sizes() == [[4, 4, 4]]  # an endless stream's trailing part waits for no one
    assert sizes(drop_last=False) == [[4, 4, 4], [4, 2]]
    assert sizes(drop_last=False, one_size=True) == [[4, 4, 4], [4], [2]]
    with pytest.raises(ValueError, match="not both"):
        GlobalBatches(ListSource([]), 3, len, one_size=True)


@pytest.mark.parametrize("stop_after", [1, 7, 13])
def test_batcher_resumes_exactly(stop_after):
    cost = lambda x: 1 + x % 11  # noqa: E731
    full = list(BucketBatcher(_numbers(200), cost, max_tokens=30, window=40, seed=3))
    first = BucketBatcher(_numbers(200), cost, max_tokens=30, window=40, seed=3)
    seen = []
    for batch in first:
        seen.append(batch)
        if len(seen) == stop_after:
            break
    state = first.state_dict()
    resumed = BucketBatcher(_numbers(200), cost, max_tokens=30, window=40, seed=3)
    resumed.load_state_dict(state)
    assert seen + list(resumed) == full


def test_weighted_mix_follows_weights_and_resumes_exactly():
    def make():
        a = ListSource(f"a{i}" for i in range(300))
        b = ListSource(f"b{i}" for i in range(60))
        return WeightedMix([a, b], [3.0, 1.0], seed=5)

    full = list(make())
    assert len(full) == 360 and len(set(full)) == 360
    head = full[:200]
    share_b = sum(k.startswith("b") for k in head) / len(head)
    assert 0.15 < share_b < 0.35  # about 1 in 4 while both last
    for stop in (50, 290):  # before and after the short dataset ends
        mix = make()
        taken = [x for _, x in zip(range(stop), mix, strict=False)]
        state = mix.state_dict()
        again = make()
        again.load_state_dict(state)
        assert taken + list(again) == full
    with pytest.raises(ValueError, match="must all be positive"):
        WeightedMix([ListSource([1])], [0.0])
    mix = make()
    with pytest.raises(ValueError, match="saved mixing 2 datasets, this run mixes 3 datasets"):
        WeightedMix([*mix.sources, ListSource([])], [1, 1, 1]).load_state_dict(mix.state_dict())
    with pytest.raises(ValueError, match="saved from one, this run mixes 2 datasets"):
        mix.load_state_dict(ListSource([]).state_dict())
