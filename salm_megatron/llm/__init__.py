"""Llama-family decoders on Megatron-Core: layer specs and the model builder."""

from .model import build_llm, build_llm_chunks, transformer_config, vocab_parallel_hits
from .specs import decoder_spec, uses_transformer_engine

__all__ = [
    "build_llm",
    "build_llm_chunks",
    "decoder_spec",
    "transformer_config",
    "uses_transformer_engine",
    "vocab_parallel_hits",
]
