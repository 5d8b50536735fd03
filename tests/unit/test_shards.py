"""Proves `salm shards` turns manifests into webdataset shards holding exactly the input samples
(text, fields, offset/duration segments of the audio), capped, deterministic, independent of the
number of workers, with every kind of bad row reported by line and skipped or fatal (exit 2)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import webdataset as wds

from salm_megatron.cli import main
from salm_megatron.data import shards
from salm_megatron.data.audio_io import decode
from salm_megatron.data.manifest import key_prefixes, parse_row, safe_key


def _tone(seconds: float, rate: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    """Deterministic speech-like audio: a few tones plus a little noise, [n] or [n, channels]."""
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    wave = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.2 * np.sin(2 * np.pi * 523 * t + seed)
    wave = wave + 0.02 * rng.standard_normal(len(t))
    if channels == 1:
        return wave.astype(np.float32)
    return np.stack([wave * (0.5 + 0.5 * c) for c in range(channels)], axis=1).astype(np.float32)


@pytest.fixture
def corpus(tmp_path) -> Path:
    """audio/: 16 kHz mono WAV (1 s), 44.1 kHz stereo WAV (0.8 s), 22.05 kHz mono FLAC (1.5 s)."""
    audio = tmp_path / "audio"
    audio.mkdir()
    soundfile.write(audio / "a.wav", _tone(1.0, 16000, seed=1), 16000)
    soundfile.write(audio / "b.wav", _tone(0.8, 44100, channels=2, seed=2), 44100)
    soundfile.write(audio / "c.flac", _tone(1.5, 22050, seed=3), 22050, subtype="PCM_16")
    (audio / "bad.wav").write_text("this is not audio")
    return tmp_path


def _manifest(path: Path, rows: list) -> Path:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows),
        encoding="utf-8",
    )
    return path


def _good_rows(root: Path) -> list[dict]:
    return [
        {"audio_filepath": "audio/a.wav", "duration": 1.0, "text": "hello world"},
        {
            "audio_filepath": "audio/b.wav",
            "duration": 0.8,
            "answer": "bonjour",
            "context": "Translate to French.",
            "task": "ast",
            "lang": "fr",
            "speaker": {"id": 7},
        },
        {
            "audio_filepath": "audio/c.flac",
            "offset": 0.5,
            "duration": 0.6,
            "text": "a segment",
            "question": "What is said?",
            "task": "sqa",
        },
        {
            "audio_filepath": str(root / "audio" / "a.wav"),  # absolute
            "offset": 0.25,
            "duration": 0.5,
            "text": "the middle",
            "answer": "the middle, answered",  # answer wins; text is kept as a field
        },
    ]


def _many_rows(n: int) -> list[dict]:
    return [
        {
            "audio_filepath": "audio/a.wav",
            "offset": 0.05 * i,
            "duration": 0.4,
            "text": f"row {i}",
        }
        for i in range(n)
    ]


def _run(*args) -> int:
    return main(["shards", *map(str, args)])


def _index(out: Path) -> dict:
    return json.loads((out / "index.json").read_text())


def _read(out: Path) -> list[tuple[str, bytes, dict]]:
    """(key, flac bytes, json) of every sample, in shard order, through webdataset itself."""
    urls = [str(out / s["path"]) for s in _index(out)["shards"]]
    return [
        (s["__key__"], s["flac"], json.loads(s["json"]))
        for s in wds.WebDataset(urls, shardshuffle=False)
    ]


def _shard_bytes(out: Path) -> list[bytes]:
    return [(out / s["path"]).read_bytes() for s in _index(out)["shards"]]


def test_round_trip_keeps_text_fields_and_audio_segments(corpus, capsys):
    manifest = _manifest(corpus / "train.jsonl", _good_rows(corpus))
    out = corpus / "shards"
    assert _run(manifest, "--out", out, "--workers", 1, "--seed", 3) == 0
    assert "wrote 1 shards, 4 samples" in capsys.readouterr().out

    samples = {key: (flac, meta) for key, flac, meta in _read(out)}
    assert sorted(samples) == [f"train-{i:06d}" for i in range(1, 5)]
    metas = {key: meta for key, (_, meta) in samples.items()}
    assert metas["train-000001"] == {"answer": "hello world", "duration": 1.0}
    assert metas["train-000002"] == {
        "answer": "bonjour",
        "context": "Translate to French.",
        "task": "ast",
        "lang": "fr",
        "speaker": {"id": 7},
        "duration": 0.8,
    }
    assert metas["train-000003"] == {
        "answer": "a segment",
        "context": "What is said?",
        "task": "sqa",
        "duration": 0.6,
    }
    assert metas["train-000004"] == {
        "answer": "the middle, answered",
        "text": "the middle",
        "duration": 0.5,
    }

    audio = corpus / "audio"
    expected = {
        "train-000001": decode(audio / "a.wav"),
        "train-000002": decode(audio / "b.wav"),
        "train-000003": decode(audio / "c.flac", offset=0.5, duration=0.6),
        "train-000004": decode(audio / "a.wav", offset=0.25, duration=0.5),
    }
    for key, (flac, _) in samples.items():
        wave, rate = soundfile.read(io.BytesIO(flac), dtype="float32")
        info = soundfile.info(io.BytesIO(flac))
        assert (rate, wave.ndim, info.format, info.subtype) == (16000, 1, "FLAC", "PCM_16")
        torch.testing.assert_close(torch.from_numpy(wave), expected[key], atol=1e-4, rtol=0)
    # the offset is honoured: at 16 kHz the segment is the original's samples 4000..12000
    original, _ = soundfile.read(audio / "a.wav", dtype="float32")
    wave, _ = soundfile.read(io.BytesIO(samples["train-000004"][0]), dtype="float32")
    np.testing.assert_allclose(wave, original[4000:12000], atol=1e-4, rtol=0)

    index = _index(out)
    assert index["total_samples"] == 4
    assert index["total_hours"] == pytest.approx((1.0 + 0.8 + 0.6 + 0.5) / 3600, rel=1e-4)
    assert index["skipped"] == {} and index["rows"] == 4
    assert index["settings"]["seed"] == 3 and index["settings"]["sample_rate"] == 16000
    assert not list(out.glob("*.tmp"))


def test_shards_are_capped_by_count_and_bytes(corpus):
    manifest = _manifest(corpus / "many.jsonl", _many_rows(12))
    by_count = corpus / "by_count"
    assert _run(manifest, "--out", by_count, "--max-shard-samples", 5, "--workers", 1) == 0
    index = _index(by_count)
    assert [s["samples"] for s in index["shards"]] == [5, 5, 2]
    assert [s["path"] for s in index["shards"]] == [f"shard-{i:06d}.tar" for i in range(3)]
    assert index["total_samples"] == 12
    assert index["total_hours"] == pytest.approx(12 * 0.4 / 3600, rel=1e-4)
    assert sum(s["hours"] for s in index["shards"]) == pytest.approx(index["total_hours"])
    for shard in index["shards"]:
        assert shard["bytes"] == (by_count / shard["path"]).stat().st_size
        with tarfile.open(by_count / shard["path"]) as tar:
            names = tar.getnames()
        assert len(names) == 2 * shard["samples"]
        assert all(name.count(".") == 1 for name in names)  # keys hold no dots

    # one sample (0.4 s of noisy FLAC) is a bit over 10 kB: a 30 kB cap holds two or three
    by_bytes = corpus / "by_bytes"
    assert _run(manifest, "--out", by_bytes, "--max-shard-bytes", "30k", "--workers", 1) == 0
    index = _index(by_bytes)
    assert len(index["shards"]) > 3 and index["total_samples"] == 12
    for shard in index["shards"]:
        assert shard["bytes"] <= 30_000 or shard["samples"] == 1
    # the same samples in the same order, only cut differently
    assert [k for k, *_ in _read(by_bytes)] == [k for k, *_ in _read(by_count)]


def test_same_seed_same_shards_other_seed_other_order(corpus):
    manifest = _manifest(corpus / "many.jsonl", _many_rows(12))
    outs = {}
    for name, seed in (("one", 7), ("again", 7), ("other", 8)):
        outs[name] = corpus / name
        assert _run(manifest, "--out", outs[name], "--seed", seed, "--workers", 1) == 0
    assert _shard_bytes(outs["one"]) == _shard_bytes(outs["again"])
    order = [key for key, *_ in _read(outs["one"])]
    other = [key for key, *_ in _read(outs["other"])]
    assert sorted(order) == sorted(other) and order != other
    assert order != sorted(order)  # shuffled at all


def test_two_workers_write_the_same_shards_as_one(corpus, capsys):
    manifest = _manifest(corpus / "many.jsonl", _many_rows(10) + _good_rows(corpus))
    one, two = corpus / "one", corpus / "two"
    assert _run(manifest, "--out", one, "--workers", 1, "--max-shard-samples", 4) == 0
    assert _run(manifest, "--out", two, "--workers", 2, "--max-shard-samples", 4) == 0
    assert _shard_bytes(one) == _shard_bytes(two)
    assert len(_shard_bytes(one)) == 4
    assert "salm shards: 14/14 samples" in capsys.readouterr().err  # the progress line


def _bad_rows(root: Path) -> list:
    return [
        {"audio_filepath": "audio/a.wav", "duration": 1.0, "text": "good"},  # 1
        '{"audio_filepath": "audio/a.wav", "text": ',  # 2 invalid JSON
        {"duration": 1.0, "text": "no audio"},  # 3
        {"audio_filepath": "audio/nope.wav", "duration": 1.0, "text": "x"},  # 4 missing file
        {"audio_filepath": "audio/bad.wav", "duration": 1.0, "text": "x"},  # 5 unreadable
        {"audio_filepath": "audio/a.wav", "duration": 1.0, "text": "  "},  # 6 empty text
        {"audio_filepath": "audio/a.wav", "duration": 1.0},  # 7 no text
        {"audio_filepath": "audio/a.wav", "duration": -1.0, "text": "x"},  # 8
        {"audio_filepath": "audio/a.wav", "duration": 0, "text": "x"},  # 9
        {"audio_filepath": "audio/a.wav", "offset": 5.0, "duration": 1.0, "text": "x"},  # 10
        {"audio_filepath": "audio/a.wav", "offset": 0.5, "duration": 2.0, "text": "x"},  # 11
        "",  # 12 blank lines are not rows
        {"audio_filepath": "audio/a.wav", "offset": -1, "text": "x"},  # 13
        "[1, 2]",  # 14 not an object
        {"audio_filepath": "audio/c.flac", "text": "good, no duration: to the end"},  # 15
    ]


def test_bad_rows_are_reported_by_line_and_counted(corpus, capsys, caplog):
    manifest = _manifest(corpus / "bad.jsonl", _bad_rows(corpus))
    out = corpus / "out"
    assert _run(manifest, "--out", out, "--workers", 1) == 0
    index = _index(out)
    assert index["skipped"] == {
        "invalid_json": 2,
        "missing_audio_filepath": 1,
        "missing_text": 2,
        "bad_duration": 2,
        "bad_offset": 1,
        "missing_file": 1,
        "unreadable_audio": 1,
        "offset_past_end": 1,
        "segment_past_end": 1,
    }
    assert index["total_samples"] == 2 and index["rows"] == 14
    assert index["total_hours"] == pytest.approx((1.0 + 1.5) / 3600, rel=1e-4)
    reported = {}
    for line in index["skipped_rows"]:
        where, reason, _ = line.split(": ", 2)
        reported[int(where.rsplit(":", 1)[1])] = reason
        assert where.startswith(str(manifest))
    assert reported == {
        2: "invalid_json",
        3: "missing_audio_filepath",
        4: "missing_file",
        5: "unreadable_audio",
        6: "missing_text",
        7: "missing_text",
        8: "bad_duration",
        9: "bad_duration",
        10: "offset_past_end",
        11: "segment_past_end",
        13: "bad_offset",
        14: "invalid_json",
    }
    assert f"{manifest}:4: missing_file" in caplog.text
    printed = capsys.readouterr().out
    assert "skipped 12 of 14 rows: invalid_json 2," in printed


@pytest.mark.parametrize(
    ("line", "reason"), [(2, "invalid_json"), (4, "missing_file"), (11, "segment_past_end")]
)
def test_on_error_fail_stops_at_the_first_bad_row(corpus, capsys, line, reason):
    rows = _bad_rows(corpus)
    rows = rows[:1] + [r for i, r in enumerate(rows[1:], start=2) if i in (line, 12)]
    # lines 1, 4..9 good, 2 bad: shuffled with seed 0, lines 6 and then 2 come first, so the
    # audio errors meet a finished shard, which is removed too
    manifest = _manifest(corpus / "bad.jsonl", rows + [rows[0]] * 6)
    out = corpus / "out"
    assert _run(manifest, "--out", out, "--on-error", "fail", "--max-shard-samples", 1) == 2
    err = capsys.readouterr().err
    assert f"salm shards: error: {manifest}:2: {reason}: " in err
    assert "--on-error skip" in err
    assert not out.exists() or not list(out.iterdir())  # no shard, no index left behind


def test_interrupted_run_leaves_no_shard_that_looks_complete(corpus, monkeypatch):
    manifest = _manifest(corpus / "many.jsonl", _many_rows(6))
    calls = []

    def interrupted(row, sample_rate):
        calls.append(row)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(row, sample_rate)

    real = shards.encode_row
    monkeypatch.setattr(shards, "encode_row", interrupted)
    out = corpus / "out"
    with pytest.raises(KeyboardInterrupt):
        _run(manifest, "--out", out, "--workers", 1, "--max-shard-samples", 2)
    assert sorted(p.name for p in out.iterdir()) == ["shard-000000.tar"]  # complete: 2 samples
    with tarfile.open(out / "shard-000000.tar") as tar:
        assert len(tar.getnames()) == 4


def test_flags_are_validated(corpus, capsys):
    manifest = _manifest(corpus / "train.jsonl", _good_rows(corpus))
    out = corpus / "out"
    for flags, message in [
        (["--workers", "0"], "--workers=0 must be a positive integer"),
        (["--max-shard-samples", "-1"], "--max-shard-samples=-1 must be a positive integer"),
        (["--max-shard-bytes", "100"], "--max-shard-bytes=100 must be at least 10240"),
        (["--sample-rate", "16"], "--sample-rate=16 must be an integer in [1000, 655350]"),
    ]:
        assert _run(manifest, "--out", out, *flags) == 2
        assert message in capsys.readouterr().err
    assert _run(corpus / "missing.jsonl", "--out", out) == 2
    assert "missing.jsonl is not a file" in capsys.readouterr().err
    for flags in (["--on-error", "ignore"], ["--max-shard-bytes", "lots"], ["--workers", "x"]):
        with pytest.raises(SystemExit) as exit_:
            _run(manifest, "--out", out, *flags)
        assert exit_.value.code == 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        _run("--help")
    assert exit_.value.code == 0 and "example: salm shards" in capsys.readouterr().out

    assert _run(manifest, "--out", out, "--workers", 1) == 0
    (out / "notes.txt").write_text("mine")
    assert _run(manifest, "--out", out, "--workers", 1) == 2
    err = capsys.readouterr().err
    assert "is not empty (holds index.json, notes.txt, shard-000000.tar)" in err
    assert "--overwrite" in err
    (out / "shard-000007.tar").write_text("stale")
    assert _run(manifest, "--out", out, "--workers", 1, "--overwrite") == 0
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "notes.txt", "shard-000000.tar"]


def test_sizes_keys_and_rows():
    assert shards.parse_size("500M") == 500_000_000
    assert shards.parse_size("1GiB") == 2**30 and shards.parse_size("10240") == 10240
    assert safe_key("a.b/c d") == "a_b_c_d"
    assert key_prefixes(["x/train.clean.jsonl", "y/train.clean.jsonl", "dev.json"]) == [
        "train_clean",
        "train_clean_2",
        "dev",
    ]
    row = parse_row(
        '{"audio_filepath": "a.wav", "text": "hi", "offset": null}', "m/x.jsonl", 3, "k"
    )
    assert row.offset == 0.0 and row.duration is None and row.audio.endswith("m/a.wav")
    assert parse_row(b"\xff\xfe", "m.jsonl", 1, "k").reason == "invalid_json"
    bad = parse_row('{"audio_filepath": "a.wav", "text": "hi", "duration": NaN}', "m", 1, "k")
    assert bad.reason == "bad_duration"
