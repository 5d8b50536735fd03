"""Proves the launch path on a real one-node SLURM (started here; skipped where it cannot run):
slurm/train_bestow.sbatch trains 2 tasks and checkpoints, slurm/eval.sbatch scores that
checkpoint; SIGUSR1 to a slurm/train_salm.sbatch job makes every rank save a checkpoint, the job
requeues itself and resumes from it to the end; NeMo-Run's SlurmExecutor (local tunnel) submits
the salm_tiny recipe, which trains and checkpoints. Without SLURM: a
stop signal to one rank of two still stops both after a common checkpoint, with exit status 75."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests import slurm_cluster
from tests.conftest import REPO, launch
from tests.speech_fixtures import training_config

pytestmark = pytest.mark.multiprocess

# 2 tasks of 1 CPU, whatever the scripts ask for a GPU cluster.
SMALL = ["--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0", "--time=00:10:00"]


@pytest.fixture(scope="module")
def cluster():
    try:
        running = slurm_cluster.start()
    except slurm_cluster.Unavailable as err:
        pytest.skip(str(err))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Tiny shards, tokenizer and run.yaml, in a folder the jobs can read."""
    folder = tmp_path_factory.mktemp("slurm-data")
    (folder / "run.yaml").write_text(yaml.safe_dump(training_config(folder, "salm")))
    return folder


def job_env() -> dict[str, str]:
    return {"SALM": f"{sys.executable} -m salm_megatron.cli", "PYTHONPATH": str(REPO),
            "PYTHONWARNINGS": "ignore"}  # fmt: skip


def submit(cluster, script: str, out: Path, *args: str) -> str:
    """sbatch from the repository root (the scripts find salm-env.sh there); log to ``out``."""
    return cluster.sbatch(*SMALL, f"--output={out}", str(REPO / "slurm" / script), *args,
                          env=job_env(), cwd=REPO)  # fmt: skip


def train_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if r["kind"] == "train"]


def test_sbatch_trains_bestow_and_evaluates(cluster, data, tmp_path):
    run, log = tmp_path / "run", tmp_path / "train.out"
    job = submit(cluster, "train_bestow.sbatch", log, str(data / "run.yaml"),
                 f"train.output_dir={run}", "train.steps=3")  # fmt: skip
    state = cluster.wait(job)
    text = log.read_text()
    assert (state["JobState"], state["ExitCode"]) == ("COMPLETED", "0:0"), text[-4000:]
    assert f"job {job} (restart 0): 2 tasks on 1 node(s)" in text
    assert "world 2 = tp 1 x pp 1 x cp 1 x dp 2" in text
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["arch"] == "bestow"
    assert train_steps(run) == [1, 2, 3]
    assert (run / "checkpoints" / "latest").read_text() == "step_0000003"

    out, log = tmp_path / "eval", tmp_path / "eval.out"
    job = submit(cluster, "eval.sbatch", log, "--checkpoint", str(run), "--data",
                 str(data / "valid" / "shard-000000.tar"), "--out", str(out),
                 "--tensor-parallel", "1", "--limit", "2", "--max-new-tokens", "4")  # fmt: skip
    state = cluster.wait(job)
    assert (state["JobState"], state["ExitCode"]) == ("COMPLETED", "0:0"), log.read_text()[-4000:]
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 4  # 2 per DP rank
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["utterances"] == 4 and "wer" in metrics["metrics"]["asr"]


def test_signal_checkpoints_requeues_and_resumes(cluster, data, tmp_path):
    run, log = tmp_path / "run", tmp_path / "train.out"
    job = submit(cluster, "train_salm.sbatch", log, str(data / "run.yaml"),
                 f"train.output_dir={run}", "train.steps=30",
                 "checkpoint.interval=null")  # fmt: skip
    deadline = time.time() + 120
    while len(train_steps(run)) < 2:  # training has begun
        assert time.time() < deadline and cluster.job(job)["JobState"] in ("PENDING", "RUNNING")
        time.sleep(0.2)
    cluster.command("scancel", "--batch", "--signal=USR1", job)  # as --signal=B:USR1@120 does

    def requeued(j: dict) -> bool:
        # fully requeued: back in the queue, held until its begin time
        return j["JobState"] == "PENDING" and j["Restarts"] == "1" and j["Reason"] == "BeginTime"

    cluster.wait(
        job, timeout=120, until=lambda j: requeued(j) or j["JobState"] in slurm_cluster.TERMINAL
    )
    # SLURM holds a requeued job back for two minutes; start it sooner, though not at once:
    # slurmd refuses to launch a job id it has just killed ("already killed").
    cluster.command("scontrol", "update", f"JobId={job}", "StartTime=now+10")
    state = cluster.wait(job, timeout=150)
    text = log.read_text()
    assert (state["JobState"], state["ExitCode"], state["Restarts"]) == ("COMPLETED", "0:0", "1"), (
        f"{state}\n{text[-5000:]}"
    )
    stopped = [line for line in text.splitlines() if "preempted: SIGUSR1 at step" in line]
    assert len(stopped) == 2, text[-5000:]  # each rank: the same step, the same checkpoint
    step = int(stopped[0].split("at step ")[1].split(":")[0])
    assert stopped[0] == stopped[1] and 2 <= step < 30
    # srun names the tasks that exited alike together ("task 1: ...", "tasks 0-1: ...").
    assert re.search(r"tasks? [0-9,-]+: Exited with exit code 75", text), text[-5000:]
    assert f"requeueing job {job} to resume" in text and f"job {job} (restart 1)" in text
    assert f"checkpoints/step_{step:07d} at step {step}" in text  # resumed from it
    steps = train_steps(run)
    assert steps[step:] == list(range(step + 1, 31)) and sorted(set(steps)) == list(range(1, 31))
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["latest", f"step_{step:07d}", "step_0000030"]


