"""Proves hf-to-mcore gives transformers' logits at TP=1 (Llama 3, Qwen2, Qwen3, Qwen3-MoE),
mcore-to-hf round-trips every tensor bitwise into a folder transformers loads (a LoRA run merged in
its own dtype, with its tokenizer's token ids), and bad input fails naming the field or tensor."""

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from salm_megatron.config import ParallelConfig
from salm_megatron.convert import commands
from salm_megatron.convert.hf_io import ConversionError
from salm_megatron.convert.hf_llm import hf_to_mcore, mcore_to_hf
from salm_megatron.convert.llm_families import hf_config_from_llm, llm_config_from_hf
from salm_megatron.llm import build_llm
from salm_megatron.training.checkpoint import load_pretrained
from tests.hf_llm_fixtures import CASES, SEQ, convert_cases

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return convert_cases(tmp_path_factory.mktemp("convert"))


def hf_tensors(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})  # noqa: SIM118
    return tensors


def test_logits_match_transformers_at_tp1(converted, single_rank):
    for case, c in converted.items():
        model = build_llm(c["llm"], ParallelConfig()).eval()
        load_pretrained(model, c["dir"] / "mcore", "LLM")
        ids = c["input_ids"]
        with torch.no_grad():
            logits = model(ids, torch.arange(SEQ).expand_as(ids), None)
        vocab = c["llm"].vocab_size
        torch.testing.assert_close(logits[..., :vocab], c["logits"], rtol=0, atol=1e-4, msg=case)
        assert not logits[..., vocab:].any(), f"{case}: padded vocabulary rows are not zero"
    assert (converted["llama3"]["dir"] / "hf" / "model.safetensors.index.json").is_file()
    assert converted["llama3"]["llm"].padded_vocab_size == 384  # 300 padded


def test_round_trip_is_bitwise_and_loads_in_transformers(converted, tmp_path):
    for case, c in converted.items():
        out = tmp_path / case
        mcore_to_hf(c["dir"] / "mcore", out, max_shard_bytes=40_000)
        assert (out / "model.safetensors.index.json").is_file(), "expected several shards"
        source, back = hf_tensors(c["dir"] / "hf"), hf_tensors(out)
        assert set(back) == set(source), f"{case}: {set(back) ^ set(source)}"
        for name, tensor in source.items():
            assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
        assert (out / "tokenizer_config.json").is_file()
        model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        assert (
            type(model).__name__
            == json.loads((c["dir"] / "hf/config.json").read_text())["architectures"][0]
        )
        with torch.no_grad():
            assert torch.equal(model(c["input_ids"]).logits, c["logits"]), case


def test_export_without_source_config_writes_a_loadable_one(converted, tmp_path):
    """A checkpoint without the HF config.json (as a training run's) gets a Llama/Qwen2 one."""
    for case in ("llama3", "qwen2"):
        c = converted[case]
        bare = tmp_path / f"{case}-bare"
        shutil.copytree(c["dir"] / "mcore", bare)
        (bare / "config.json").unlink()
        mcore_to_hf(bare, tmp_path / f"{case}-hf", dtype=torch.bfloat16)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / f"{case}-hf", dtype=torch.float32
        ).eval()
        assert hf_tensors(tmp_path / f"{case}-hf")["model.norm.weight"].dtype == torch.bfloat16
        with torch.no_grad():
            logits = model(c["input_ids"]).logits
        # bf16 weights: close to the fp32 logits, not equal.
        torch.testing.assert_close(logits, c["logits"], rtol=0, atol=0.05, msg=case)


