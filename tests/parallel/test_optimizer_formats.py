"""Proves the optimizer checkpoint formats across data-parallel sizes in real processes: state
saved at DP=2 (each rank its own shard, in dp_reshardable; gathered, in fully_reshardable) loads
at DP=1 into the very same optimizer tensors from either format, and training continues with the
loss the DP=2 run had next."""

import json

import pytest

from tests.conftest import REPO, launch

WORKER = REPO / "tests/parallel/optimizer_format_worker.py"


@pytest.mark.multiprocess
def test_dp_reshardable_state_saved_at_dp2_loads_at_dp1(tmp_path):
    launch(WORKER, 2, "save", "--workdir", str(tmp_path), timeout=180)
    launch(WORKER, 1, "load", "--workdir", str(tmp_path), timeout=180)
    saved = json.loads((tmp_path / "save-rank0.json").read_text())
    loaded = json.loads((tmp_path / "load-rank0.json").read_text())
    assert loaded["same keys"] and loaded["tensors"] > 100, loaded
    assert loaded["differing"] == [], loaded["differing"][:5]
    for fmt in ("dp_reshardable", "fully_reshardable"):
        got = loaded[f"next {fmt}"]
        assert abs(got - saved["next"]) <= 1e-6 * saved["next"], (fmt, got, saved)
