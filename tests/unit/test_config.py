"""Proves configs validate fields, load YAML/JSON, apply overrides and reject impossible layouts."""

import json

import pytest

from salm_megatron.config import (
    Config,
    ConfigError,
    LLMConfig,
    ParallelConfig,
    apply_overrides,
    config_from_dict,
    llm_preset,
    load_config,
)

# Published parameter counts of the real checkpoints these presets describe.
PUBLISHED_PARAMETERS = {
    "llama3.2-1b": 1_235_814_400,
    "llama3-8b": 8_030_261_248,
    "llama3-70b": 70_553_706_496,
    "qwen2.5-7b": 7_615_616_512,
    "qwen3-8b": 8_190_735_360,
    "qwen3-30b-a3b": 30_532_122_624,
}


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMETERS))
def test_presets_have_the_published_shapes(name):
    assert llm_preset(name).num_parameters() == PUBLISHED_PARAMETERS[name]


def test_qwen3_presets_count_as_their_model_cards_do():
    # Qwen3-1.7B ties its embeddings: 1.7B in all, 1.4B without them; its hub files hold the
    # output layer too (2.03B stored).
    small = llm_preset("qwen3-1.7b")
    embedding = small.vocab_size * small.hidden_size
    assert small.num_parameters() == 1_720_574_976
    assert small.num_parameters() - embedding == 1_409_410_048
    assert small.num_parameters() + embedding == 2_031_739_904
    # Qwen3-30B-A3B: 3.3B active (8 of 128 experts per token).
    assert llm_preset("qwen3-30b-a3b").num_active_parameters() == 3_353_032_704
    assert llm_preset("qwen3-8b").num_active_parameters() == 8_190_735_360


def test_moe_fields_and_expert_layouts_are_checked():
    moe = llm_preset("tiny-moe")
    for fields, words in [
        ({"moe_router_topk": 5}, "llm.moe_router_topk=5 is more than llm.num_moe_experts=4"),
        ({"moe_router_topk": 1}, "llm.moe_router_topk=1 with llm.moe_router_norm_topk=true"),
        ({"moe_token_dispatcher": "flex"}, "llm.moe_token_dispatcher='flex' is not one of"),
        ({"num_moe_experts": 0}, "llm.num_moe_experts"),
        ({"kv_channels": 0}, "llm.kv_channels"),
        ({"recompute": "selective", "recompute_modules": ["mlp"]}, "'mlp' needs dense MLP"),
    ]:
        with pytest.raises(ConfigError, match=words):
            llm_preset("tiny-moe", **fields)
    with pytest.raises(ConfigError, match="'moe' needs MoE layers"):
        LLMConfig(recompute="selective", recompute_modules=["moe"])
    ep = ParallelConfig(expert_model_parallel_size=3)
    with pytest.raises(ConfigError, match="llm.num_moe_experts=4 is not divisible by "):
        Config(llm=moe, parallel=ep).validate_layout()
    with pytest.raises(ConfigError, match="expert_model_parallel_size=2 needs MoE layers"):
        Config(parallel=ParallelConfig(expert_model_parallel_size=2)).validate_layout()
    with pytest.raises(ConfigError, match="does not divide the 3 ranks of a pipeline stage"):
        ParallelConfig(expert_model_parallel_size=2).validate_world(3)
    etp = ParallelConfig(expert_model_parallel_size=2, expert_tensor_parallel_size=5)
    with pytest.raises(ConfigError, match="moe_ffn_hidden_size=48 is not divisible"):
        Config(llm=moe, parallel=etp).validate_layout()


def test_vocab_padding_does_not_depend_on_tp():
    llm = llm_preset("llama3-8b")
    assert llm.padded_vocab_size == 128256  # already a multiple of 128
    assert LLMConfig(vocab_size=32000 + 5).padded_vocab_size == 32128
    for tp in (1, 2, 4, 8):
        Config(llm=llm, parallel=ParallelConfig(tensor_model_parallel_size=tp)).validate_layout()


