"""Proves that with two data-parallel ranks a batch failing on one rank costs only that batch:
both ranks still reach the gather (no rank left waiting), rank 0 writes every other prediction,
and every rank knows the failure (so each can exit non-zero)."""

import json

import pytest
import yaml

from tests.conftest import REPO, launch
from tests.eval_fixtures import CLIPS, whisper_eval_config, write_eval_shard

WORKER = REPO / "tests/parallel/evaluation_worker.py"


@pytest.mark.multiprocess
def test_a_failed_batch_leaves_no_rank_waiting(tmp_path):
    cfg = whisper_eval_config(tmp_path)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    shard = write_eval_shard(tmp_path / "shards")
    launch(WORKER, 2, "--workdir", str(tmp_path), "--shard", shard, timeout=180)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # The shard's samples alternate between the ranks: rank 0 holds the clip Whisper refuses.
    assert ranks[0]["local"]["keys"] == ["utt0-short", "utt4-tiny"]
    assert ranks[1]["local"] == {"keys": ["utt1-silent", "utt3-short"], "failures": []}
    decoded = sorted(k for k in CLIPS if k != "utt2-long")
    for rank in ranks:
        assert rank["keys"] == decoded
        assert [f["keys"] for f in rank["failures"]] == [["utt2-long"]]
    lines = (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["key"] for line in lines] == decoded
    summary = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert summary["failed_samples"] == 1 and summary["utterances"] == 4
