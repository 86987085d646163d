"""The exception and warning the models package raises, worded for the person running tunesmith."""

from __future__ import annotations


class ModelError(Exception):
    """A model could not be found, converted, loaded or adapted.

    The message says what failed, why, and what to do; the CLI prints it without a traceback.
    """


class ModelWarning(UserWarning):
    """Something about the model works but deserves the user's attention (shown once by ``warnings``)."""
