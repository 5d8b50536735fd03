"""Training: the loop on Megatron-Core's schedules, DDP and optimizer; checkpoints; reporting."""

from .loop import Trainer, TrainingError, train

__all__ = ["Trainer", "TrainingError", "train"]
