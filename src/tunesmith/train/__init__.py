"""Training: the loop, its step helpers, checkpoints, events and sinks."""

from .loop import RunResult, TrainingError, train

__all__ = ["train", "RunResult", "TrainingError"]
