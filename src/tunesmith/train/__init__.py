"""Training: the loop, its step helpers, checkpoints and resume (the events it emits: tunesmith.events)."""

from .loop import RunResult, TrainingError, train

__all__ = ["train", "RunResult", "TrainingError"]
