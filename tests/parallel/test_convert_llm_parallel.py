"""Proves checkpoints from hf-to-mcore give transformers' logits (1e-4, fp32) at TP=2 and PP=2."""

import json

import pytest

from tests.conftest import REPO, launch
from tests.hf_llm_fixtures import CASES, convert_cases

WORKER = REPO / "tests/parallel/convert_llm_worker.py"
TOL = 1e-4


@pytest.mark.multiprocess
def test_converted_checkpoints_match_transformers_at_tp2_and_pp2(tmp_path):
    pytest.importorskip("transformers")
    convert_cases(tmp_path)
    launch(WORKER, 2, "--workdir", str(tmp_path), "--cases", *CASES)
    errors = {}
    for rank in range(2):
        errors.update(json.loads((tmp_path / f"result-rank{rank}.json").read_text()))
    expected = {f"{layout}/{case}" for layout in ("tp2", "pp2") for case in CASES}
    assert set(errors) == expected, f"compared {sorted(errors)}"
    for name, error in errors.items():
        assert error < TOL, f"{name}: logits differ from transformers by {error:.2e}"
