"""Worker for test_convert_llm_parallel.py: checkpoints from ``salm convert hf-to-mcore`` loaded
at each of ``--layouts`` in turn (one launch); each layout's logits compared with transformers'.
Expert-parallel layouts apply to the MoE cases only.

Run under torchrun (2 processes; 4 for tp2ep2). ``--workdir`` holds one folder per case:
``mcore/`` (the converted checkpoint) and ``reference.pt`` (transformers' logits and input ids).
"""

import argparse
import json
from pathlib import Path

import torch
from megatron.core import parallel_state

from salm_megatron import parallel
from salm_megatron.config import ParallelConfig
from salm_megatron.convert.hf_llm import LLM_CONFIG_FILE, read_llm_config
from salm_megatron.llm import build_llm_chunks
from salm_megatron.training.checkpoint import load_pretrained
from tests.hf_llm_fixtures import MOE_CASES
from tests.parallel.llm_worker import run

LAYOUTS = {
    "tp2": ParallelConfig(tensor_model_parallel_size=2),
    "pp2": ParallelConfig(pipeline_model_parallel_size=2),
    # The two data-parallel ranks hold two experts each; tokens travel by all-to-all.
    "ep2": ParallelConfig(expert_model_parallel_size=2),
    # Attention split over 2 TP ranks, experts over 2 EP ranks, each expert over 2 (ETP = TP).
    "tp2ep2": ParallelConfig(tensor_model_parallel_size=2, expert_model_parallel_size=2),
}


def logits_error(case_dir: Path, layout: ParallelConfig) -> float | None:
    """Largest |logit - transformers' logit| on the last stage (None elsewhere)."""
    llm = read_llm_config(case_dir / "mcore" / LLM_CONFIG_FILE)
    chunks = build_llm_chunks(llm, layout)
    for chunk in chunks:
        load_pretrained(chunk, case_dir / "mcore", "LLM")
        chunk.eval()
    reference = torch.load(case_dir / "reference.pt")
    ids = reference["input_ids"]
    batch = {"input_ids": ids, "labels": ids, "loss_mask": torch.ones(ids.shape)}
    with torch.no_grad():
        logit_chunks = run(chunks, batch, forward_only=True)
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    logits = torch.cat(logit_chunks)[..., : llm.vocab_size]
    return (logits - reference["logits"]).abs().max().item()


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--cases", nargs="+", required=True)
    ap.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), required=True)
    args = ap.parse_args()
    errors = {}
    for name in args.layouts:
        layout = LAYOUTS[name]
        parallel.initialize(layout)
        experts = layout.expert_model_parallel_size > 1
        for case in [c for c in args.cases if (c in MOE_CASES) >= experts]:
            error = logits_error(args.workdir / case, layout)
            if error is not None:
                errors[f"{name}/{case}"] = error
        parallel_state.destroy_model_parallel()
    rank = torch.distributed.get_rank()
    (args.workdir / f"result-rank{rank}.json").write_text(json.dumps(errors, indent=1))
    parallel.teardown()


if __name__ == "__main__":
    main()
