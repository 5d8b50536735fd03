"""Proves, with `salm train` run as a user runs it, that a resume reading the data otherwise than
its checkpoint did (shuffle buffer, bucket window, duration filter, tokenizer files, shards
rewritten under the same names) is refused in one line naming each setting and both values before
anything trains; that a checkpoint from before settings were recorded still resumes, with a
warning; that a fresh run over an earlier one is refused unless `checkpoint.start_over` moves the
earlier run aside; and that a run started with relative paths saves them absolute."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
import yaml

from salm_megatron.inference.loading import saved_config
from tests.e2e.test_first_runs import one_error_line, records, salm_train
from tests.speech_fixtures import training_config


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Shards, a tokenizer and a run.yaml naming them relative to this folder (the runs start
    here, as a user's do in a project folder)."""
    root = tmp_path_factory.mktemp("resume-settings")
    config = training_config(root, "salm")
    tokenizer = Path(config["data"]["tokenizer"]).relative_to(root)
    config["data"].update(train_shards="train/shard-{000000..000003}.tar", tokenizer=str(tokenizer))
    config["data"].pop("valid_shards")
    config["train"].update(steps=2, num_microbatches=1)
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    return root


@pytest.fixture(scope="module")
def trained(folder) -> Path:
    """Two steps, checkpointed at the end, in `trained/` (relative, as typed)."""
    proc = salm_train(folder, "train.output_dir=trained")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder / "trained"


def _copy(trained: Path, out: Path) -> Path:
    shutil.copytree(trained, out)
    return out


def test_a_run_saves_its_paths_absolute(folder, trained):
    config = yaml.safe_load((trained / "config.yaml").read_text())
    assert config["data"]["train_shards"] == f"{folder}/train/shard-{{000000..000003}}.tar"
    assert config["train"]["output_dir"] == f"{folder}/trained"
    saved = saved_config(trained / "checkpoints" / "step_0000002")  # what salm eval/export read
    assert Path(saved.data.tokenizer).is_absolute() and Path(saved.data.tokenizer).exists()
    assert saved.data.train_shards == config["data"]["train_shards"]


def test_changed_data_settings_are_refused_naming_both_values(folder, trained, tmp_path):
    out = _copy(trained, tmp_path / "run")
    before = (out / "metrics.jsonl").read_text(), (out / "config.yaml").read_text()
    tokenizer = tmp_path / "tokenizer"  # the same vocabulary, other special-token settings
    shutil.copytree(folder / "tokenizer", tokenizer)
    named = json.loads((tokenizer / "tokenizer_config.json").read_text())
    (tokenizer / "tokenizer_config.json").write_text(json.dumps({**named, "model_max_length": 9}))
    proc = salm_train(folder, f"train.output_dir={out}", "train.steps=3", "data.shuffle_buffer=4",
                      "data.bucket_window=8", "data.max_duration=1.5",
                      f"data.tokenizer={tokenizer}")  # fmt: skip
    line = one_error_line(proc)
    prefix = (
        f"salm train: error: {out}/checkpoints/step_0000002 was trained reading the data "
        "otherwise than this run would (data.bucket_window: checkpoint 16, this run 8; "
        "data.shuffle_buffer: checkpoint 8, this run 4; data.max_duration: checkpoint 40.0, "
        "this run 1.5; data.tokenizer: checkpoint sha1 "
    )
    assert line.startswith(prefix), line
    assert line.endswith(
        "resuming would read samples twice or never. Resume with the checkpoint's values, or "
        "start over (checkpoint.start_over=true) or in another train.output_dir"
    )
    assert "data.train_shards" not in line  # the same shards
    assert ((out / "metrics.jsonl").read_text(), (out / "config.yaml").read_text()) == before


def test_shards_rewritten_under_the_same_names_are_refused(folder, trained, tmp_path):
    out = _copy(trained, tmp_path / "run")
    shards = tmp_path / "train"
    shutil.copytree(folder / "train", shards)
    with tarfile.open(shards / "shard-000003.tar") as tar:  # half its samples, same name
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()[:16]]
    with tarfile.open(shards / "shard-000003.tar", "w") as tar:
        for member, data in members:
            tar.addfile(member, io.BytesIO(data))
    pattern = shards / "shard-{000000..000003}.tar"
    line = one_error_line(salm_train(folder, f"train.output_dir={out}", "train.steps=3",
                                     f"data.train_shards={pattern}"))  # fmt: skip
    assert "(data.train_shards: checkpoint 4 shards, sha1 " in line
    assert line.count("4 shards, sha1 ") == 2 and "resuming would read samples twice" in line

    # the same files elsewhere (a copy, another path): the same data, so it resumes
    shutil.copy(folder / "train" / "shard-000003.tar", shards / "shard-000003.tar")
    proc = salm_train(folder, f"train.output_dir={out}", "train.steps=3",
                      f"data.train_shards={pattern}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step_0000002 at step 2" in proc.stderr and records(out)[-1]["step"] == 3


def test_a_checkpoint_from_before_settings_were_recorded_resumes_with_a_warning(
    folder, trained, tmp_path
):
    out = _copy(trained, tmp_path / "run")

    def as_before(state):  # the loader's own state, as version 1 wrote it, wherever it nests
        if isinstance(state, dict):
            if "shards_fingerprint" in state:
                for name in ("shuffle", "shuffle_buffer", "shard_sizes"):
                    del state[name]
            for value in state.values():
                as_before(value)
        elif isinstance(state, list):
            for value in state:
                as_before(value)

    for rank_file in (out / "checkpoints" / "step_0000002" / "ranks").glob("rank*.pt"):
        state = torch.load(rank_file, weights_only=True)
        del state["data_settings"]
        as_before(state["data"])
        assert "shards_fingerprint" in str(state["data"]) and "shard_sizes" not in str(state)
        torch.save(state, rank_file)
    proc = salm_train(folder, f"train.output_dir={out}", "train.steps=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("records no data settings (saved before checkpoints did)") == 1
    assert "step_0000002 at step 2" in proc.stderr and records(out)[-1]["step"] == 3


def test_a_fresh_run_over_an_earlier_one_is_refused_unless_it_starts_over(
    folder, trained, tmp_path
):
    out = _copy(trained, tmp_path / "run")
    earlier = (out / "metrics.jsonl").read_text()
    line = one_error_line(salm_train(folder, f"train.output_dir={out}", "checkpoint.resume=false"))
    assert line.startswith(f"salm train: error: checkpoint.resume=false, but {out}/checkpoints ")
    assert "set checkpoint.start_over=true to move that run's outputs aside" in line

    proc = salm_train(folder, f"train.output_dir={out}", "checkpoint.start_over=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" not in proc.stderr and f"to {out}/old-run-1" in proc.stderr
    assert (out / "old-run-1" / "metrics.jsonl").read_text() == earlier
    assert (out / "old-run-1" / "checkpoints" / "step_0000002" / "metadata.json").is_file()
    assert [r["step"] for r in records(out)] == [1, 2]  # its own metrics, from step 1
    assert (out / "checkpoints" / "latest").read_text() == "step_0000002"
