"""LoRA on the LLM's tensor-parallel linears: ``W x + alpha / rank * B A dropout(x)``.

Each adapter is split over TP ranks the way its base ``W`` is, and Megatron's own parallel
linears do every collective, so results equal TP=1 with and without sequence parallelism:

- column-parallel bases (``linear_qkv``, ``linear_fc1``; output split over TP): ``A`` replicated,
  ``B`` a :class:`ColumnParallelLinear` whose rows are split like ``W``'s. ``B`` copies its input
  to the TP region (gradients all-reduced), or with SP all-gathers it from the sequence-parallel
  region, exactly where ``W`` does::

      x [s(/tp), b, h] -> A -> [s(/tp), b, r] -> B -> [s, b, out/tp]

- row-parallel bases (``linear_proj``, ``linear_fc2``; input split over TP): ``A`` a
  :class:`RowParallelLinear` whose columns are split like ``W``'s, reducing its partial products
  as ``W`` does (all-reduce, or with SP reduce-scatter to the sequence-parallel region); ``B``
  replicated::

      x [s, b, in/tp] -> A -> [s(/tp), b, r] -> B -> [s(/tp), b, out]

Collectives move rank-``r`` activations only. A replicated weight that sees just this rank's share
of the sequence (SP) carries ``sequence_parallel``, so ``finalize_model_grads`` sums its gradient
over TP as it does a norm's. Initial adapters do not depend on the layout: ``A`` is drawn whole
from a generator seeded by (seed, layer, target) and this rank keeps its slice; ``B`` starts at 0.

Checkpoints keep the base's keys (a LoRA model reads a plain LLM checkpoint and writes the same base
keys) and add ``<linear>.lora_a.weight`` / ``<linear>.lora_b.weight``, sharded like their layers,
so adapters saved at one TP size load at another.

Mixture of experts: the attention's linears (``linear_qkv``, ``linear_proj``) take adapters as in
a dense model, at any TP/EP; the frozen experts and router still route and compute, and their
gradients still reach the adapters below. What is left: adapters on the experts' linears (one per
expert, split over expert-parallel and expert-TP ranks, in the SequentialMLP and in Transformer
Engine's grouped GEMM) and on the router; until then ``lora.targets`` with ``linear_fc1`` or
``linear_fc2`` is refused for an MoE LLM (``Config``), naming the targets that work.
"""

from __future__ import annotations

import hashlib
import math
from typing import NamedTuple

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.utils import apply_prefix_mapping
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.transformer_layer import TransformerLayer

from ..config import LoRAConfig


class Target(NamedTuple):
    parent: str  # the TransformerLayer submodule holding the linear
    column: bool  # column-parallel (output split over TP), else row-parallel (input split)


TARGETS = {
    "linear_qkv": Target("self_attention", column=True),
    "linear_proj": Target("self_attention", column=False),
    "linear_fc1": Target("mlp", column=True),
    "linear_fc2": Target("mlp", column=False),
}