def test_cli_and_clear_errors(converted, tmp_path, capsys):
    c = converted["llama3.2"]
    src = c["dir"] / "hf"
    # The registered command runs end to end.
    assert commands.main(["hf-to-mcore", "--hf", str(src), "--out", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "metadata.json").is_file()
    assert (tmp_path / "cli" / "llm.yaml").is_file()
    # An existing output folder is never overwritten.
    assert commands.main(["hf-to-mcore", "--hf", str(src), "--out", str(tmp_path / "cli")]) == 2
    assert "already exists" in capsys.readouterr().err

    config = json.loads((src / "config.json").read_text())
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    assert commands.main(["hf-to-mcore", "--hf", str(gpt2), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "salm convert hf-to-mcore: error:" in err and "GPT2LMHeadModel" in err
    assert not (tmp_path / "x").exists()

    for change, words in [
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "'yarn' is not supported"),
        ({"rope_parameters": {**config["rope_parameters"], "low_freq_factor": 2.0}}, "fixes"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"model_type": "mistral"}, "model_type='mistral'"),
    ]:
        with pytest.raises(ConversionError, match=words):
            llm_config_from_hf({**config, **change})
    with pytest.raises(ConversionError, match="sliding_window=4096"):
        llm_config_from_hf(
            {**config, "architectures": ["MistralForCausalLM"], "model_type": "mistral",
             "sliding_window": 4096}
        )  # fmt: skip

    # A tensor whose shape disagrees with config.json: named, with both shapes.
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(src / "config.json", bad / "config.json")
    tensors = hf_tensors(src)
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(ConversionError) as info:
        hf_to_mcore(bad, tmp_path / "y")
    assert "model.layers.1.self_attn.k_proj.weight has shape [16, 64], expected [32, 64]" in str(
        info.value
    )
    assert not (tmp_path / "y").exists()
    assert set(CASES) == set(converted)


def test_qwen3_families_read_their_config_and_refuse_what_they_cannot_hold(converted, tmp_path):
    """Qwen3's wide heads and query/key norms and Qwen3-MoE's router come from config.json; a
    config written for a checkpoint that has none round-trips through the family table; the
    settings our decoder does not compute are refused by name."""
    moe_config = json.loads((converted["qwen3_moe"]["dir"] / "hf" / "config.json").read_text())
    moe = llm_config_from_hf(moe_config)
    assert (moe.kv_channels, moe.qk_layernorm, moe.qkv_bias) == (32, True, False)
    assert (moe.num_moe_experts, moe.moe_router_topk, moe.moe_ffn_hidden_size) == (4, 2, 48)
    assert moe.moe_router_norm_topk and moe.moe_aux_loss_coeff == 0.001
    dense = converted["qwen3"]["llm"]
    assert (dense.kv_channels, dense.qk_layernorm, dense.is_moe) == (32, True, False)
    for llm in (moe, dense):
        written = hf_config_from_llm(llm, torch.float32)
        assert llm_config_from_hf(written) == llm
        transformers.AutoConfig.for_model(**written)  # a config transformers reads
    assert hf_config_from_llm(moe, torch.float32)["architectures"] == ["Qwen3MoeForCausalLM"]
    for change, words in [
        ({"decoder_sparse_step": 2}, "decoder_sparse_step=2 is not supported for Qwen3-MoE"),
        ({"mlp_only_layers": [1]}, r"mlp_only_layers=\[1\] is not supported"),
        ({"use_sliding_window": True}, "use_sliding_window=True is not supported"),
        ({"attention_bias": True}, "attention_bias=True is not supported"),
        ({"num_experts_per_tok": 8}, "moe_router_topk=8 is more than llm.num_moe_experts=4"),
    ]:
        with pytest.raises(ConversionError, match=words):
            llm_config_from_hf({**moe_config, **change})
    with pytest.raises(ConversionError, match="no Hugging Face family has layers with"):
        hf_config_from_llm(dataclasses.replace(moe, qk_layernorm=False), torch.float32)


def test_export_of_a_lora_training_checkpoint(converted, tmp_path, single_rank):
    """The LLM of a speech model's training checkpoint, LoRA adapters merged, as transformers
    computes it; the architecture is the pretrained LLM's (Qwen2)."""
    from salm_megatron.config import CheckpointConfig, Config, LoRAConfig
    from salm_megatron.models import build_speech_llm
    from salm_megatron.models.lora import adapter_parameters, merge_lora
    from salm_megatron.training import checkpoint

    c = converted["qwen2"]
    cfg = Config(
        llm=c["llm"],
        lora=LoRAConfig(rank=2),
        checkpoint=CheckpointConfig(pretrained_llm=str(c["dir"] / "mcore")),
    )
    (model,) = build_speech_llm(cfg)
    checkpoint.load_pretrained(model.llm, cfg.checkpoint.pretrained_llm, "LLM")
    torch.manual_seed(3)
    with torch.no_grad():
        for p in adapter_parameters(model):
            p.normal_(0, 0.1)  # B starts at zero: make the adapters matter
    run = tmp_path / "run"
    checkpoint.save(run / "checkpoints", 5, [model], None, {"config": cfg.to_dict()}, {}, None)

    mcore_to_hf(run, tmp_path / "hf")
    merge_lora(model.llm)
    ids = c["input_ids"]
    with torch.no_grad():
        expected = model.llm(ids, torch.arange(SEQ).expand_as(ids), None)[
            ..., : c["llm"].vocab_size
        ]
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
        assert type(hf).__name__ == "Qwen2ForCausalLM"
        logits = hf(ids).logits
    assert (logits - c["logits"]).abs().max() > 1e-3, "the adapters changed nothing"
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)


