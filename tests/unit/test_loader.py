"""SampleStream returns every sample once per epoch with its audio and text, in a seeded order,
split disjointly over DP ranks and DataLoader workers, skips and counts bad inputs, and resumes
exactly from its state (2 DP ranks x 2 workers), refusing a state of another shuffle buffer or of
shards rewritten under the same names, while a state from before those were recorded resumes;
conversation samples (two audio segments, or none) among single-turn ones resume alike."""

from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile

import numpy as np
import pytest
import soundfile
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from salm_megatron.data.loader import LoadedStream, NoSamplesError, SampleStream

RATE = 16000
FLAC_TOL = 1.0 / 32768 + 1e-6  # 16-bit quantization


def _audio_bytes(wave: np.ndarray, rate: int = RATE, fmt: str = "FLAC") -> bytes:
    out = io.BytesIO()
    subtype = "PCM_16" if fmt == "FLAC" else "FLOAT"
    soundfile.write(out, wave, rate, format=fmt, subtype=subtype)
    return out.getvalue()


def _write(pattern: str, samples: list[dict], per_shard: int) -> None:
    with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0) as sink:
        for sample in samples:
            sink.write(sample)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """36 samples (0.1-0.5 s, FLAC and float WAV, `answer` or `text`) in 6 shards of 6."""
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    expected, samples = {}, []
    for i in range(36):
        key = f"utt{i:03d}"
        wave = rng.uniform(-0.5, 0.5, int(RATE * rng.uniform(0.1, 0.5))).astype(np.float32)
        is_flac = i % 2 == 0
        meta = {"context": f"ctx {i}", "task": "asr", "lang": "en", "speaker": i % 3}
        meta["answer" if i % 3 else "text"] = f"answer {i}"
        ext = "flac" if is_flac else "wav"
        samples.append(
            {
                "__key__": key,
                ext: _audio_bytes(wave, fmt="FLAC" if is_flac else "WAV"),
                "json": meta,
            }
        )
        expected[key] = (wave, f"answer {i}", is_flac, i)
    _write(str(root / "train-%04d.tar"), samples, per_shard=6)
    return {"pattern": str(root / "train-{0000..0005}.tar"), "root": root, "expected": expected}


def _keys(stream) -> list[str]:
    return [s["key"] for s in stream]


def test_every_sample_once_with_its_audio_and_text(corpus):
    stream = SampleStream(corpus["pattern"], shuffle_buffer=8, seed=3)
    seen = list(stream)
    assert sorted(s["key"] for s in seen) == sorted(corpus["expected"])
    for s in seen:
        wave, answer, is_flac, i = corpus["expected"][s["key"]]
        assert s["answer"] == answer and s["context"] == f"ctx {i}"
        assert (s["task"], s["lang"], s["extra"]) == ("asr", "en", {"speaker": i % 3})
        assert s["audio"].dtype == torch.float32 and s["audio"].shape == (len(wave),)
        assert s["sample_rate"] == RATE and s["duration"] == len(wave) / RATE
        got = s["audio"].numpy()
        if is_flac:
            np.testing.assert_allclose(got, wave, atol=FLAC_TOL, rtol=0)
        else:
            np.testing.assert_array_equal(got, wave)
        assert s["shard"].endswith(".tar")
    assert not any(stream.stats.values())


def test_order_is_seeded_by_seed_and_epoch(corpus):
    def order(seed, epoch):
        return _keys(SampleStream(corpus["pattern"], seed=seed, epoch=epoch, shuffle_buffer=8))

    base = order(0, 0)
    assert base == order(0, 0)
    assert base != order(1, 0) and base != order(0, 1)
    assert sorted(order(1, 0)) == sorted(base)
    plain = _keys(SampleStream(corpus["pattern"], shuffle=False))
    assert plain == sorted(corpus["expected"])


def _loader_keys(stream, num_workers):
    loader = DataLoader(stream, batch_size=None, num_workers=num_workers)
    return [stream.observe(s)["key"] for s in loader]


@pytest.mark.parametrize("shards", ["train-{0000..0005}.tar", "train-0000.tar"])
def test_dp_ranks_and_workers_split_disjointly(corpus, shards):
    """6 shards: split by shard; 1 shard (fewer than ranks x workers): split by sample."""
    pattern = str(corpus["root"] / shards)
    total = sorted(_keys(SampleStream(pattern, shuffle=False)))
    for num_workers in (0, 2):
        parts = [
            _loader_keys(SampleStream(pattern, dp_rank=r, dp_size=2, seed=5), num_workers)
            for r in range(2)
        ]
        assert all(parts), "a rank got no samples"
        assert sorted(parts[0] + parts[1]) == total
        assert not set(parts[0]) & set(parts[1])


