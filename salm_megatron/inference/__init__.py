"""Inference: KV-cache generation for SALM and BESTOW, metrics, ``salm eval`` / ``transcribe``."""

from .generation import Generator
from .metrics import bleu, cer, exact_match, task_metrics, wer

__all__ = ["Generator", "bleu", "cer", "exact_match", "task_metrics", "wer"]
