"""Proves the sequence padding fits every layout: each rank's local rows (the sequence cut into
2*CP chunks, a CP rank's positions split over TP under SP) are whole, and under FP8 a multiple of
Transformer Engine's 16 (32 for MXFP8) at micro-batch 1, for every recipe and a grid of layouts."""

import dataclasses
import itertools

import pytest

from recipes.configs import TRAINING
from salm_megatron.config import LLMConfig, ParallelConfig
from salm_megatron.models.layout import FP8_ROWS, sequence_multiple


def _local_rows(multiple: int, parallel: ParallelConfig) -> list[float]:
    """The rows each rank holds, for a sequence of ``multiple`` positions (micro-batch 1)."""
    cp, tp = parallel.context_parallel_size, parallel.tensor_model_parallel_size
    chunk = multiple / (2 * cp if cp > 1 else 1)  # CP's load-balanced chunks, two per CP rank
    per_cp_rank = multiple / cp
    return [chunk, per_cp_rank / (tp if parallel.sequence_parallel else 1)]


def _check(parallel: ParallelConfig, llm: LLMConfig) -> None:
    multiple = sequence_multiple(parallel, llm)
    rows = FP8_ROWS[llm.fp8_recipe] if llm.fp8 else 1
    chunk, local = _local_rows(multiple, parallel)
    assert chunk.is_integer() and local.is_integer(), (parallel, multiple)
    assert local % rows == 0, (parallel, llm.fp8_recipe, multiple)


@pytest.mark.parametrize("name", sorted(TRAINING))
def test_every_recipe_pads_to_whole_fp8_rows(name):
    cfg = TRAINING[name].config()
    _check(cfg.parallel, cfg.llm)
    if cfg.llm.fp8:  # the 70B FP8 recipe: TP 8 with SP, 16 rows on each rank
        assert sequence_multiple(cfg.parallel, cfg.llm) % (16 * 8) == 0


@pytest.mark.parametrize("recipe", [None, "delayed", "mxfp8"])
def test_every_layout_pads_to_whole_rows(recipe):
    llm = LLMConfig(fp8=recipe and "hybrid", fp8_recipe=recipe or "delayed",
                    transformer_impl="transformer_engine" if recipe else "local")  # fmt: skip
    for tp, cp, sp in itertools.product((1, 2, 4, 8), (1, 2, 4), (False, True)):
        if sp and tp == 1:
            continue
        parallel = ParallelConfig(tensor_model_parallel_size=tp, context_parallel_size=cp,
                                  sequence_parallel=sp)  # fmt: skip
        _check(parallel, llm)


def test_lcm_alone_pads_too_little_under_fp8_and_sp():
    """The rule before: lcm(TP, 16) = 16 for TP 8, leaving 2 rows per rank (TE refuses them)."""
    parallel = ParallelConfig(tensor_model_parallel_size=8, sequence_parallel=True)
    llm = dataclasses.replace(LLMConfig(), fp8="hybrid", transformer_impl="transformer_engine")
    assert sequence_multiple(parallel, llm) == 128
    assert sequence_multiple(dataclasses.replace(parallel, sequence_parallel=False), llm) == 16
