"""The exception the export package raises, worded for the person running tunesmith."""

from __future__ import annotations


class ExportError(Exception):
    """A model could not be exported: the format does not fit the model, the merge or a check failed.

    The message says what failed and what to do; the CLI prints it without a traceback (exit code 2).
    """
