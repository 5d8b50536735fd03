"""Proves the resolved DDP and kernel settings: overlapped gradient reduction and parameter
all-gather by default (the all-gather only with the distributed optimizer and an overlapped
reduction), Megatron's bucket size unless set, bad optim fields named; on the CPU no fused
kernels and pipeline outputs freed where sends have completed; and that an overlapped step where
a parameter gets no gradient (a CTC head without transcripts, also in the first step) gives the
gradients of the unoverlapped path instead of stalling its bucket."""

import dataclasses

import pytest
import torch
from megatron.core.pipeline_parallel import get_forward_backward_func

from salm_megatron.config import (
    ConfigError,
    LLMConfig,
    OptimConfig,
    ParallelConfig,
    apply_overrides,
)
from salm_megatron.data import collate
from salm_megatron.llm import transformer_config
from salm_megatron.models import build_speech_llm
from salm_megatron.training.optimizer import ddp_config, wrap_ddp
from tests.speech_fixtures import speech_samples, tiny_config

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's settings")


@pytest.mark.parametrize(
    "overrides, grad, params",
    [
        ((), True, True),
        (("optim.distributed=false",), True, False),  # no parameter all-gather at all
        (("optim.overlap_grad_reduce=false",), False, False),  # Megatron-LM's rule
        (("optim.overlap_param_gather=false",), True, False),
    ],
)
def test_ddp_overlaps_by_default(overrides, grad, params):
    config = ddp_config(apply_overrides(tiny_config("salm"), list(overrides)))
    assert (config.overlap_grad_reduce, config.overlap_param_gather) == (grad, params)
    assert config.grad_reduce_in_fp32 and not config.average_in_collective
    assert config.bucket_size is None  # DDP then takes max(4e7, 1e6 x DP)
    sized = ddp_config(apply_overrides(tiny_config("salm"), ["optim.bucket_size=5"]))
    assert sized.bucket_size == 5


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("bucket_size", 0, "optim.bucket_size=0 must be a positive integer"),
        ("overlap_grad_reduce", "yes", "optim.overlap_grad_reduce='yes' must be true or false"),
        ("overlap_param_gather", 1, "optim.overlap_param_gather=1 must be true or false"),
    ],
)
def test_bad_optim_fields_are_named(field, value, message):
    with pytest.raises(ConfigError, match=message):
        OptimConfig(**{field: value})


@cpu_only
@pytest.mark.parametrize("interleaved", [False, True])
def test_cpu_runs_no_fused_kernel(interleaved):
    layout = ParallelConfig(pipeline_model_parallel_size=2)
    if interleaved:
        layout = dataclasses.replace(layout, virtual_pipeline_model_parallel_size=2)
    config = transformer_config(LLMConfig(transformer_impl="local"), layout)
    off = ("gradient_accumulation_fusion", "cross_entropy_loss_fusion", "bias_dropout_fusion",
           "bias_activation_fusion", "apply_rope_fusion", "masked_softmax_fusion")  # fmt: skip
    assert not any(getattr(config, name) for name in off), {n: getattr(config, n) for n in off}
    assert config.cross_entropy_fusion_impl == "native"
    # Freed after the send, where the send has completed (not with interleaving's async sends).
    assert config.deallocate_pipeline_outputs is not interleaved
    assert config.overlap_p2p_comm is interleaved


def _without_transcripts(samples):
    return [dataclasses.replace(s, transcripts=None) for s in samples]


def _step_gradients(model, microbatches) -> dict[str, torch.Tensor]:
    """One step as the training loop runs it: the schedule over the micro-batches, then
    ``finalize_model_grads``; returns every gradient."""
    model[0].zero_grad_buffer()

    def forward_step(data_iterator, chunk):
        batch = next(data_iterator)
        output = chunk(batch)
        tokens = batch["answer_mask"].sum().to(torch.int)
        return output, lambda out: (out.float().sum(), tokens, {})

    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(microbatches),
        model=model[0],
        num_microbatches=len(microbatches),
        seq_length=0,  # no pipeline: each micro-batch keeps its own length
        micro_batch_size=2,
    )
    params = model[0].module.named_parameters()
    return {name: p.main_grad.clone() for name, p in params if p.requires_grad}


@pytest.mark.parametrize("first_with_ctc", [True, False], ids=["ctc-first", "no-ctc-first"])
def test_overlap_with_a_parameter_without_gradient(single_rank, first_with_ctc):
    samples = speech_samples("salm")
    with_ctc = [collate(samples[:2]), collate(samples[2:])]
    # The CTC head gets a gradient from the first micro-batch only, then from none.
    last_without = [with_ctc[0], collate(_without_transcripts(samples[2:]))]
    none = [collate(_without_transcripts(samples[:2])), last_without[1]]
    steps = [with_ctc, last_without, none] if first_with_ctc else [none, with_ctc, last_without]

    results = {}
    for overlap in (False, True):
        flag = str(overlap).lower()
        cfg = apply_overrides(
            tiny_config("salm", ctc_weight=0.5),
            [f"optim.overlap_grad_reduce={flag}", "optim.bucket_size=20000"],
        )
        torch.manual_seed(0)
        model = wrap_ddp(cfg, build_speech_llm(cfg))
        assert model[0].ddp_config.overlap_grad_reduce is overlap
        results[overlap] = [_step_gradients(model, step) for step in steps]
    for step, (on, off) in enumerate(zip(results[True], results[False], strict=True)):
        assert on.keys() == off.keys()
        for name in off:
            assert torch.equal(on[name], off[name]), (step, name)
    ctc = [name for name in results[False][0] if name.startswith("ctc.")]
    assert ctc and all(results[False][steps.index(none)][n].abs().sum() == 0 for n in ctc)
    assert all(results[False][steps.index(with_ctc)][n].abs().sum() > 0 for n in ctc)
