"""Proves `salm train` end to end in real processes: the loss falls (SALM, BESTOW); a run killed
between or during checkpoint writes resumes to the very losses and sample keys of an uninterrupted
run (DP=2, optimizer state in the default dp_reshardable format, written in the background);
checkpoints saved at TP=2 with a fully_reshardable optimizer resume at TP=1 and PP=2, and TP=2 x
PP=2 follows TP=1 for 10 steps, while a dp_reshardable one is refused at another TP, naming the
field; a validation set smaller than DP ranks x workers validates as one rank does; a packed run
(data.packing) killed mid-run resumes to the uninterrupted run's losses bit for bit; an MoE run
(tiny-moe) checkpointed at EP=2 resumes at EP=1 with EP=2's next loss, gradient norm and
load-balancing loss (reported in metrics.jsonl and the progress line), its experts resharded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from megatron.core import dist_checkpointing

from tests.conftest import launch
from tests.speech_fixtures import training_config, write_speech_shards

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("speech-data")


def train(data_dir: Path, out: Path, nprocs: int, *overrides: str, arch="salm", **kwargs) -> str:
    """``salm train`` (via torchrun) on the tiny task with ``overrides``; returns its output."""
    config = data_dir / f"{arch}.yaml"
    if not config.exists():
        config.write_text(yaml.safe_dump(training_config(data_dir, arch)))
    return launch(
        "salm_megatron.train", nprocs, str(config), f"train.output_dir={out}", *overrides,
        **kwargs,
    )  # fmt: skip


def records(out: Path, kind: str = "train") -> dict[int, dict]:
    """The last record of each step in metrics.jsonl (a resumed run repeats steps)."""
    found = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == kind:
            found[record["step"]] = record
    return found


def sample_keys(out: Path) -> dict[tuple[str, int], list[str]]:
    """(DP rank file, step) -> the keys that step consumed; the last write of a step wins."""
    found = {}
    for path in sorted((out / "sample_keys").glob("dp*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            found[path.stem, record["step"]] = record["keys"]
    return found


@pytest.mark.parametrize("arch", ["salm", "bestow"])
def test_loss_falls(data_dir, tmp_path, arch):
    train(data_dir, tmp_path, 1, "train.steps=30", "train.eval_interval=30", "train.eval_iters=2",
          "train.eval_wer_samples=4", arch=arch)  # fmt: skip
    losses = [r["loss"] for _, r in sorted(records(tmp_path).items())]
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, losses
    (valid,) = records(tmp_path, "valid").values()
    assert valid["accuracy"] > 0.5 and valid["loss"] < first, valid
    assert {"wer", "answer_accuracy"} <= set(valid)  # 4 validation samples were decoded
    assert (tmp_path / "checkpoints" / "step_0000030").is_dir()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_killed_runs_resume_exactly(data_dir, tmp_path):
    """DP=2 (the distributed optimizer shards over it; each DP rank reads its own samples)."""
    common = ("train.steps=12", "checkpoint.interval=4", "train.log_sample_keys=true",
              "train.eval_interval=3", "train.eval_iters=1")  # fmt: skip
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    ckpts = broken / "checkpoints"
    train(data_dir, whole, 2, *common)

    # Background checkpoints; SIGKILL (rank 0) while completing checkpoint 8: its files are
    # written but the folder is not renamed, so the newest complete one is step 4.
    out = train(data_dir, broken, 2, *common, "checkpoint.async_save=true",
                env={"SALM_FAULT": "checkpoint:8"}, check=False)  # fmt: skip
    assert "SALM_FAULT: killing rank 0 at checkpoint of step 8" in out
    assert (ckpts / ".step_0000008.tmp" / "metadata.json").is_file()
    assert (ckpts / "latest").read_text() == "step_0000004"
    # Resumed from the background-written step 4; killed between checkpoints, after step 10.
    out = train(data_dir, broken, 2, *common, env={"SALM_FAULT": "step:10"}, check=False)
    assert "resumed from" in out and "step_0000004 at step 4" in out
    assert "SALM_FAULT: killing rank 0 at step of step 10" in out
    assert (ckpts / "latest").read_text() == "step_0000008"
    # Resumed from step 8; runs to the end.
    out = train(data_dir, broken, 2, *common)
    assert "step_0000008 at step 8" in out

    expected, got = records(whole), records(broken)
    assert sorted(got) == list(range(1, 13))
    for step, record in expected.items():  # fp32 on CPU: bit for bit
        assert got[step]["loss"] == record["loss"], (step, got[step]["loss"], record["loss"])
        assert got[step]["grad_norm"] == record["grad_norm"], step
    assert records(broken, "valid") == records(whole, "valid")  # validation leaves no trace
    assert sample_keys(broken) == sample_keys(whole)
    assert len(sample_keys(whole)) == 24  # 12 steps x 2 DP ranks
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "latest",
        "step_0000004",
        "step_0000008",
        "step_0000012",
    ]
    for step in ckpts.glob("step_*"):  # each rank wrote its own optimizer shard, nothing gathered
        recorded = dist_checkpointing.load_content_metadata(str(step))
        assert recorded["distrib_optim_sharding_type"] == "dp_reshardable", step


def test_packed_run_killed_resumes_exactly(data_dir, tmp_path):
    """data.packing at PP=2 (the stages share each row's bounds): SIGKILL after step 5
    (checkpoint at 4), resume: the losses, gradient norms and sample keys of the uninterrupted
    run, bit for bit; rows nearly full."""
    common = ("data.packing=true", "data.pack_tokens=104", "train.steps=8",
              "checkpoint.interval=4", "train.log_sample_keys=true",
              "parallel.pipeline_model_parallel_size=2")  # fmt: skip
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    train(data_dir, whole, 2, *common)
    out = train(data_dir, broken, 2, *common, env={"SALM_FAULT": "step:5"}, check=False)
    assert "SALM_FAULT: killing rank 0 at step of step 5" in out
    out = train(data_dir, broken, 2, *common)
    assert "step_0000004 at step 4" in out
    expected, got = records(whole), records(broken)
    assert sorted(got) == list(range(1, 9))
    for step, record in expected.items():
        assert got[step]["loss"] == record["loss"], (step, got[step]["loss"], record["loss"])
        assert got[step]["grad_norm"] == record["grad_norm"], step
    assert sample_keys(broken) == sample_keys(whole)
    fill = [r["useful_token_fraction"] for r in expected.values()]
    assert min(fill) > 0.85, fill  # whole samples of 20-30 positions in rows of 104
    assert all(r["samples"] > 0 for r in expected.values())


def test_checkpoints_reshard_across_layouts(data_dir, tmp_path):
    """Saved at TP=2 (optimizer state fully_reshardable); resumed at TP=1, PP=2 and TP=2 x PP=2
    (4 ranks). The next step's loss matches TP=2's, and TP=2 x PP=2 follows TP=1 for 10 steps.
    TP=1's own checkpoint (dp_reshardable, the default) is refused at TP=2, naming the field.
    (LayerNorm in the encoder's conv modules: TP ranks encode different segments, so BatchNorm's
    batch statistics would differ.)"""
    tp2 = tmp_path / "tp2"
    norm = "encoder.conv_norm_type=layer_norm"
    train(data_dir, tp2, 2, "parallel.tensor_model_parallel_size=2", "checkpoint.interval=2",
          "checkpoint.keep=null", "train.steps=3", "checkpoint.optimizer_format=fully_reshardable",
          norm)  # fmt: skip

    def resumed(name: str, nprocs: int, steps: int, *layout: str) -> dict[int, dict]:
        out = tmp_path / name
        (out / "checkpoints").mkdir(parents=True)
        shutil.copytree(tp2 / "checkpoints" / "step_0000002", out / "checkpoints" / "step_0000002")
        log = train(data_dir, out, nprocs, f"train.steps={steps}", norm, *layout)
        assert "step_0000002 at step 2" in log
        return records(out)

    tp1 = resumed("tp1", 1, 12)
    pp2 = resumed("pp2", 2, 3, "parallel.pipeline_model_parallel_size=2")
    tp2_pp2 = resumed("tp2-pp2", 4, 12, "parallel.tensor_model_parallel_size=2",
                      "parallel.pipeline_model_parallel_size=2")  # fmt: skip

    reference = records(tp2)[3]["loss"]
    for name, run in (("TP=1", tp1), ("PP=2", pp2), ("TP=2 x PP=2", tp2_pp2)):
        assert abs(run[3]["loss"] - reference) <= 1e-6 * reference, (name, run[3], reference)
    assert tp1[12]["loss"] < 0.9 * tp1[3]["loss"]  # it learns: the comparison below means much
    for step in range(3, 13):
        a, b = tp2_pp2[step]["loss"], tp1[step]["loss"]
        assert abs(a - b) <= 1e-6 * b, (step, a, b)

    out = train(data_dir, tmp_path / "tp1", 2, "train.steps=13", norm,
                "parallel.tensor_model_parallel_size=2", check=False)  # fmt: skip
    assert "holds its optimizer state as checkpoint.optimizer_format=dp_reshardable" in out, out
    assert "(TP=1, PP=1, VPP=1), not at this run's (TP=2, PP=1, VPP=1)" in out, out


def test_validation_smaller_than_ranks_x_workers_equals_one_rank(data_dir, tmp_path):
    """3 validation samples for 2 DP ranks x 2 workers: one worker reads none, one DP rank has a
    single sample; every rank still joins the sums, and the result is one rank's on the same
    samples (optim.lr=0: both validate the initial weights; LayerNorm: no batch statistics)."""
    valid = write_speech_shards(tmp_path / "valid3", 3, seed=2000)
    common = ("train.steps=1", "train.eval_interval=1", "train.eval_iters=4", "optim.lr=0",
              "encoder.conv_norm_type=layer_norm", "data.num_workers=2",
              f"data.valid_shards={valid}")  # fmt: skip
    train(data_dir, tmp_path / "dp1", 1, *common)
    train(data_dir, tmp_path / "dp2", 2, *common)
    (one,) = records(tmp_path / "dp1", "valid").values()
    (two,) = records(tmp_path / "dp2", "valid").values()
    assert one["samples"] == two["samples"] == 3  # each sample once, none dropped or repeated
    assert abs(two["loss"] - one["loss"]) <= 1e-5 * one["loss"], (one, two)
    assert two["accuracy"] == one["accuracy"]


def test_moe_checkpoint_at_ep2_resumes_at_ep1(data_dir, tmp_path):
    """tiny-moe SALM on 2 ranks: EP=2 (carved from DP=2: each rank holds 2 of the 4 experts,
    tokens cross to the other rank's), optimizer state fully_reshardable, checkpoint at step 2,
    on to step 3. Resumed from step 2 at EP=1 (DP=2, every rank all 4 experts), step 3 has the
    same loss, gradient norm and load-balancing loss (fp32; the experts' sums run over other
    token groupings, so required within rounding; observed equal bit for bit)."""
    vocab = training_config(data_dir, "salm")["llm"]["vocab_size"]  # the preset replaces it
    moe = ("llm.preset=tiny-moe", f"llm.vocab_size={vocab}", "llm.moe_aux_loss_coeff=0.01",
           "encoder.conv_norm_type=layer_norm")  # fmt: skip
    ep2, ep1 = tmp_path / "ep2", tmp_path / "ep1"
    log = train(data_dir, ep2, 2, *moe, "parallel.expert_model_parallel_size=2", "train.steps=3",
                "checkpoint.interval=2", "checkpoint.keep=null",
                "checkpoint.optimizer_format=fully_reshardable")  # fmt: skip
    assert "ep 2 (gloo)" in log and "| load balancing " in log, log[-3000:]
    (ep1 / "checkpoints").mkdir(parents=True)
    shutil.copytree(ep2 / "checkpoints" / "step_0000002", ep1 / "checkpoints" / "step_0000002")
    log = train(data_dir, ep1, 2, *moe, "train.steps=3")
    assert "step_0000002 at step 2" in log and "RNG reseeded" in log, log[-3000:]
    expected, got = records(ep2)[3], records(ep1)[3]
    for key in ("loss", "grad_norm", "load_balancing_loss"):
        assert abs(got[key] - expected[key]) <= 1e-6 * abs(expected[key]), (key, got, expected)
    assert 0.5 < expected["load_balancing_loss"] < 4.0  # about 1 when balanced, E = 4 at most
