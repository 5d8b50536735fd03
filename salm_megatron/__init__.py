"""salm-megatron: speech-augmented LLMs (SALM, BESTOW) on Megatron-Core."""

__version__ = "0.1.0"
