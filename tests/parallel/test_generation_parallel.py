"""Proves decoding at TP=2 (both ranks decoding together, vocabulary-parallel logits) gives the
tokens TP=1 gives, with and without the KV cache, for SALM and BESTOW and every strategy."""

import json

import pytest

from tests.conftest import REPO, launch

WORKER = REPO / "tests/parallel/generation_worker.py"


@pytest.mark.multiprocess
@pytest.mark.parametrize("arch", ["salm", "bestow"])
def test_tp2_decodes_what_tp1_decodes(tmp_path, arch):
    launch(WORKER, 1, "--workdir", str(tmp_path), "--reference", "--name", "tp1", "--arch", arch)
    launch(WORKER, 2, "--workdir", str(tmp_path), "--tp", "2", "--name", "tp2", "--arch", arch)
    (reference,) = [json.loads((tmp_path / "decoded-tp1-rank0.json").read_text())]
    ranks = [json.loads((tmp_path / f"decoded-tp2-rank{r}.json").read_text()) for r in (0, 1)]
    for strategy, expected in reference.items():
        assert expected["cached"] == expected["recomputed"], strategy
        assert any(len(tokens) > 1 for tokens in expected["cached"]), strategy
        for rank in ranks:
            assert rank[strategy]["cached"] == expected["cached"], strategy
            assert rank[strategy]["recomputed"] == expected["cached"], strategy
