"""Proves the NeMo-Run recipes: every recipe's layout fits its machines (world size, batch) and
survives the trip through NeMo-Run's config (field by field overridable, rebuilt equal); the CLI
rejects bad input by name; the executors set each task's environment; `salm_tiny` trains and
checkpoints through NeMo-Run's LocalExecutor with torchrun and 2 CPU processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from recipes import TRAINING
from tests.conftest import REPO
from tests.speech_fixtures import training_config

run = pytest.importorskip("nemo_run", reason="nemo-run is the launcher here: pip install nemo-run")

import fiddle as fdl  # noqa: E402  (comes with nemo-run)
from nemo_run.core.serialization.zlib_json import ZlibJSONSerializer  # noqa: E402

from recipes import factories  # noqa: E402
from recipes.__main__ import build  # noqa: E402


def built_config(partial):
    """The config the worker gets: the recipe serialized as NeMo-Run ships it, then built."""
    serializer = ZlibJSONSerializer()
    return fdl.build(serializer.deserialize(serializer.serialize(partial))).keywords["config"]


@pytest.mark.parametrize("name", sorted(TRAINING))
def test_layouts_fit_their_machines(name):
    recipe = TRAINING[name]
    config = recipe.config()
    config.parallel.validate_world(recipe.world_size)
    dp = config.parallel.data_parallel_size(recipe.world_size)
    assert config.train.microbatches(config.data, dp) >= 1
    partial = factories.training(config)
    assert built_config(partial) == config  # the worker rebuilds exactly this config
    partial.config.train.steps = 7  # any field can be changed on the recipe
    partial.config.optim.lr = 1e-5
    rebuilt = built_config(partial)
    assert rebuilt.train.steps == 7 and rebuilt.optim.lr == 1e-5
    partial.config.train.steps = 0  # the worker validates what it builds
    with pytest.raises(ValueError, match="train.steps=0 must be a positive integer"):
        built_config(partial)


def test_recipe_specifics():
    big = TRAINING["salm_llama3_70b"].config()
    assert (big.parallel.tensor_model_parallel_size, big.parallel.pipeline_model_parallel_size,
            big.parallel.sequence_parallel, big.llm.fp8) == (8, 4, True, "hybrid")  # fmt: skip
    lora = TRAINING["salm_llama3_8b"].config()
    assert lora.model.freeze_llm and lora.encoder.num_layers == 24  # Canary-size FastConformer
    if hasattr(lora, "lora"):
        assert lora.lora.rank == 32
    assert TRAINING["bestow_llama3_8b"].config().model.arch == "bestow"
    moe = TRAINING["salm_qwen3_30b_a3b"].config()  # checkpoints reshard to EP=1 for `salm eval`
    assert (moe.llm.num_moe_experts, moe.parallel.expert_model_parallel_size,
            moe.checkpoint.optimizer_format) == (128, 8, "fully_reshardable")  # fmt: skip


def test_executors_launch_kernels_in_issue_order(tmp_path, monkeypatch):
    """Every task gets CUDA_DEVICE_MAX_CONNECTIONS=1 (Megatron's TP/SP overlap needs it)."""
    from recipes import executors

    monkeypatch.setenv("NEMORUN_HOME", str(tmp_path / "runs"))
    for executor in (executors.local(), executors.slurm(account="a", partition="p")):
        assert executor.env_vars["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
        assert executor.env_vars["OMP_NUM_THREADS"] == "1"


def test_cli_builds_and_rejects():
    task, executor = build(
        "salm_llama3_8b", "slurm",
        ["executor.account=speech", "executor.nodes=2", "train.steps=10"],
    )  # fmt: skip
    assert executor.nodes == 2 and executor.ntasks_per_node == 8 and executor.retries == 3
    assert executor.signal == "USR1@120" and built_config(task).train.steps == 10
    script, executor = build(
        "salm_eval", "slurm",
        ["checkpoint=runs/x", "data=[a.tar, b.tar]", "out=o", "tensor_parallel=8"],
    )  # fmt: skip
    assert script.args == ["eval", "--checkpoint", "runs/x", "--data", "a.tar", "b.tar",
                           "--out", "o", "--tensor-parallel", "8"]  # fmt: skip
    with pytest.raises(ValueError, match="world size 8 is not divisible by .* = 32"):
        build("salm_llama3_70b", "slurm", ["executor.nodes=1"])
    with pytest.raises(ValueError, match="unknown field train.stepz"):
        build("salm_tiny", "local", ["train.stepz=3"])
    with pytest.raises(ValueError, match="local executor has no argument 'nodes'"):
        build("salm_tiny", "local", ["executor.nodes=3"])
    with pytest.raises(ValueError, match="'salm_huge' is not one of salm_tiny"):
        build("salm_huge", "local", [])
    with pytest.raises(ValueError, match="salm_eval needs checkpoint, out"):
        build("salm_eval", "local", ["data=x.tar"])


def test_local_executor_trains_tiny(tmp_path):
    """python -m recipes --factory salm_tiny --executor local: torchrun, 2 CPU processes (DP 2)."""
    data = tmp_path / "data"
    tiny = training_config(data, "salm")
    out = tmp_path / "run"
    overrides = [
        f"data.train_shards={tiny['data']['train_shards']}",
        f"data.tokenizer={tiny['data']['tokenizer']}",
        f"llm.vocab_size={tiny['llm']['vocab_size']}",
        f"train.output_dir={out}", "train.steps=4", "checkpoint.interval=2",
        "train.log_interval=1",
    ]  # fmt: skip
    env = {**os.environ, "NEMORUN_HOME": str(tmp_path / "nemo_run"), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "recipes", "--factory", "salm_tiny", "--executor", "local",
           *overrides]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=280)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r["kind"] == "train"] == [1, 2, 3, 4]
    assert all(r["loss"] > 0 for r in steps if r["kind"] == "train")
    checkpoints = out / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_0000004"
    assert (checkpoints / "step_0000002").is_dir()
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["train"]["steps"] == 4 and resolved["data"]["micro_batch_size"] == 4
    assert "world 2 = tp 1 x pp 1 x cp 1 x dp 2" in log, log[-3000:]
