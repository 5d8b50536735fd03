"""Worker for test_generation_parallel.py: decode the same prompts at one layout.

``--reference`` (one process, TP=1) builds the tiny model, saves its weights as a dist checkpoint
and writes what it decodes; other layouts load the weights (resharded to their TP, and EP: the
experts of tiny-moe spread over the TP ranks) and write what they decode with and without the KV
cache.
"""

import dataclasses
import json

import torch

from salm_megatron import parallel
from salm_megatron.config import DecodeConfig, apply_overrides
from salm_megatron.inference.generation import Generator
from salm_megatron.models import build_speech_llm
from tests.parallel import equivalence as eq
from tests.speech_fixtures import AUDIO_TOKEN, prompt_samples, tiny_config, wake_zero_outputs

STRATEGIES = {
    "greedy": DecodeConfig(max_new_tokens=12),
    "sample": DecodeConfig(strategy="sample", max_new_tokens=12, top_k=50, seed=3),
    "beam": DecodeConfig(strategy="beam", max_new_tokens=12, beam_size=3),
}


def main():
    ap = eq.layout_parser(__doc__)
    ap.add_argument("--arch", choices=("salm", "bestow"), required=True)
    ap.add_argument("--llm", default="tiny", help="an LLM preset (tiny-moe: experts)")
    args = ap.parse_args()
    cfg = apply_overrides(tiny_config(args.arch), [f"llm.preset={args.llm}"])
    cfg = dataclasses.replace(cfg, parallel=eq.parallel_config(args))  # EP once there is MoE
    parallel.initialize(cfg.parallel, seed=cfg.seed)
    (model,) = build_speech_llm(cfg)
    if args.reference:
        wake_zero_outputs(model)
        eq.save([model], args.workdir / "weights")
    else:
        (state,) = eq.load([model], args.workdir / "weights")
        model.load_state_dict(state)
    result = {}
    for name, decoding in STRATEGIES.items():
        generator = Generator(
            model, decoding, stop_ids={2}, vocab_size=250, banned_ids=(AUDIO_TOKEN,)
        )
        samples = prompt_samples(args.arch)
        result[name] = {
            "cached": generator.generate(samples),
            "recomputed": generator.generate(samples, use_cache=False),
        }
    rank = torch.distributed.get_rank()
    (args.workdir / f"decoded-{args.name}-rank{rank}.json").write_text(json.dumps(result))
    parallel.teardown()


if __name__ == "__main__":
    main()
