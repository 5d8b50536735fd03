"""Proves checkpoints from hf-to-mcore give transformers' logits (1e-4, fp32) at TP=2 and PP=2,
and a Qwen3-MoE's at EP=2 and EP=2 x TP=2."""

import json

import pytest

from tests.conftest import REPO, launch
from tests.hf_llm_fixtures import CASES, MOE_CASES, convert_cases

WORKER = REPO / "tests/parallel/convert_llm_worker.py"
TOL = 1e-4


def compare(workdir, ranks: int, layouts: tuple[str, ...], cases) -> None:
    launch(WORKER, ranks, "--workdir", str(workdir), "--cases", *cases, "--layouts", *layouts)
    errors = {}
    for rank in range(ranks):
        errors.update(json.loads((workdir / f"result-rank{rank}.json").read_text()))
    expected = {
        f"{layout}/{case}"
        for layout in layouts
        for case in cases
        if "ep" not in layout or case in MOE_CASES
    }
    assert set(errors) == expected, f"compared {sorted(errors)}"
    for name, error in errors.items():
        assert error < TOL, f"{name}: logits differ from transformers by {error:.2e}"


@pytest.mark.multiprocess
def test_converted_checkpoints_match_transformers_at_tp2_pp2_and_ep2(tmp_path):
    pytest.importorskip("transformers")
    convert_cases(tmp_path)
    compare(tmp_path, 2, ("tp2", "pp2", "ep2"), CASES)


@pytest.mark.multiprocess
def test_a_converted_moe_matches_transformers_at_ep2_x_tp2(tmp_path):
    pytest.importorskip("transformers")
    convert_cases(tmp_path, MOE_CASES)
    compare(tmp_path, 4, ("tp2ep2",), MOE_CASES)
