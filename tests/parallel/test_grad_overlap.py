"""Proves DDP's overlapped gradient reduction and parameter all-gather (the defaults) train as the
unoverlapped path does, in real processes: SALM with TP ranks splitting the audio, CTC on, the
distributed optimizer, at DP=2, TP=2 x DP=2 and interleaved PP=2 x VPP=2 x DP=2 — the same
losses, grad norms and validation loss over several steps, with several buckets reduced during
the backward pass (on the first pipeline stage; Megatron gives later stages and chunks one
bucket each); and that checkpoints and validation see whole parameters although each rank holds
only its own shard until the next forward pass."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, launch
from tests.speech_fixtures import training_config

WORKER = REPO / "tests/parallel/grad_overlap_worker.py"
# Small buckets, so the tiny model has several; a CTC head, which a rank's micro-batch may leave
# without a gradient (its bucket is then reduced after the backward pass).
SETTINGS = ("optim.bucket_size=20000", "model.ctc_weight=0.3", "train.eval_iters=1")
TOL = 1e-5  # the bucket split changes the distributed optimizer's shards and sum orders

# processes, overrides, the ranks of the first pipeline stage (those with several buckets)
LAYOUTS = {
    "dp2": (2, (), (0, 1)),
    "tp2-dp2": (4, ("parallel.tensor_model_parallel_size=2",), (0, 1, 2, 3)),
    "pp2-vpp2-dp2": (
        4,
        ("parallel.pipeline_model_parallel_size=2",
         "parallel.virtual_pipeline_model_parallel_size=2",
         # Interleaving needs at least PP micro-batches in a validation step too.
         "data.micro_batch_size=2", "data.bucket_window=8"),
        (0, 1),
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("overlap-data")
    path = folder / "salm.yaml"
    path.write_text(yaml.safe_dump(training_config(folder, "salm")))
    return path


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= TOL * max(abs(b), 1e-12)


@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_overlap_trains_as_without(config, tmp_path, layout):
    nprocs, overrides, first_stage = LAYOUTS[layout]
    launch(WORKER, nprocs, "--workdir", str(tmp_path), str(config), *SETTINGS, *overrides,
           timeout=420)  # fmt: skip
    results = {
        mode: [json.loads((tmp_path / f"{mode}-rank{r}.json").read_text()) for r in range(nprocs)]
        for mode in ("off", "on")
    }
    off, on = results["off"][0], results["on"][0]
    assert all(off["applied"]) and all(on["applied"])
    for key in ("loss", "grad_norm"):
        for step, (a, b) in enumerate(zip(on[key], off[key], strict=True), start=1):
            assert _close(a, b), (key, step, a, b)
    assert _close(on["valid_loss"], off["valid_loss"]), (on["valid_loss"], off["valid_loss"])
    assert off["loss"][-1] < off["loss"][0]  # it trains: equal losses mean something

    for rank, result in enumerate(results["on"]):
        several = rank in first_stage
        assert (result["buckets"][0] > 1) is several, (rank, result["buckets"])
        # The first step only learns which gradients each bucket waits for; then buckets are
        # reduced while the backward pass goes on.
        assert result["reductions_in_backward"][0] == 0
        assert min(result["reductions_in_backward"][1:]) > (1 if several else 0), (rank, result)
        # After a step each rank has updated only its shard; the rest comes with the next
        # forward pass, or all at once for checkpoints and validation.
        assert not result["equal_over_dp_before_gather"]
        assert result["equal_over_dp_inside_whole_parameters"]
    for result in results["off"]:
        assert set(result["buckets"]) == {1} and not any(result["reductions_in_backward"])
        assert result["equal_over_dp_before_gather"]
