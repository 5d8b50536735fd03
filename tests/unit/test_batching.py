"""Proves length bucketing and weighted mixing: every sample once, caps respected, exact resume."""

import pytest
import torch

from salm_megatron.data.batching import (
    BucketBatcher,
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


def test_sample_over_max_tokens_is_a_clear_error():
    batcher = BucketBatcher(_numbers(3), lambda x: 100, max_tokens=50)
    with pytest.raises(ValueError, match="costs 100 tokens, more than max_tokens=50"):
        list(batcher)
    with pytest.raises(ValueError, match="exactly one of max_tokens"):
        BucketBatcher(_numbers(3), len, max_tokens=5, batch_size=2)


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
