"""Data: audio I/O, tokenizers, prompts and batches of plain tensors (never imports models)."""

from .collate import SpeechSample, collate
from .prompts import DEFAULT_INSTRUCTIONS, PROMPT_FORMATS, Prompt, build_prompt, instruction
from .tokenizers import AUDIO_TOKEN, Tokenizer, load_tokenizer

__all__ = [
    "AUDIO_TOKEN",
    "DEFAULT_INSTRUCTIONS",
    "PROMPT_FORMATS",
    "Prompt",
    "SpeechSample",
    "Tokenizer",
    "build_prompt",
    "collate",
    "instruction",
    "load_tokenizer",
]