def test_export_of_a_bf16_lora_run_stays_bf16_and_carries_the_tokenizer_ids(
    converted, tmp_path, single_rank
):
    """A bf16 LoRA run exports bf16 weights, merged in bf16 (each sum rounded once), with its
    tokenizer's BOS/EOS/PAD in config.json and generation_config.json, whose EOS also holds the
    prompt format's end of answer; transformers reads them."""
    from salm_megatron.config import CheckpointConfig, Config, LoRAConfig
    from salm_megatron.data import load_tokenizer
    from salm_megatron.models import build_speech_llm
    from salm_megatron.models.lora import adapter_parameters
    from salm_megatron.training import checkpoint
    from tests.speech_fixtures import make_hf_tokenizer

    c = converted["llama3"]
    tokenizer = make_hf_tokenizer(tmp_path / "tokenizer", extra_special=("<pad>",))
    base = Config()
    cfg = Config(
        llm=c["llm"],
        lora=LoRAConfig(rank=2, alpha=4.0),
        checkpoint=CheckpointConfig(pretrained_llm=str(c["dir"] / "mcore")),
        data=dataclasses.replace(base.data, tokenizer=str(tokenizer), prompt_format="llama3"),
    )
    (model,) = build_speech_llm(cfg, params_dtype=torch.bfloat16)
    checkpoint.load_pretrained(model.llm, cfg.checkpoint.pretrained_llm, "LLM")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in adapter_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        proj = model.llm.decoder.layers[0].self_attention.linear_proj
        exact = proj.base.weight.double() + 2.0 * (
            proj.lora_b.weight.double() @ proj.lora_a.weight.double()
        )
    run = tmp_path / "run"
    checkpoint.save(run / "checkpoints", 5, [model], None, {"config": cfg.to_dict()}, {}, None)

    out = tmp_path / "hf"
    mcore_to_hf(run, out)
    tensors = hf_tensors(out)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert torch.equal(tensors["model.layers.0.self_attn.o_proj.weight"], exact.bfloat16())
    written = json.loads((out / "config.json").read_text())
    assert written.get("dtype", written.get("torch_dtype")) == "bfloat16"

    tok = load_tokenizer(tokenizer)
    eot = tok.require("<|eot_id|>")
    assert tok.pad_id != tok.eos_id and eot != tok.eos_id
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    config = hf.config
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tok.bos_id, tok.eos_id, tok.pad_id,
    )  # fmt: skip
    for generation in (hf.generation_config, transformers.GenerationConfig.from_pretrained(out)):
        assert generation.bos_token_id == tok.bos_id and generation.pad_token_id == tok.pad_id
        assert generation.eos_token_id == sorted([tok.eos_id, eot])
