"""Proves the parts outside the LLM that TP ranks replicate end each step with one gradient over
the TP group, whatever each rank computed: the BESTOW block averaged, the audio path summed when
TP ranks split the segments (each trained from its own) and averaged when they do not; the LLM's
own (TP-sharded) gradients are left to Megatron."""

import json

import pytest

from tests.conftest import REPO, launch

WORKER = REPO / "tests/parallel/replicated_grads_worker.py"


@pytest.mark.multiprocess
@pytest.mark.parametrize("split", [True, False], ids=["split", "replicated"])
def test_replicas_end_with_one_gradient(tmp_path, split):
    launch(WORKER, 2, "--workdir", str(tmp_path), *(["--split"] if split else []), timeout=180)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    audio = [3.0] if split else [1.5]  # rank 0 held 1, rank 1 held 2
    for r, parts in enumerate(ranks):
        assert parts["cross_attention"] == [1.5]
        assert parts["audio"] == audio and parts["ctc"] == audio
        assert parts["llm"] == [r + 1.0]