class LoRALinear(MegatronModule):
    """A Megatron linear (local or Transformer Engine) plus its low-rank adapter.

    ``forward`` keeps the base's ``(output, bias)`` contract. A Transformer Engine linear with a
    fused input norm (``TELayerNormColumnParallelLinear``) is asked for its normalized input, which
    is what the adapter must see (the local spec's norm is a separate module before the linear).
    """

    def __init__(self, base: torch.nn.Module, target: str, cfg: LoRAConfig, config):
        super().__init__(config=config)
        self.base = base
        self.target = target
        self.column = TARGETS[target].column
        self.scale = cfg.alpha / cfg.rank
        self.dropout = torch.nn.Dropout(cfg.dropout)
        # Gated MLPs keep [gate; up] per TP shard in linear_fc1: checkpoints re-split it.
        self.gated = target == "linear_fc1" and config.gated_linear_unit
        tp = parallel_state.get_tensor_model_parallel_world_size()
        out_local, in_local = base.weight.shape
        device = base.weight.device
        dtype = config.params_dtype
        common = dict(config=config, init_method=torch.nn.init.zeros_, bias=False)
        if self.column:
            self.lora_a = _replicated(in_local, cfg.rank, device, dtype)
            self.lora_b = ColumnParallelLinear(
                cfg.rank, out_local * tp, gather_output=False, skip_bias_add=True, **common
            )
            replicated = self.lora_a.weight
        else:
            self.lora_a = RowParallelLinear(
                in_local * tp, cfg.rank, input_is_parallel=True, skip_bias_add=True, **common
            )
            self.lora_b = _replicated(cfg.rank, out_local, device, dtype)
            replicated = self.lora_b.weight
        # Under SP the replicated factor sees only this rank's share of the sequence:
        # finalize_model_grads then sums its gradient over TP (it reads the flag only with SP).
        replicated.sequence_parallel = config.sequence_parallel
        # Input split over TP (row-parallel always, column-parallel under SP): dropout masks
        # come from the model-parallel RNG, which differs per TP rank, as Megatron's do.
        self.split_input = not self.column or config.sequence_parallel
        self.norm_fused = hasattr(base, "return_layernorm_output")
        if self.norm_fused:
            base.return_layernorm_output = True
            base.return_layernorm_output_gathered = False  # this rank's share, as x arrives

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        """``A`` kaiming-uniform (as ``nn.Linear``) over the whole input, this rank's slice kept;
        ``B`` zero, so a new adapter leaves the model unchanged."""
        a = self.lora_a.weight
        if self.column:
            fan_in, split = a.shape[1], 1
        else:
            split = parallel_state.get_tensor_model_parallel_world_size()
            fan_in = a.shape[1] * split
        bound = 1.0 / math.sqrt(fan_in)
        whole = torch.empty(a.shape[0], fan_in).uniform_(-bound, bound, generator=generator)
        rank = parallel_state.get_tensor_model_parallel_rank() if split > 1 else 0
        a.copy_(whole.chunk(split, dim=1)[rank])
        self.lora_b.weight.zero_()

    def forward(self, x: torch.Tensor, *args, **kwargs):
        result = self.base(x, *args, **kwargs)
        if not self.norm_fused:
            output, bias = result
        elif len(result) == 3:  # TE returning its bias: (output, bias, normalized input)
            output, bias, x = result
        else:  # Megatron's TE wrapper: ((output, normalized input), None)
            (output, x), bias = result
        return output + self.scale * self._delta(x), bias

    def _delta(self, x: torch.Tensor) -> torch.Tensor:
        """``B A dropout(x)``, split like the base's output."""
        if self.training and self.dropout.p > 0:
            if self.split_input:
                with tensor_parallel.get_cuda_rng_tracker().fork():
                    x = self.dropout(x)
            else:  # replicated over TP: the same mask everywhere (the default RNG agrees)
                x = self.dropout(x)
        if self.column:
            delta, _ = self.lora_b(self.lora_a(x))
        else:
            low, _ = self.lora_a(x)
            delta = self.lora_b(low)
        return delta

    def backward_dw(self) -> None:
        """Delayed weight gradients (Megatron calls this on every linear); the adapter's are not."""
        if hasattr(self.base, "backward_dw"):
            self.base.backward_dw()

    @torch.no_grad()
    def merged(self) -> torch.nn.Module:
        """The base with ``scale * B A`` folded into this rank's shard of its weight (both
        factors are split so that ``B_local @ A_local`` is exactly that shard's update). The sum
        is taken in fp32 for this one tensor and rounded once to the weight's dtype, which the
        weight keeps (a bf16 model merges in bf16 memory)."""
        weight = self.base.weight
        a, b = self.lora_a.weight.float(), self.lora_b.weight.float()
        weight.copy_(torch.addmm(weight.float(), b, a, alpha=self.scale))
        if self.norm_fused:
            self.base.return_layernorm_output = False
        return self.base

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """The base's entries under its own keys (``<linear>.weight``, not ``.base.weight``);
        the adapters' under ``<linear>.lora_a.`` / ``<linear>.lora_b.``."""
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        for factor in ("lora_a", "lora_b"):  # Megatron's local linears keep None there
            state.pop(f"{prefix}{factor}._extra_state", None)
        apply_prefix_mapping(state, {f"{prefix}base.": prefix})
        if self.gated:
            single = (metadata or {}).get("singleton_local_shards", False)
            for key in (f"{prefix}base.weight", f"{prefix}base.bias", f"{prefix}lora_b.weight"):
                if key in state:
                    state[key] = apply_swiglu_sharded_factory(state[key], sharded_offsets, single)
        return state


def _replicated(in_features: int, out_features: int, device, dtype) -> torch.nn.Linear:
    """A linear every TP rank holds whole; uninitialised (no draw from the default RNG, so the
    rest of the model initialises as without LoRA)."""
    return torch.nn.utils.skip_init(
        torch.nn.Linear, in_features, out_features, bias=False, device=device, dtype=dtype
    )


def _generator(seed: int, layer_number: int, target: str) -> torch.Generator:
    """One generator per (seed, global layer number, target): the same at every TP/PP layout."""
    digest = hashlib.sha256(f"{seed}/{layer_number}/{target}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def apply_lora(model: torch.nn.Module, cfg: LoRAConfig, seed: int = 0) -> list[LoRALinear]:
    """Wrap ``cfg.targets`` of every transformer layer in ``model`` (a GPTModel chunk) with
    adapters of ``cfg.rank``; nothing when the rank is 0. Returns the new modules."""
    if cfg.rank == 0:
        return []
    added = []
    layers = [m for m in model.modules() if isinstance(m, TransformerLayer)]
    for layer in layers:
        for target in cfg.targets:
            parent = getattr(layer, TARGETS[target].parent)
            if isinstance(parent, MoELayer):
                raise ValueError(
                    f"lora.targets: {target} of layer {layer.layer_number} is an MoE layer's, "
                    "whose experts get no adapters here; adapt linear_qkv and linear_proj"
                )
            base = getattr(parent, target, None)
            if base is None or not hasattr(base, "weight"):
                raise ValueError(
                    f"lora.targets: layer {layer.layer_number} has no "
                    f"{TARGETS[target].parent}.{target} linear to adapt (found {type(base)})"
                )
            if isinstance(base, LoRALinear):
                raise ValueError(f"layer {layer.layer_number}'s {target} already has LoRA")
            lora = LoRALinear(base, target, cfg, layer.config)
            lora.reset_parameters(_generator(seed, layer.layer_number, target))
            setattr(parent, target, lora)
            added.append(lora)
    return added


def lora_modules(model: torch.nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def adapter_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The adapters' weights (what trains when the LLM is frozen)."""
    return [p for m in lora_modules(model) for p in (m.lora_a.weight, m.lora_b.weight)]


@torch.no_grad()
def merge_lora(model: torch.nn.Module) -> None:
    """Fold every adapter into its base weight in place (``W += alpha / rank * B A`` on each TP
    shard, in the weight's dtype) and put the plain base linears back: the model is then a plain
    LLM again, with the same parameters, keys and outputs (up to rounding)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merged())
