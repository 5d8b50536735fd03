"""Proves decoding at TP=2 (both ranks decoding together, vocabulary-parallel logits) gives the
tokens TP=1 gives, with and without the KV cache, for SALM and BESTOW and every strategy; and on
tiny-moe with its experts split over the two ranks (EP=2 inside TP=2)."""

import json

import pytest

from tests.conftest import REPO, launch

WORKER = REPO / "tests/parallel/generation_worker.py"


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("arch", "llm", "layout"),
    [
        ("salm", "tiny", ["--tp", "2"]),
        ("bestow", "tiny", ["--tp", "2"]),
        # 2 experts on each TP rank: every decoding step sends tokens to the other's experts
        ("salm", "tiny-moe", ["--tp", "2", "--ep", "2", "--etp", "1"]),
    ],
    ids=["salm", "bestow", "salm-moe-ep2"],
)
def test_tp2_decodes_what_tp1_decodes(tmp_path, arch, llm, layout):
    common = ("--workdir", str(tmp_path), "--arch", arch, "--llm", llm)
    launch(WORKER, 1, *common, "--reference", "--name", "tp1")
    launch(WORKER, 2, *common, *layout, "--name", "tp2")
    (reference,) = [json.loads((tmp_path / "decoded-tp1-rank0.json").read_text())]
    ranks = [json.loads((tmp_path / f"decoded-tp2-rank{r}.json").read_text()) for r in (0, 1)]
    for strategy, expected in reference.items():
        assert expected["cached"] == expected["recomputed"], strategy
        assert any(len(tokens) > 1 for tokens in expected["cached"]), strategy
        for rank in ranks:
            assert rank[strategy]["cached"] == expected["cached"], strategy
            assert rank[strategy]["recomputed"] == expected["cached"], strategy