def test_bad_inputs_are_skipped_and_counted(tmp_path, caplog):
    rng = np.random.default_rng(1)

    def wave(seconds, channels=1, rate=RATE):
        shape = (int(rate * seconds), channels) if channels > 1 else int(rate * seconds)
        return rng.uniform(-0.5, 0.5, shape).astype(np.float32)

    good = {"answer": "fine"}
    truncated = _audio_bytes(wave(0.3))
    samples = [
        {"__key__": "good", "flac": _audio_bytes(wave(0.2)), "json": good},
        {"__key__": "truncated", "flac": truncated[: len(truncated) // 2], "json": good},
        {"__key__": "noanswer", "flac": _audio_bytes(wave(0.2)), "json": {"context": "x"}},
        {"__key__": "blank", "flac": _audio_bytes(wave(0.2)), "json": {"answer": "  "}},
        {"__key__": "zerobytes", "flac": b"", "json": good},
        {"__key__": "zeroframes", "wav": _audio_bytes(wave(0.0), fmt="WAV"), "json": good},
        {"__key__": "noaudio", "json": good},
        {"__key__": "nojson", "flac": _audio_bytes(wave(0.2))},
        {"__key__": "badjson", "flac": _audio_bytes(wave(0.2)), "json": b"{not json"},
        {"__key__": "numbertask", "flac": _audio_bytes(wave(0.2)), "json": {**good, "task": 7}},
        {"__key__": "noprompt", "flac": _audio_bytes(wave(0.2)), "json": {**good, "task": "qa"}},
        {"__key__": "long", "flac": _audio_bytes(wave(1.0)), "json": good},
        {"__key__": "short", "flac": _audio_bytes(wave(0.02)), "json": good},
        {
            "__key__": "stereo",
            "wav": _audio_bytes(wave(0.3, channels=2, rate=44100), rate=44100, fmt="WAV"),
            "json": {"text": "two channels", "duration": 0.3},
        },
    ]
    _write(str(tmp_path / "bad-%04d.tar"), samples, per_shard=100)
    with open(tmp_path / "empty.tar", "wb") as f, wds.TarWriter(f):
        pass
    _write(str(tmp_path / "cut-%04d.tar"), samples[:1] + samples[-1:], per_shard=100)
    data = (tmp_path / "cut-0000.tar").read_bytes()
    (tmp_path / "cut-0000.tar").write_bytes(data[:20000])  # inside the stereo WAV (~100 kB)

    shards = [str(tmp_path / n) for n in ("bad-0000.tar", "empty.tar", "cut-0000.tar")]
    caplog.set_level(logging.WARNING, logger="salm_megatron.data.loader")
    stream = SampleStream(
        shards, shuffle=False, min_duration=0.05, max_duration=0.6, max_warnings=3
    )
    seen = list(stream)

    assert [s["key"] for s in seen] == ["good", "stereo", "good"]
    stereo = seen[1]
    assert stereo["audio"].shape == (round(0.3 * RATE),) and stereo["answer"] == "two channels"
    assert {k: v for k, v in stream.stats.items() if v} == {
        "bad_audio": 2,  # truncated FLAC, a WAV header without samples
        "empty_audio": 1,
        "no_answer": 1,
        "empty_answer": 1,
        "no_audio": 1,
        "no_json": 1,
        "bad_json": 2,  # not JSON; a task that is not a string
        "no_instruction": 1,  # task qa has no default instruction and the sample no context
        "too_long": 1,
        "too_short": 1,
        "empty_shard": 1,
        "bad_shard": 1,  # the cut tar: its first sample came through, the rest is skipped
    }
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 3
    assert "bad-0000.tar: truncated (bad_audio)" in warnings[0]


def test_missing_shard_is_an_error_naming_it(corpus, tmp_path):
    missing = str(tmp_path / "nope-0003.tar")
    with pytest.raises(FileNotFoundError, match="nope-0003.tar"):
        SampleStream([str(corpus["root"] / "train-0000.tar"), missing])
    with pytest.raises(FileNotFoundError, match=r"nothing-\*\.tar"):
        SampleStream(str(tmp_path / "nothing-*.tar"))
    with pytest.raises(FileNotFoundError, match="4 of 10 shards do not exist: '.*train-0006.tar'"):
        SampleStream(str(corpus["root"] / "train-{0000..0009}.tar"))


def test_resume_in_process_continues_the_same_order(corpus):
    full = _keys(SampleStream(corpus["pattern"], seed=7, shuffle_buffer=8))
    first = SampleStream(corpus["pattern"], seed=7, shuffle_buffer=8)
    it = iter(first)
    head = [next(it)["key"] for _ in range(13)]
    state = json.loads(json.dumps(first.state_dict()))
    second = SampleStream(corpus["pattern"], seed=7, shuffle_buffer=8)
    second.load_state_dict(state)
    assert head + _keys(second) == full

    other = SampleStream(corpus["pattern"], seed=8, shuffle_buffer=8)
    with pytest.raises(ValueError, match="seed=7"):
        other.load_state_dict(state)


def test_resume_with_two_workers_and_two_dp_ranks(corpus):
    def make(rank):
        return SampleStream(corpus["pattern"], seed=11, shuffle_buffer=4, dp_rank=rank, dp_size=2)

    seen = []
    for rank in range(2):
        stream = make(rank)
        loader = iter(DataLoader(stream, batch_size=None, num_workers=2, prefetch_factor=4))
        seen += [stream.observe(next(loader))["key"] for _ in range(5 + rank)]
        state = json.loads(json.dumps(stream.state_dict()))
        del loader  # prefetched but unobserved samples must come back after the resume
        assert state["num_workers"] == 2 and len(state["workers"]) == 2

        resumed = make(rank)
        resumed.load_state_dict(state)
        seen += _loader_keys(resumed, num_workers=2)

    wrong = make(1)
    wrong.load_state_dict(state)
    with pytest.raises(ValueError, match="saved with 2 DataLoader workers, resuming with 1"):
        next(iter(wrong))
    assert sorted(seen) == sorted(corpus["expected"])


def test_conversations_among_single_turn_samples_resume_exactly(tmp_path):
    rng = np.random.default_rng(1)
    samples, waves = [], {}
    for i in range(12):
        key, wave = f"s{i:02d}", rng.uniform(-0.5, 0.5, 1600 + 160 * i).astype(np.float32)
        if i % 3 == 0:  # single-turn, as ever
            samples.append({"__key__": key, "flac": _audio_bytes(wave), "json": {"answer": "a"}})
            waves[key] = [wave]
        elif i % 3 == 1:  # two segments
            turns = [{"role": "user", "content": [{"audio": 0}, "and", {"audio": 1}]},
                     {"role": "assistant", "content": f"answer {i}"}]  # fmt: skip
            audio = {"0.flac": _audio_bytes(wave), "1.flac": _audio_bytes(wave[:800])}
            samples.append({"__key__": key, **audio, "json": {"conversation": turns}})
            waves[key] = [wave, wave[:800]]
        else:  # text only
            turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
            samples.append({"__key__": key, "json": {"conversation": turns}})
            waves[key] = []
    _write(str(tmp_path / "mixed-%04d.tar"), samples, per_shard=3)

    def make():
        return SampleStream(str(tmp_path / "mixed-*.tar"), seed=5, shuffle_buffer=4)

    full = list(LoadedStream(make(), num_workers=2))
    assert sorted(s["key"] for s in full) == sorted(waves)
    for sample in full:
        got = sample["segments"] if "conversation" in sample else [sample["audio"]]
        assert [len(w) for w in got] == [len(w) for w in waves[sample["key"]]]
        for g, w in zip(got, waves[sample["key"]], strict=True):
            np.testing.assert_allclose(g.numpy(), w, atol=FLAC_TOL)
    first = LoadedStream(make(), num_workers=2)
    it = iter(first)
    head = [next(it)["key"] for _ in range(5)]
    state = json.loads(json.dumps(first.state_dict()))
    del it
    resumed = LoadedStream(make(), num_workers=2)
    resumed.load_state_dict(state)
    assert head + [s["key"] for s in resumed] == [s["key"] for s in full]


def test_resume_refuses_another_shuffle_buffer_or_rewritten_shards(corpus, tmp_path):
    for i in range(2):
        shutil.copy(corpus["root"] / f"train-000{i}.tar", tmp_path / f"train-000{i}.tar")
    pattern = str(tmp_path / "train-{0000..0001}.tar")
    first = SampleStream(pattern, seed=5, shuffle_buffer=4)
    it = iter(first)
    head = [next(it)["key"] for _ in range(5)]
    state = json.loads(json.dumps(first.state_dict()))
    assert state["shuffle_buffer"] == 4 and state["shard_sizes"].startswith("2 shards, sha1 ")

    with pytest.raises(ValueError, match="shuffle_buffer=4, this stream has 8"):
        SampleStream(pattern, seed=5, shuffle_buffer=8).load_state_dict(state)
    old = {k: v for k, v in state.items() if k not in ("shuffle", "shuffle_buffer", "shard_sizes")}
    resumed = SampleStream(pattern, seed=5, shuffle_buffer=4)
    resumed.load_state_dict(old)  # saved before they were recorded: loads, and resumes exactly
    assert head + _keys(resumed) == _keys(SampleStream(pattern, seed=5, shuffle_buffer=4))

    with tarfile.open(tmp_path / "train-0001.tar") as tar:  # its first 3 samples, same name
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()[:6]]
    with tarfile.open(tmp_path / "train-0001.tar", "w") as tar:
        for member, data in members:
            tar.addfile(member, io.BytesIO(data))
    rewritten = SampleStream(pattern, seed=5, shuffle_buffer=4)
    with pytest.raises(ValueError, match="loader state has shard_sizes='2 shards, sha1 "):
        rewritten.load_state_dict(state)


def test_repeat_runs_epochs_and_resumes_across_the_boundary(corpus):
    pattern = str(corpus["root"] / "train-{0000..0001}.tar")  # 12 samples

    def make():
        return SampleStream(pattern, seed=2, shuffle_buffer=4, repeat=True)

    it = iter(make())
    reference = [(s["position"]["epoch"], s["key"]) for s in (next(it) for _ in range(30))]
    assert [e for e, _ in reference] == [0] * 12 + [1] * 12 + [2] * 6
    assert reference[:12] != reference[12:24]

    first = make()
    it = iter(first)
    head = [(s["position"]["epoch"], s["key"]) for s in (next(it) for _ in range(17))]
    second = make()
    second.load_state_dict(first.state_dict())
    it = iter(second)
    tail = [(s["position"]["epoch"], s["key"]) for s in (next(it) for _ in range(13))]
    assert head + tail == reference


@pytest.mark.parametrize("num_workers", [0, 1])
def test_repeat_with_nothing_to_yield_is_an_error_not_a_hang(corpus, num_workers):
    """In a DataLoader worker too: the main process gets the loader's own one-line error."""
    stream = SampleStream(str(corpus["root"] / "train-0000.tar"), repeat=True, max_duration=0.01)
    with pytest.raises(NoSamplesError) as error:
        next(iter(LoadedStream(stream, num_workers=num_workers)))
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith(
        "no sample to train on: DP rank 0 worker 0 skipped every sample of its share of 1 "
        "shard for 1 reader, epoch 0 (too_long 6); the first: "
    )
    assert "train-0000.tar: utt" in message and "> max_duration 0.01" in message


def _one_shard(tmp_path, metas: list[dict]) -> str:
    wave = np.zeros(1600, dtype=np.float32)
    samples = [{"__key__": f"k{i}", "wav": _audio_bytes(wave, fmt="WAV"), "json": meta}
               for i, meta in enumerate(metas)]  # fmt: skip
    _write(str(tmp_path / "s-%04d.tar"), samples, per_shard=100)
    return str(tmp_path / "s-0000.tar")


def test_task_and_instruction_defaults(tmp_path):
    """A bare transcript (webdataset's ShardWriter with {"text"}) is ASR; a sample with its own
    context keeps it and is not taken for ASR; default_context replaces default instructions."""
    shard = _one_shard(tmp_path, [
        {"text": "a bare transcript"},
        {"answer": "nine", "context": "What is the last number?"},
        {"answer": "hallo", "task": "ast", "lang": "German"},
        {"answer": "hallo", "task": "ast"},  # no lang for the default instruction
        {"answer": "two", "task": "count"},  # no default instruction for the task
    ])  # fmt: skip

    def read(**options):
        stream = SampleStream(shard, shuffle=False, **options)
        return {s["key"]: (s["task"], s["context"]) for s in stream}, stream.stats

    seen, stats = read()
    assert seen == {
        "k0": ("asr", "Transcribe the audio."),
        "k1": (None, "What is the last number?"),
        "k2": ("ast", "Translate the audio into German."),
    }
    assert stats["no_instruction"] == 2

    seen, stats = read(default_task=None, default_context="Answer the question.")
    assert seen["k0"] == (None, "Answer the question.")
    assert seen["k1"] == (None, "What is the last number?")
    assert seen["k3"] == ("ast", "Answer the question.") and len(seen) == 5
    assert stats["no_instruction"] == 0

    seen, stats = read(default_task=None)
    assert "k0" not in seen and stats["no_instruction"] == 3
