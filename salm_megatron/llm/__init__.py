"""Llama-family decoders on Megatron-Core: layer specs, the model builder, packed rows and
context parallelism for the local spec's attention."""

from .attention import PackedRows, packed_rows
from .context_parallel import local_chunks
from .model import build_llm, build_llm_chunks, transformer_config, vocab_parallel_hits
from .specs import decoder_spec, uses_transformer_engine

__all__ = [
    "PackedRows",
    "build_llm",
    "build_llm_chunks",
    "decoder_spec",
    "local_chunks",
    "packed_rows",
    "transformer_config",
    "uses_transformer_engine",
    "vocab_parallel_hits",
]
