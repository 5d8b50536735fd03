"""Proves (CUDA only) the GPU's kernel settings are on: fused cross entropy (TE's with the TE
spec) equal to the unfused one, bias-dropout fusion, pipeline outputs freed after the send also
with interleaving, weight-gradient accumulation fused where apex's kernel is installed; and that
a training step under the loop's DDP (overlapped reduction, fused kernels, bf16) puts finite
gradients into DDP's main_grad and applies them."""

import pytest
import torch
from megatron.core import tensor_parallel
from megatron.core.models.common.language_module import language_module
from megatron.core.pipeline_parallel import get_forward_backward_func

from salm_megatron.config import LLMConfig, ParallelConfig, apply_overrides
from salm_megatron.data import collate
from salm_megatron.llm import build_llm, transformer_config, uses_transformer_engine
from salm_megatron.models import build_speech_llm
from salm_megatron.training.loop import _to_device
from salm_megatron.training.optimizer import build_optimizer, optimizer_step, wrap_ddp
from tests.speech_fixtures import speech_samples, tiny_config

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("vpp", [None, 2])
def test_fused_kernels_on(vpp):
    layout = ParallelConfig(
        pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=vpp
    )
    llm = LLMConfig()
    config = transformer_config(llm, layout)
    assert config.cross_entropy_loss_fusion and config.bias_dropout_fusion
    assert config.deallocate_pipeline_outputs
    te = uses_transformer_engine(llm) and language_module.te_parallel_cross_entropy is not None
    assert config.cross_entropy_fusion_impl == ("te" if te else "native")


def test_gradient_accumulation_fusion_where_apex_has_the_kernel():
    pytest.importorskip("fused_weight_gradient_mlp_cuda", reason="apex's fused wgrad kernel")
    assert transformer_config(LLMConfig(), ParallelConfig()).gradient_accumulation_fusion


def test_fused_cross_entropy_equals_unfused(single_rank):
    model = build_llm(LLMConfig(), ParallelConfig()).cuda()
    assert model.config.cross_entropy_loss_fusion
    generator = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(16, 2, model.vocab_size, device="cuda", generator=generator)  # [s, b, v]
    labels = torch.randint(0, model.vocab_size, (2, 16), device="cuda", generator=generator)
    fused = model.compute_language_model_loss(labels, logits.clone())  # [b, s]
    unfused = tensor_parallel.vocab_parallel_cross_entropy(logits.clone(), labels.t().contiguous())
    torch.testing.assert_close(fused, unfused.t(), rtol=1e-4, atol=1e-4)


def test_a_training_step_under_ddp(single_rank):
    cfg = apply_overrides(tiny_config("salm", ctc_weight=0.3), ["optim.bucket_size=20000"])
    torch.manual_seed(0)
    chunks = [chunk.cuda() for chunk in build_speech_llm(cfg, params_dtype=torch.bfloat16)]
    model = wrap_ddp(cfg, chunks)
    optimizer, _ = build_optimizer(cfg, model, torch.bfloat16)
    samples = speech_samples("salm")
    microbatches = iter([collate(samples[:2]), collate(samples[2:])])

    def forward_step(data_iterator, chunk):
        batch = _to_device(next(data_iterator))
        tokens = batch["answer_mask"].sum().to(torch.int)
        return chunk(batch), lambda out: (out.float().sum(), tokens, {})

    for step in range(2):  # the second step overlaps the reduction with the backward pass
        model[0].zero_grad_buffer()
        optimizer.zero_grad()
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=microbatches if step == 0 else iter([collate(samples[:2])]),
            model=model[0],
            num_microbatches=2 if step == 0 else 1,
            seq_length=0,
            micro_batch_size=2,
        )
        grads = [p.main_grad for p in model[0].module.parameters() if p.requires_grad]
        assert all(torch.isfinite(g).all() for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0
        applied, grad_norm = optimizer_step(optimizer, cfg.optim.clip_grad)
        assert applied and grad_norm > 0
