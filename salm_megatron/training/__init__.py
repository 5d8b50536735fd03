"""Training: the loop on Megatron-Core's schedules, DDP and optimizer; checkpoints; reporting."""

from .loop import Preempted, Trainer, TrainingError, train

__all__ = ["Preempted", "Trainer", "TrainingError", "train"]
