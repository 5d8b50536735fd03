"""Data: plain tensors for the models (never imports models)."""

from .collate import SpeechSample, collate

__all__ = ["SpeechSample", "collate"]
