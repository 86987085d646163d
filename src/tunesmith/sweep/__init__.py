"""Hyperparameter search: Optuna studies over config fields, each trial a normal run, pruned at evaluations.

Imports are lazy: ``tunesmith.config`` imports ``sweep.space`` for the config section, and the runner
imports the config, so this package must not import the runner when it is first loaded.
"""

from __future__ import annotations

__all__ = ["run_sweep", "SweepResult"]


def __getattr__(name: str):
    if name in __all__:
        from . import runner

        return getattr(runner, name)
    raise AttributeError(name)
