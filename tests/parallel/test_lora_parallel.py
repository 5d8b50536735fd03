"""Proves LoRA across processes: at TP=2, with and without SP, a LoRA LLM gives TP=1's logits, loss
and adapter gradients (adapters resharded from a TP=1 checkpoint) and merging changes no logit;
`salm train` with LoRA on a frozen pretrained LLM and encoder writes LoRA-only checkpoints at TP=2
(optimizer state fully_reshardable) that resume at TP=1 (adapters and their optimizer state
resharded) with the same losses."""

import shutil
from pathlib import Path

import pytest
import torch
from megatron.core import dist_checkpointing

from salm_megatron.config import ParallelConfig, apply_overrides, config_from_dict
from salm_megatron.models import build_speech_llm
from salm_megatron.training import checkpoint
from tests.conftest import REPO, free_port, launch
from tests.parallel import equivalence as eq
from tests.parallel import lora_worker
from tests.parallel.test_training import records, train
from tests.speech_fixtures import training_config

pytestmark = pytest.mark.multiprocess

WORKER = REPO / "tests/parallel/lora_worker.py"
PARTS = tuple(
    f"{target}.{factor}.weight"
    for target in ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
    for factor in ("lora_a", "lora_b")
)


def test_tp2_and_sp_match_tp1_and_merge_exactly(tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    lora_worker.main(["--workdir", str(tmp_path), "--reference"])  # here: one process less
    launch(WORKER, 2, "--workdir", str(tmp_path), "--tp", "2", "--name", "tp2")
    for name in ("tp2", "tp2-sp"):
        results = eq.read_results(tmp_path, name)
        eq.check_results(results, 2, PARTS)
        for r in results:
            assert r["merged"] < eq.TOL, (name, r["rank"], r["merged"])


# LayerNorm in the encoder's conv modules: TP ranks encode different segments, so BatchNorm's
# batch statistics would differ between TP=1 and TP=2.
NORM = "encoder.conv_norm_type=layer_norm"
LORA = ("lora.rank=4", "lora.alpha=8", "model.freeze_llm=true", "model.freeze_encoder=true",
        "model.freeze_adapter=true", NORM, "train.steps=4", "checkpoint.keep=null")  # fmt: skip


def _pretrained(data_dir: Path, out: Path) -> list[str]:
    """A pretrained LLM and encoder for the tiny task (saved here, at TP=1)."""
    from salm_megatron import parallel

    cfg = apply_overrides(config_from_dict(training_config(data_dir, "salm")), [NORM])
    parallel.initialize(ParallelConfig(), seed=5, rank=0, world_size=1)
    try:
        torch.manual_seed(5)
        (model,) = build_speech_llm(cfg)
        checkpoint.save_module(model.llm, out / "llm")
        checkpoint.save_module(model.audio.encoder, out / "encoder")
    finally:
        parallel.teardown()
    return [f"checkpoint.pretrained_llm={out / 'llm'}",
            f"checkpoint.pretrained_encoder={out / 'encoder'}"]  # fmt: skip


def test_lora_only_checkpoints_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    data_dir = tmp_path / "data"
    pretrained = _pretrained(data_dir, tmp_path / "pretrained")
    whole = tmp_path / "whole"
    tp2 = "parallel.tensor_model_parallel_size=2"
    train(data_dir, whole, 2, *LORA, *pretrained, tp2, "checkpoint.interval=2",
          "checkpoint.optimizer_format=fully_reshardable")  # fmt: skip
    step2 = whole / "checkpoints" / "step_0000002"
    assert checkpoint.left_out(step2) == ["llm.", "audio.encoder."]
    saved = sum(f.stat().st_size for f in step2.rglob("*") if f.is_file())
    base = sum(f.stat().st_size for f in (tmp_path / "pretrained").rglob("*") if f.is_file())
    assert saved < 0.5 * base, (saved, base)  # the frozen weights are not in it...
    weights = [k for k in dist_checkpointing.load_tensors_metadata(str(step2)) if "." in k]
    assert {k.split(".")[0] for k in weights} == {"llm", "audio", "optimizer"}
    assert all(".lora_" in k for k in weights if k.startswith("llm."))  # ...only the adapters
    assert not [k for k in weights if k.startswith("audio.encoder.")]

    # Resumed at TP=1: step 3 starts from the saved adapters, step 4 also from their Adam moments,
    # both resharded (bit for bit at the same layout: tests/unit/test_lora.py).
    tp1 = tmp_path / "tp1"
    (tp1 / "checkpoints").mkdir(parents=True)
    shutil.copytree(step2, tp1 / "checkpoints" / step2.name)
    log = train(data_dir, tp1, 1, *LORA, *pretrained)
    assert "step_0000002 at step 2" in log and "loaded pretrained LLM" in log
    expected, resharded = records(whole), records(tp1)
    for step in (3, 4):
        a, b = resharded[step]["loss"], expected[step]["loss"]
        assert abs(a - b) <= 1e-6 * b, (step, a, b)
