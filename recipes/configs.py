"""The training configs behind the recipes, as plain :class:`Config` objects (no NeMo-Run here).

Each sets a parallel layout that fits its model on 80 GB GPUs; the comment above it holds the
arithmetic. Bytes per trainable parameter with bf16 weights, fp32 gradient buffers
(``grad_reduce_in_fp32``) and the distributed optimizer (fp32 master copy + Adam's two moments,
sharded over data-parallel ranks): ``2 + 4 + 12 / DP``. A frozen parameter costs its 2 bytes
only. Activations per decoder layer and micro-batch, without recompute, roughly
``34 x s x b x h / TP`` bytes (s tokens, b micro-batch, h hidden; flash attention, SP on).
The sequences are short: 40 s of audio is 500 encoder frames, 250 LLM tokens after the adapter's
stacking by 2, so ``s`` = 1024 covers audio plus prompt and answer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from salm_megatron import config as salm_config
from salm_megatron.config import (
    AdapterConfig,
    BestowConfig,
    CheckpointConfig,
    Config,
    DataConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
    encoder_preset,
    llm_preset,
)

# The LoRA section comes with the LoRA issue; without it the 8B SALM recipe trains the encoder
# and adapter against a frozen LLM.
LoRAConfig = getattr(salm_config, "LoRAConfig", None)


@dataclass(frozen=True)
class Recipe:
    """A named config and the machines it is laid out for (``nodes`` x ``tasks_per_node``)."""

    config: Callable[[], Config]
    nodes: int
    tasks_per_node: int
    help: str

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node


def _llama3_data(micro_batch_size: int) -> DataConfig:
    """Llama 3 chat prompts; shards and tokenizer are the user's (``data.train_shards=...``)."""
    return DataConfig(prompt_format="llama3", micro_batch_size=micro_batch_size, num_workers=4)


def salm_tiny() -> Config:
    """Test size on CPU: 2 processes, data parallel (the distributed optimizer shards over it).
    Needs ``data.train_shards``, ``data.tokenizer`` and an ``llm.vocab_size`` equal to the
    tokenizer's (the placeholder is its last id)."""
    return Config(
        model=ModelConfig(arch="salm"),
        adapter=AdapterConfig(type="mlp", stack=2, hidden_size=128),
        data=DataConfig(micro_batch_size=4, num_workers=1, bucket_window=16, shuffle_buffer=8),
        optim=OptimConfig(lr=3e-3, warmup_steps=2),
        train=TrainConfig(steps=20, num_microbatches=2, output_dir="runs/salm-tiny"),
        checkpoint=CheckpointConfig(interval=10),
    )


# Llama-3.2-1B (1.24 B) + FastConformer-large (0.11 B) + MLP adapter (0.01 B) = 1.36 B, all
# trained. One node, TP 1, PP 1, DP 8: 1.36 B x (2 + 4 + 12/8) B = 10.2 GB per GPU.
# Activations (b 8, s 1024, h 2048, 16 layers): 34 x 1024 x 8 x 2048 x 16 = 9.1 GB; the
# encoder's about 2 GB. About 21 GB of 80.
def salm_llama3_2_1b() -> Config:
    return Config(
        model=ModelConfig(arch="salm"),
        llm=llm_preset("llama3.2-1b"),
        encoder=encoder_preset("fastconformer-large"),
        adapter=AdapterConfig(type="mlp", stack=2),
        data=_llama3_data(micro_batch_size=8),
        optim=OptimConfig(lr=1e-4, encoder_lr=5e-5, warmup_steps=1000),
        train=TrainConfig(steps=100000, global_batch_size=128, output_dir="runs/salm-llama3.2-1b"),
    )


# Llama-3-8B frozen with LoRA (rank 32 on all four linears: 32 x (10240 + 8192 + 32768 + 18432)
# x 32 layers = 71 M) + Canary-size FastConformer-XL (0.61 B) + MLP adapter (0.03 B), trained.
# One node, TP 2 with SP, DP 4. Frozen LLM: 8.03 B x 2 B / TP 2 = 8.0 GB. Trained: encoder and
# adapter replicated over TP, 0.64 B x (2 + 4 + 12/4) = 5.8 GB; LoRA 71 M / 2 x 9 = 0.3 GB.
# Activations (b 4, s 1024, h 4096, 32 layers, / TP 2): 9.1 GB; encoder about 3 GB.
# About 27 GB of 80.
def salm_llama3_8b() -> Config:
    extra = {"lora": LoRAConfig(rank=32, alpha=64.0, dropout=0.05)} if LoRAConfig else {}
    return Config(
        model=ModelConfig(arch="salm", freeze_llm=True),
        llm=llm_preset("llama3-8b"),
        encoder=encoder_preset("fastconformer-xl"),
        adapter=AdapterConfig(type="mlp", stack=2),
        parallel=ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True),
        data=_llama3_data(micro_batch_size=4),
        optim=OptimConfig(lr=2e-4, encoder_lr=5e-5, warmup_steps=1000),
        train=TrainConfig(steps=100000, global_batch_size=128, output_dir="runs/salm-llama3-8b"),
        **extra,
    )


