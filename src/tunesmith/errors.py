"""The exceptions that mean "bad input": the CLI prints their message (no traceback) and exits 2."""

from __future__ import annotations


def user_errors() -> tuple[type[BaseException], ...]:
    from .config import ConfigError
    from .data import DataError
    from .export.errors import ExportError
    from .models import ModelError
    from .safety import SafetyDataError, SafetyGateError
    from .safety.harmful import ModerationError
    from .train.loop import TrainingError
    from .train.run import RunDirError

    return (ConfigError, DataError, ExportError, ModelError, ModerationError, RunDirError, SafetyDataError,
            SafetyGateError, TrainingError)
