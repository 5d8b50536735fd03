"""Data: audio I/O, tokenizers, prompts and batches of plain tensors (never imports models)."""

from .batching import BucketBatcher, WeightedMix, token_cost
from .chat import chat_template
from .collate import SpeechSample, collate
from .conversation import Message
from .loader import LoadedStream, SampleStream
from .packing import PackBatcher
from .prompts import (
    DEFAULT_INSTRUCTIONS,
    PROMPT_FORMATS,
    Prompt,
    build_prompt,
    conversation_prompt,
    instruction,
)
from .tokenizers import AUDIO_TOKEN, Tokenizer, load_tokenizer

__all__ = [
    "AUDIO_TOKEN",
    "BucketBatcher",
    "LoadedStream",
    "PackBatcher",
    "SampleStream",
    "WeightedMix",
    "token_cost",
    "DEFAULT_INSTRUCTIONS",
    "Message",
    "PROMPT_FORMATS",
    "Prompt",
    "SpeechSample",
    "Tokenizer",
    "build_prompt",
    "chat_template",
    "conversation_prompt",
    "collate",
    "instruction",
    "load_tokenizer",
]