def test_nemo_run_slurm_executor_trains_tiny(cluster, data, tmp_path):
    """Submitted by NeMo-Run (--detach: its waiting polls sacct, which needs SLURM's accounting
    database; this cluster has none), then followed with scontrol."""
    pytest.importorskip("nemo_run", reason="nemo-run is the launcher here: pip install nemo-run")
    tiny = training_config(data, "salm")
    run, home = tmp_path / "run", tmp_path / "nemo-run-home"
    cmd = [sys.executable, "-m", "recipes", "--factory", "salm_tiny", "--executor", "slurm",
           "--detach", "executor.gpus_per_node=0", "executor.ntasks_per_node=2",
           "executor.partition=debug", "executor.time=00:10:00",
           f"data.train_shards={tiny['data']['train_shards']}",
           f"data.tokenizer={tiny['data']['tokenizer']}",
           f"llm.vocab_size={tiny['llm']['vocab_size']}", f"train.output_dir={run}",
           "train.steps=3"]  # fmt: skip
    env = {
        **cluster.env,
        **job_env(),
        # Not ".../nemo_run": NeMo-Run 0.11.1 rewrites every "/nemo_run" in its sbatch script
        # (its in-container run folder) to the job folder, which mangles such a home's paths.
        "NEMORUN_HOME": str(home),
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
    }
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    jobs = [line for line in cluster.command("scontrol", "show", "job", "-o").splitlines()
            if "JobName=salm.salm_tiny " in line]  # fmt: skip
    assert len(jobs) == 1, jobs
    job = jobs[0].split("JobId=")[1].split()[0]
    state = cluster.wait(job)
    logs = "\n".join(p.read_text() for p in home.rglob("*.out"))
    assert (state["JobState"], state["ExitCode"]) == ("COMPLETED", "0:0"), logs[-4000:]
    assert train_steps(run) == [1, 2, 3]
    assert (run / "checkpoints" / "latest").read_text() == "step_0000003"
    assert "world 2 = tp 1 x pp 1 x cp 1 x dp 2" in logs  # ranks from SLURM_PROCID, no torchrun


def test_stop_signal_to_one_rank_stops_all(data, tmp_path):
    """Under torchrun, without SLURM: SIGUSR1 to rank 1 only. Both ranks agree at the next step
    boundary, save one checkpoint, and exit 75; running again resumes from it."""
    run = tmp_path / "run"
    args = [str(data / "run.yaml"), f"train.output_dir={run}", "train.steps=40",
            "checkpoint.interval=null"]  # fmt: skip
    env = {**os.environ, **job_env(), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "salm_megatron.train", *args]  # fmt: skip
    with open(tmp_path / "log", "w+") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 120
            while len(train_steps(run)) < 2:
                assert time.time() < deadline and proc.poll() is None, log.read()
                time.sleep(0.2)
            os.kill(_rank_pid(proc.pid, 1), signal.SIGUSR1)
            status = proc.wait(timeout=120)
        finally:
            proc.kill()
        log.seek(0)
        text = log.read()
    assert status != 0, text[-3000:]  # torchrun reports the workers' 75 as a failure
    # Both ranks print it, possibly interleaved on one line.
    stopped = re.findall(r"preempted: SIGUSR1 at step (\d+):", text)
    assert len(stopped) == 2 and stopped[0] == stopped[1], text[-3000:]
    assert "exitcode  : 75" in text, text[-3000:]  # torchrun's summary of the failed workers
    step = int(stopped[0])
    assert (run / "checkpoints" / "latest").read_text() == f"step_{step:07d}"
    out = launch("salm_megatron.train", 2, *args, f"train.steps={step + 2}")
    assert f"step_{step:07d} at step {step}" in out
    assert train_steps(run)[-2:] == [step + 1, step + 2]


def _rank_pid(torchrun_pid: int, rank: int) -> int:
    """The worker process of ``rank`` under torchrun (its environment says RANK)."""
    import psutil

    for child in psutil.Process(torchrun_pid).children():  # not their data-loader processes
        try:
            if child.environ().get("RANK") == str(rank) and "salm_megatron.train" in " ".join(
                child.cmdline()
            ):
                return child.pid
        except psutil.Error:
            continue
    raise AssertionError(f"no worker with RANK={rank} under torchrun {torchrun_pid}")
