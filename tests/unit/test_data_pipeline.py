"""Proves shards -> loader (2 workers, 2 DP ranks) -> prompts -> buckets -> batches resumes exactly
by keys (the loader after any number of samples, its workers' turns included) and feeds a SALM
model."""

import itertools

import pytest
import torch
import webdataset as wds

from salm_megatron.config import apply_overrides
from salm_megatron.data import collate, load_tokenizer
from salm_megatron.data.audio_io import encode_flac
from salm_megatron.data.batching import (
    BucketBatcher,
    GlobalBatches,
    llm_sequence_length,
    token_cost,
)
from salm_megatron.data.loader import LoadedStream, SampleStream
from salm_megatron.data.samples import Mapped, make_sample
from tests.speech_fixtures import make_hf_tokenizer, tiny_config, waveform

WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    with wds.ShardWriter(str(folder / "shard-%06d.tar"), maxcount=8, verbose=0) as sink:
        for i in range(24):
            answer = " ".join(WORDS[j % 10] for j in range(i % 4 + 1 + i % 3))
            sink.write({
                "__key__": f"utt{i:03d}",
                "flac": encode_flac(waveform(0.2 + 0.05 * (i % 7), seed=i)),
                "json": {"answer": answer, "task": "asr"},
            })  # fmt: skip
    return sorted(str(p) for p in folder.glob("shard-*.tar"))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(make_hf_tokenizer(tmp_path_factory.mktemp("tok")))


def _batches(shards, tokenizer, rank, state=None, arch="salm"):
    cfg = tiny_config(arch)
    stream = SampleStream(shards, dp_rank=rank, dp_size=2, seed=3, shuffle_buffer=4)
    samples = Mapped(
        LoadedStream(stream, num_workers=2),
        lambda raw: make_sample(raw, tokenizer, "plain", arch),
    )
    batcher = BucketBatcher(samples, token_cost(cfg), max_tokens=120, window=5, seed=1)
    if state is not None:
        batcher.load_state_dict(state)
    return batcher


def _keys(batches):
    return [[s.key for s in batch] for batch in batches]


def test_pipeline_resumes_exactly_by_keys(shards, tokenizer):
    everything = []
    for rank in (0, 1):
        full = _keys(_batches(shards, tokenizer, rank))
        first = _batches(shards, tokenizer, rank)
        seen = []
        for batch in first:
            seen.append([s.key for s in batch])
            if len(seen) == 2:
                break
        rest = _keys(_batches(shards, tokenizer, rank, first.state_dict()))
        assert seen + rest == full, f"rank {rank}: resumed stream differs"
        everything += [k for batch in full for k in batch]
    assert sorted(everything) == [f"utt{i:03d}" for i in range(24)]  # each sample once


@pytest.mark.parametrize("stop", [1, 3, 6])
def test_loaded_stream_resumes_in_its_workers_turn(shards, stop):
    """A state taken after an odd number of samples (a mix of datasets takes any number from
    each) resumes with the worker whose turn was next, not with the DataLoader's first."""

    def make():
        stream = SampleStream(shards, seed=3, shuffle_buffer=4, repeat=True)
        return LoadedStream(stream, num_workers=2)

    full = [s["key"] for s in itertools.islice(make(), 12)]
    first = make()
    seen = [s["key"] for s in itertools.islice(first, stop)]
    again = make()
    again.load_state_dict(first.state_dict())
    assert seen + [s["key"] for s in itertools.islice(again, 12 - stop)] == full


@pytest.mark.parametrize("arch", ["salm", "bestow"])
def test_global_batches_share_one_shape_and_feed_the_model(single_rank, shards, tokenizer, arch):
    from salm_megatron.models import build_speech_llm

    cfg = apply_overrides(
        tiny_config(arch),
        [
            f"llm.vocab_size={tokenizer.vocab_size}",
            f"model.audio_token_id={tokenizer.audio_token_id}",
        ],
    )
    (model,) = build_speech_llm(cfg)
    source = _batches(shards, tokenizer, 0, arch=arch)
    groups = GlobalBatches(source, 2, llm_sequence_length(cfg), multiple=4)
    microbatches, length = next(iter(groups))
    batches = [collate(mb) for mb in microbatches]
    # The data side predicts the model's own layout, so every micro-batch fits one shape.
    longest = max(model.layout(b, None).length for b in batches)
    assert length == -(-longest // 4) * 4
    for batch in batches:
        loss = model(batch, sequence_length=length)
        assert loss.shape[1] == length and torch.isfinite(loss).all()
        assert int((loss != 0).sum()) == int(batch["answer_mask"].sum())