# BESTOW on Llama-3-8B, all trained: LLM 8.03 B + FastConformer-XL 0.61 B + 2 cross-attention
# layers (4 h^2 + 2 h x 4h = 0.2 B each) 0.4 B + adapter 0.03 B. Two nodes, TP 2 with SP, DP 8.
# LLM: 8.03 B / TP 2 x (2 + 4 + 12/8) = 30.1 GB; the first-stage parts, replicated over TP:
# 1.04 B x 7.5 = 7.8 GB. Activations (b 2, s 1024, h 4096, 32 layers, / TP 2): 4.6 GB; encoder
# and cross-attention about 2 GB. About 45 GB of 80.
def bestow_llama3_8b() -> Config:
    return Config(
        model=ModelConfig(arch="bestow"),
        llm=llm_preset("llama3-8b"),
        encoder=encoder_preset("fastconformer-xl"),
        adapter=AdapterConfig(type="mlp", stack=2),
        bestow=BestowConfig(num_layers=2, num_heads=32),
        parallel=ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True),
        data=_llama3_data(micro_batch_size=2),
        optim=OptimConfig(lr=5e-5, encoder_lr=5e-5, adapter_lr=2e-4, warmup_steps=1000),
        train=TrainConfig(steps=100000, global_batch_size=128, output_dir="runs/bestow-llama3-8b"),
    )


# Llama-3-70B, all trained, FP8 (Transformer Engine). Eight nodes: TP 8 with SP x PP 4 = 32 GPUs
# per replica, DP 2. LLM: 70.55 B / 32 = 2.2 B per GPU x (2 + 4 + 12/2) = 26.5 GB, plus FP8
# copies of the weights, about 1 B each: 2.2 GB. The first stage also holds FastConformer-XL and
# the adapter (0.7 B, replicated over TP) x 12 = 8.4 GB. Activations (b 1, s 2048, h 8192,
# 20 layers per stage, / TP 8): 34 x 2048 x 8192 / 8 x 20 = 1.4 GB per micro-batch, up to 4 in
# flight on the first stage (1F1B): 5.7 GB. About 43 GB of 80 on the first stage.
def salm_llama3_70b() -> Config:
    return Config(
        model=ModelConfig(arch="salm"),
        llm=llm_preset("llama3-70b", fp8="hybrid", transformer_impl="transformer_engine"),
        encoder=encoder_preset("fastconformer-xl"),
        adapter=AdapterConfig(type="mlp", stack=2),
        parallel=ParallelConfig(
            tensor_model_parallel_size=8, pipeline_model_parallel_size=4, sequence_parallel=True
        ),
        data=_llama3_data(micro_batch_size=1),
        optim=OptimConfig(lr=2e-5, encoder_lr=5e-5, adapter_lr=1e-4, warmup_steps=500),
        train=TrainConfig(steps=50000, global_batch_size=128, output_dir="runs/salm-llama3-70b"),
        checkpoint=CheckpointConfig(interval=250, async_save=True),
    )


# Qwen3-30B-A3B (30.5 B, 3.35 B active: 48 layers of 128 experts of FFN 768, 8 per token) +
# FastConformer-XL (0.61 B) + MLP adapter (0.01 B), all trained. Two nodes, EP 8 (16 experts per
# layer on each GPU) carved from DP 16. The dense 1.54 B (attention, norms, routers, embeddings)
# x (2 + 4 + 12/16) = 10.4 GB; the experts, 29.0 B / EP 8 = 3.62 B per GPU, x (2 + 4 + 12/2) =
# 43.5 GB (their optimizer state shards over the 16 / 8 = 2 expert-data-parallel ranks); the
# first-stage parts 0.62 B x 6.75 = 4.2 GB. Activations (b 1, s 1024, h 2048, 48 layers): 34 x
# 1024 x 2048 x 48 = 3.4 GB, and each token's 8 experts' inputs, FFN and outputs, 2 x 8 x (2 h +
# 3 x 768) = 102 KB per token and layer: 5.0 GB; encoder about 2 GB. About 69 GB of 80.
# Qwen3 prompts through the tokenizer's chat template, where that format exists.
def salm_qwen3_30b_a3b() -> Config:
    chat = "chat" if "chat" in salm_config.PROMPT_FORMATS else "plain"
    return Config(
        model=ModelConfig(arch="salm"),
        llm=llm_preset("qwen3-30b-a3b"),
        encoder=encoder_preset("fastconformer-xl"),
        adapter=AdapterConfig(type="mlp", stack=2),
        parallel=ParallelConfig(expert_model_parallel_size=8),
        data=DataConfig(prompt_format=chat, micro_batch_size=1, num_workers=4),
        optim=OptimConfig(lr=5e-5, encoder_lr=5e-5, adapter_lr=2e-4, warmup_steps=1000),
        train=TrainConfig(steps=50000, global_batch_size=128, output_dir="runs/salm-qwen3-30b-a3b"),
        checkpoint=CheckpointConfig(interval=500, optimizer_format="fully_reshardable"),
    )


TRAINING: dict[str, Recipe] = {
    "salm_tiny": Recipe(salm_tiny, 1, 2, "tiny SALM on CPU, 2 processes (tests, trying things)"),
    "salm_llama3_2_1b": Recipe(salm_llama3_2_1b, 1, 8, "SALM, Llama-3.2-1B, 1 x 8 GPUs"),
    "salm_llama3_8b": Recipe(salm_llama3_8b, 1, 8, "SALM, Llama-3-8B + LoRA, 1 x 8 GPUs"),
    "bestow_llama3_8b": Recipe(bestow_llama3_8b, 2, 8, "BESTOW, Llama-3-8B, 2 x 8 GPUs"),
    "salm_llama3_70b": Recipe(salm_llama3_70b, 8, 8, "SALM, Llama-3-70B, FP8, 8 x 8 GPUs"),
    "salm_qwen3_30b_a3b": Recipe(
        salm_qwen3_30b_a3b, 2, 8, "SALM, Qwen3-30B-A3B (MoE, EP 8), 2 x 8 GPUs"
    ),
}
