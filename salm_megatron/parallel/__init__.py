"""Process groups, Megatron parallel state, seeds, and the CPU compatibility layer."""

from .runtime import (
    initialize,
    is_initialized,
    max_over_ranks,
    maxima_over_ranks,
    set_seed,
    single_process,
    teardown,
)

__all__ = [
    "initialize",
    "is_initialized",
    "max_over_ranks",
    "maxima_over_ranks",
    "set_seed",
    "single_process",
    "teardown",
]
