"""Proves uneven pipeline stages are accepted exactly where Megatron-Core builds each layer once."""

import itertools
import warnings

import pytest
import torch
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from salm_megatron.config import (
    ConfigError,
    LLMConfig,
    ParallelConfig,
    config_from_dict,
    pipeline_stage_layers,
    validate_layout,
)
from salm_megatron.llm.model import transformer_config


def megatron_stages(layers, pp, vpp, first, last) -> list[int] | None:
    """Layers per pipeline rank as Megatron-Core 0.16 builds them, or None where it refuses, fails
    or builds a chunk without layers or not every layer exactly once, in order."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = TransformerConfig(
                num_layers=layers, hidden_size=8, num_attention_heads=2,
                pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp,
                num_layers_in_first_pipeline_stage=first, num_layers_in_last_pipeline_stage=last,
                pipeline_dtype=torch.float32, use_cpu_initialization=True,
            )  # fmt: skip
        built, per_rank = [], [0] * pp
        for chunk, rank in itertools.product(range(vpp or 1), range(pp)):
            stage = chunk if vpp else None
            n = get_num_layers_to_build(config, vp_stage=stage, pp_rank=rank)
            offset = get_transformer_layer_offset(config, vp_stage=stage, pp_rank=rank)
            if n < 1:
                return None
            built += range(offset, offset + n)
            per_rank[rank] += n
    except (ValueError, AssertionError, ZeroDivisionError):
        return None
    return per_rank if built == list(range(layers)) else None


def ours(layers, pp, vpp, first, last) -> list[int] | None:
    try:
        parallel = ParallelConfig(
            pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=vpp,
            num_layers_in_first_pipeline_stage=first,
            num_layers_in_last_pipeline_stage=last,
        )
        llm = LLMConfig(num_layers=layers)
        validate_layout(llm, parallel)
    except ConfigError:
        return None
    return pipeline_stage_layers(llm, parallel)


def test_accepted_exactly_where_megatron_builds_each_layer_once():
    accepted = 0
    for layers, pp, vpp in itertools.product(range(1, 9), range(2, 5), (None, 2)):
        for first, last in itertools.product((None, *range(1, layers + 1)), repeat=2):
            expected = megatron_stages(layers, pp, vpp, first, last)
            assert ours(layers, pp, vpp, first, last) == expected, (layers, pp, vpp, first, last)
            accepted += expected is not None and (first, last) != (None, None)
    assert accepted > 50  # many uneven layouts, not only refusals


def test_one_stage_holds_every_layer_whatever_the_uneven_fields():
    parallel = ParallelConfig(num_layers_in_first_pipeline_stage=1)
    assert pipeline_stage_layers(LLMConfig(), parallel) == [4]
    config = transformer_config(LLMConfig(), parallel)
    assert config.num_layers_in_first_pipeline_stage is None  # Megatron would build 1 layer
    assert get_num_layers_to_build(config, pp_rank=0) == 4


def test_uneven_fields_reach_megatron():
    parallel = ParallelConfig(
        pipeline_model_parallel_size=3,
        num_layers_in_first_pipeline_stage=1,
        num_layers_in_last_pipeline_stage=1,
    )
    config = transformer_config(LLMConfig(num_layers=6), parallel)
    assert [get_num_layers_to_build(config, pp_rank=r) for r in range(3)] == [1, 4, 1]
    assert pipeline_stage_layers(LLMConfig(num_layers=6), parallel) == [1, 4, 1]


def _uneven(pp, first=None, last=None, vpp=None) -> dict:
    return dict(
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        num_layers_in_first_pipeline_stage=first,
        num_layers_in_last_pipeline_stage=last,
    )


@pytest.mark.parametrize(
    "parallel, layers, message",
    [
        (
            _uneven(2, first=0),
            4,
            "parallel.num_layers_in_first_pipeline_stage=0 must be a positive",
        ),
        (
            _uneven(3, first=1),
            4,
            "llm.num_layers=4 less parallel.num_layers_in_first_pipeline_stage=1 leaves 3 layers "
            "for the 2 other stages of parallel.pipeline_model_parallel_size=3: they must share "
            "them evenly",
        ),
        (_uneven(2, first=1, last=2), 4, "leaves 1 layers for the 0 other stages"),
        (_uneven(2, first=3, last=2), 4, "leaves -1 layers for the 0 other stages"),
        (
            _uneven(2, last=1, vpp=2),
            4,
            "parallel.num_layers_in_last_pipeline_stage=1 is not divisible by "
            "parallel.virtual_pipeline_model_parallel_size=2",
        ),
        (
            _uneven(2, first=2, last=2, vpp=2),
            4,
            "cannot both be set with parallel.virtual_pipeline_model_parallel_size=2 at "
            "parallel.pipeline_model_parallel_size=2",
        ),
        (
            _uneven(2, first=2, vpp=2),
            5,
            "llm.num_layers=5 split over the pipeline stages as 2 + 3 puts 3 layers on a stage, "
            "not divisible by parallel.virtual_pipeline_model_parallel_size=2",
        ),
    ],
)
def test_impossible_uneven_layouts_name_the_fields(parallel, layers, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"parallel": parallel, "llm": {"num_layers": layers}})
    assert message in str(err.value)
