"""The exceptions that mean "bad input": the CLI prints their message (no traceback) and exits 2."""

from __future__ import annotations


def user_errors() -> tuple[type[BaseException], ...]:
    from .config import ConfigError
    from .data import DataError
    from .models import ModelError
    from .train.loop import TrainingError
    from .train.run import RunDirError

    return (ConfigError, DataError, ModelError, RunDirError, TrainingError)
