"""Proves (CUDA only) that a training micro-batch's forward and backward never make the host wait
for the GPU (SALM and BESTOW, bf16, audio split or not, padded or packed through TE), and that
validation decodes a Transformer Engine model through a local-spec copy: left-padded batches
decode as single samples do."""

import dataclasses

import pytest
import torch

from salm_megatron.data import collate
from salm_megatron.models import build_speech_llm
from salm_megatron.models.host import to_device
from salm_megatron.models.local_copy import decoding_model
from salm_megatron.training.optimizer import wrap_ddp
from tests.speech_fixtures import prompt_samples, speech_samples, tiny_config, wake_zero_outputs

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("arch", ["salm", "bestow"])
def test_a_micro_batch_never_waits_for_the_gpu(single_rank, arch, packed):
    """Packed rows through Transformer Engine, whose THD attention and fused RoPE take the row's
    bounds on the device (without TE, Megatron-Core's unfused RoPE for packed rows reads them)."""
    if packed:
        pytest.importorskip("transformer_engine")
    cfg = tiny_config(arch)
    torch.manual_seed(0)
    (model,) = build_speech_llm(cfg, params_dtype=torch.bfloat16)
    (ddp,) = wrap_ddp(cfg, [model.cuda().train()])  # as the loop trains it
    batch = to_device(collate(speech_samples(arch)), "cuda")
    length = -(-(int(model.layout(batch, None).lengths.sum()) + 5) // 16) * 16 if packed else None

    def micro_batch():
        ddp.zero_grad_buffer()
        ddp(batch, length, packed=packed).float().sum().backward()

    micro_batch()  # first use: the filterbank and caches move to the GPU once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any sync from here on raises
    try:
        micro_batch()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ddp.finish_grad_sync()
    torch.cuda.synchronize()


@pytest.mark.parametrize("arch", ["salm", "bestow"])
def test_validation_decodes_a_te_model_through_a_local_copy(single_rank, arch):
    pytest.importorskip("transformer_engine")
    from salm_megatron.config import DecodeConfig
    from salm_megatron.inference.generation import Generator

    cfg = tiny_config(arch)
    cfg = dataclasses.replace(
        cfg, llm=dataclasses.replace(cfg.llm, transformer_impl="transformer_engine")
    )
    torch.manual_seed(0)
    (model,) = build_speech_llm(cfg, params_dtype=torch.bfloat16)
    wake_zero_outputs(model)
    model.cuda()
    local = decoding_model(cfg, model)
    assert local is not model
    assert not any("layer_norm_weight" in name for name, _ in local.named_parameters())
    generator = Generator(local, DecodeConfig(max_new_tokens=8), stop_ids={2}, vocab_size=250)
    samples = prompt_samples(arch)
    assert generator.generate(samples) == [generator.generate([s])[0] for s in samples]
