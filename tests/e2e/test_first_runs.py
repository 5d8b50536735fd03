"""Proves what a new user's first `salm train` runs meet, run as a user runs them: shards written
by webdataset's own ShardWriter with only {"text"} train as ASR, samples without an instruction
are skipped and counted, and a run with nothing to train on, missing shards, or a checkpoint of
another model shape or data-parallel size ends in one line naming the problem (exit 2), with no
traceback."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile
import yaml

from tests.conftest import REPO
from tests.speech_fixtures import training_config, waveform


def _wav(seconds: float, seed: int) -> bytes:
    out = io.BytesIO()
    soundfile.write(out, waveform(seconds, seed=seed).numpy(), 16000, format="WAV")
    return out.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A tokenizer, a config, and shards made outside the project: webdataset's ShardWriter with
    `<key>.wav` + `<key>.json` holding {"text"}; in `mixed/` a quarter of them are questions
    (task "qa") without a context, which no default instruction fits."""
    import webdataset as wds

    root = tmp_path_factory.mktemp("first-runs")
    config = training_config(root, "salm")
    for name, every in (("plain", 0), ("mixed", 4)):
        (root / name).mkdir()
        with wds.ShardWriter(str(root / name / "part-%03d.tar"), maxcount=16, verbose=0) as sink:
            for i in range(16):
                meta = {"text": f"word {i % 4}"}
                if every and i % every == 0:
                    meta["task"] = "qa"
                sink.write({"__key__": f"{name}{i:03d}", "wav": _wav(0.3, i), "json": meta})
    config["data"]["train_shards"] = str(root / "plain" / "part-000.tar")
    config["data"].pop("valid_shards")
    config["train"].update(steps=2, num_microbatches=1)
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    return root


def salm_train(folder: Path, *overrides: str, nprocs: int = 1) -> subprocess.CompletedProcess:
    """`salm train run.yaml ...` (or under torchrun), as typed in a shell."""
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": path}
    args = [str(folder / "run.yaml"), *overrides]
    if nprocs == 1:  # the console script the install made
        cmd = [str(Path(sys.executable).with_name("salm")), "train"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nprocs}", "-m", "salm_megatron.train"]  # fmt: skip
    return subprocess.run([*cmd, *args], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=240)  # fmt: skip


def one_error_line(proc: subprocess.CompletedProcess, status: int = 2) -> str:
    """The run's single `salm train: error:` line (exit 2, no traceback from the project;
    torchrun exits 1 and reports the rank's 2 in its summary below)."""
    assert proc.returncode == status, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("salm train: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr.split("torch/distributed/elastic")[0], proc.stderr
    return lines[0]


def records(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


@pytest.fixture(scope="module")
def trained(folder) -> Path:
    """Two steps on the plain shards, checkpointed at the end."""
    out = folder / "trained"
    proc = salm_train(folder, f"train.output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_webdataset_shards_with_only_text_train_as_asr(trained):
    assert [r["skipped_samples"] for r in records(trained)] == [0, 0]


def test_samples_without_an_instruction_are_skipped_and_counted(folder, tmp_path):
    out = tmp_path / "run"
    shards = f"data.train_shards={folder / 'mixed' / 'part-000.tar'}"
    proc = salm_train(folder, shards, f"train.output_dir={out}", "train.steps=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = records(out)[-1]
    assert set(last["skipped"]) == {"no_instruction"} and last["skipped_samples"] >= 4
    assert f"skipped samples {last['skipped_samples']} (no_instruction " in proc.stderr
    assert "task 'qa', which has no default instruction" in proc.stderr  # the loader's warning

    # data.default_context gives them one: nothing is skipped
    out = tmp_path / "with-context"
    proc = salm_train(folder, shards, f"train.output_dir={out}",
                      "data.default_context=Answer about the audio.")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert records(out)[-1]["skipped_samples"] == 0


def test_nothing_to_train_on_is_one_line(folder, tmp_path):
    line = one_error_line(salm_train(folder, "data.default_task=null"))  # in a loader worker
    assert line.startswith(
        "salm train: error: no sample to train on: DP rank 0 worker 0 skipped every sample of "
        "its share of 1 shard for 1 reader, epoch 0 (no_instruction 16); the first: "
    )
    assert "part-000.tar: plain" in line and "the sample has no context and no task" in line


@pytest.mark.multiprocess
@pytest.mark.parametrize("nprocs", [1, 2])
def test_missing_shards_are_one_line_before_anything_starts(folder, tmp_path, nprocs):
    out = tmp_path / "run"
    missing = tmp_path / "nowhere" / "shard-{000000..000003}.tar"
    proc = salm_train(folder, f"data.train_shards={missing}", f"train.output_dir={out}",
                      nprocs=nprocs)  # fmt: skip
    line = one_error_line(proc, status=2 if nprocs == 1 else 1)
    nowhere = tmp_path / "nowhere"
    assert line == (
        f"salm train: error: data.train_shards: 4 of 4 shards do not exist: "
        f"'{nowhere}/shard-000000.tar', '{nowhere}/shard-000001.tar', "
        f"'{nowhere}/shard-000002.tar', '{nowhere}/shard-000003.tar'"
    )
    assert "resolved config" not in proc.stderr and not out.exists()  # nothing was started


def test_resume_with_another_model_shape_names_the_fields(folder, trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    saved = (out / "config.yaml").read_text()
    proc = salm_train(folder, f"train.output_dir={out}", "train.steps=3", "llm.hidden_size=96",
                      "llm.num_layers=2")  # fmt: skip
    line = one_error_line(proc)
    assert line == (
        f"salm train: error: {out}/checkpoints/step_0000002 holds another model than this run "
        "(llm.num_layers: checkpoint 4, this run 2; llm.hidden_size: checkpoint 64, this run 96)"
        ": resume with the checkpoint's values, or start this run in another train.output_dir"
    )
    assert (out / "config.yaml").read_text() == saved  # the run's own config is kept

    # settings that leave every shape alone resume as before
    proc = salm_train(folder, f"train.output_dir={out}", "train.steps=3", "optim.lr=1e-3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and [r["step"] for r in records(out)][-1] == 3


def test_resume_at_another_data_parallel_size_is_one_line(folder, trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    proc = salm_train(folder, f"train.output_dir={out}", "train.steps=3", nprocs=2)
    line = one_error_line(proc, status=1)  # torchrun's own exit status
    assert line.startswith(
        f"salm train: error: {out}/checkpoints/step_0000002 was saved with data-parallel size 1, "
        "this run has 2: the data stream cannot continue where it stopped"
    )
