"""RMSNorm and LayerNorm for the local spec, usable with sequence parallelism.

With sequence parallelism each tensor-parallel rank normalises a different slice of the sequence,
so the norm's weight gradient is partial on every rank. Megatron sums such gradients across the TP
group in ``finalize_model_grads`` for parameters marked ``sequence_parallel``; these norms set that
mark (PyTorch's own norms, used by Megatron's fallback spec, refuse sequence parallelism).

Qwen3's query/key norms (``q_layernorm``, ``k_layernorm``) see this rank's heads, so their
gradient is partial at any TP: ``finalize_model_grads`` sums them by name when
``config.qk_layernorm`` is set. Under SP they carry the mark too; Megatron's test is one
condition (mark or name), so they are summed once (``tests/parallel/test_speech_parallel.py``,
Qwen3-style LLM at TP=2 + SP).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class Norm(torch.nn.Module):
    """RMSNorm or LayerNorm chosen by ``config.normalization``, computed in fp32."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        if config.normalization not in ("RMSNorm", "LayerNorm"):
            raise ValueError(f"normalization={config.normalization!r}: use RMSNorm or LayerNorm")
        if config.layernorm_zero_centered_gamma:
            raise ValueError("layernorm_zero_centered_gamma is not supported by the local spec")
        self.rms = config.normalization == "RMSNorm"
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.bias = (
            None
            if self.rms
            else torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        )
        for param in self.parameters():
            param.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        if self.rms:
            y = (
                x32
                * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
                * self.weight.float()
            )
        else:
            y = torch.nn.functional.layer_norm(
                x32, x32.shape[-1:], self.weight.float(), self.bias.float(), self.eps
            )
        return y.type_as(x)
