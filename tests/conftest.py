"""Shared test fixtures: launching real multi-process jobs over gloo, and skip markers."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def launch(
    script: Path | str,
    nprocs: int,
    *args: str,
    env: dict | None = None,
    timeout: int = 240,
    check: bool = True,
) -> str:
    """Run ``script`` (a path, or a module name such as ``salm_megatron.train``) under torchrun
    with ``nprocs`` processes; raise with its output on failure unless ``check=False``."""
    target = [str(script)] if isinstance(script, Path) else ["-m", script]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nprocs}",
        *target,
        *args,
    ]
    full_env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        **(env or {}),
    }
    # Output to a file, and every process of the job tagged: a rank killed with SIGKILL leaves
    # orphans (the Manager process dist_checkpointing spawns) that would hold a pipe open and
    # outlive the test; whatever carries the tag is killed once torchrun returns.
    full_env["SALM_TEST_JOB"] = tag = uuid.uuid4().hex
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT)
        try:
            returncode = proc.wait(timeout=timeout)
        finally:
            _kill_tagged(tag)
            proc.wait()
        log.seek(0)
        output = log.read()
    if check and returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({returncode}):\n{output[-6000:]}")
    return output


def _kill_tagged(tag: str) -> None:
    """SIGKILL every process whose environment has ``SALM_TEST_JOB=tag``."""
    import psutil

    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if process.environ().get("SALM_TEST_JOB") == tag:
                process.kill()


def nemo_reference():
    """tools/check_nemo_reference.py, where NeMo can be imported (else the test is skipped)."""
    pytest.importorskip(
        "nemo.collections.asr", reason="NeMo is the reference here: pip install nemo-toolkit[asr]"
    )
    path = REPO / "tools" / "check_nemo_reference.py"
    spec = importlib.util.spec_from_file_location("check_nemo_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pytest_configure(config):
    """Only ``pytest -m gpu`` (tests/gpu) sees the GPUs. Every other test runs on the CPU also
    where a GPU is: they compare with fp32 CPU references and launch several processes on one
    machine over gloo (NCCL would put them all on one device). CUDA is not initialised yet here,
    so hiding the devices holds for this process and the jobs it launches."""
    if (config.option.markexpr or "").strip() != "gpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def single_rank(monkeypatch):
    """Megatron parallel state for one process (TP=PP=1) inside the test process."""
    from salm_megatron import parallel
    from salm_megatron.config import ParallelConfig

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    parallel.initialize(ParallelConfig(), seed=1234, rank=0, world_size=1)
    yield
    parallel.teardown()