@pytest.mark.parametrize(
    "parallel, llm, message",
    [
        (
            dict(tensor_model_parallel_size=8),
            dict(preset="qwen2.5-7b"),
            "llm.num_attention_heads=28 is not divisible by parallel.tensor_model_parallel_size=8",
        ),
        (
            dict(tensor_model_parallel_size=4),
            dict(num_query_groups=2),
            "llm.num_query_groups=2 is not divisible by parallel.tensor_model_parallel_size=4",
        ),
        (
            dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=3),
            dict(),
            "llm.num_layers=4 is not divisible by pipeline_model_parallel_size x "
            "virtual_pipeline_model_parallel_size = 2 x 3 = 6",
        ),
        (
            dict(sequence_parallel=True),
            dict(),
            "parallel.sequence_parallel=true needs parallel.tensor_model_parallel_size > 1",
        ),
        (
            dict(virtual_pipeline_model_parallel_size=2),
            dict(),
            "needs parallel.pipeline_model_parallel_size > 1",
        ),
    ],
)
def test_impossible_layouts_are_rejected_with_the_numbers(parallel, llm, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"parallel": parallel, "llm": llm})
    assert message in str(err.value)


def test_world_size_must_hold_the_model_parallel_group():
    layout = ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    layout.validate_world(8)
    assert layout.data_parallel_size(8) == 2
    with pytest.raises(ConfigError, match="world size 6 is not divisible by .* = 2 x 2 x 1 = 4"):
        layout.validate_world(6)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("fp8", "e5m2", "llm.fp8='e5m2' is not one of None, 'hybrid', 'e4m3'"),
        ("fp8_recipe", "fast", "llm.fp8_recipe='fast' is not one of"),
        ("hidden_size", 66, "llm.hidden_size=66 is not divisible by llm.num_attention_heads=4"),
        (
            "num_query_groups",
            3,
            "llm.num_attention_heads=4 is not divisible by llm.num_query_groups=3",
        ),
        ("hidden_dropout", 1.5, "llm.hidden_dropout=1.5 must be in [0, 1)"),
        ("num_layers", 0, "llm.num_layers=0 must be a positive integer"),
    ],
)
def test_bad_llm_fields_name_field_and_value(field, value, message):
    with pytest.raises(ConfigError) as err:
        LLMConfig(**{field: value})
    assert message in str(err.value)


def test_fp8_needs_transformer_engine_impl():
    with pytest.raises(ConfigError, match="llm.fp8='hybrid' needs Transformer Engine"):
        LLMConfig(fp8="hybrid", transformer_impl="local")


def test_yaml_file_with_preset_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "llm:\n  preset: llama3.2-1b\n  num_layers: 8\nparallel:\n  tensor_model_parallel_size: 2\n"
    )
    config = load_config(path)
    assert config.llm.hidden_size == 2048 and config.llm.num_layers == 8
    assert config.llm.tie_embeddings and config.llm.rope_scaling_factor == 32.0
    config = apply_overrides(config, ["parallel.sequence_parallel=true", "llm.fp8=null", "seed=7"])
    assert config.parallel.sequence_parallel and config.llm.fp8 is None and config.seed == 7


@pytest.mark.parametrize(
    "pattern", ["{a,b}.tar", "{train,dev}", "/data/{a,b}/shard-{000000..000003}.tar", "a.tar"]
)
def test_brace_patterns_on_the_command_line_stay_strings(pattern):
    config = apply_overrides(Config(), [f"data.train_shards={pattern}"])
    assert config.data.train_shards == pattern


def test_a_mix_on_the_command_line_is_yaml():
    config = apply_overrides(Config(), ["data.train_shards=[{shards: a.tar, weight: 2}]"])
    assert config.data.train_datasets == [("a.tar", 2.0)]


def test_json_file_round_trip(tmp_path):
    original = apply_overrides(
        Config(), ["llm.preset=qwen2.5-7b", "parallel.tensor_model_parallel_size=4"]
    )
    path = tmp_path / "run.json"
    path.write_text(json.dumps(original.to_dict()))
    assert load_config(path) == original


@pytest.mark.parametrize(
    "override, message",
    [
        ("llm.num_layers", "is not of the form key.sub=value"),
        ("llm.hiden_size=64", "unknown field llm.hiden_size"),
        ("llm.num_layers=two", "llm.num_layers='two' must be an integer"),
        ("llm.qkv_bias=maybe", "llm.qkv_bias='maybe' must be true or false"),
        ("seed.x=1", "seed is not a section"),
        ("llm.preset=gpt5", "llm.preset='gpt5' is not one of"),
    ],
)
def test_bad_overrides_are_explained(override, message):
    with pytest.raises(ConfigError) as err:
        apply_overrides(Config(), [override])
    assert message in str(err.value)


def test_bad_files_are_explained(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("llm: [1, 2\n")
    with pytest.raises(ConfigError, match="broken.yaml is not valid"):
        load_config(broken)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("lm:\n  num_layers: 2\n")
    with pytest.raises(ConfigError, match=r"unknown.yaml: unknown field lm"):
        load_config(unknown)
