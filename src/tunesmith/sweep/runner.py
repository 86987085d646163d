"""Run a study: each trial is a normal training run in OUT/trial-NNNN, scored and pruned at its evaluations.

    config + sweep.params ─► Optuna study (shared through its storage) ─► for each trial:
        sample values ─► trial config (output_dir OUT/trial-NNNN) ─► train(sinks=[_TrialSink], stop_requested)
        each EvalEnd: trial.report(objective value, step); the pruner says stop ─► stop_requested() is True
        ─► the run checkpoints and ends ─► the trial is PRUNED; otherwise its value is the best evaluation
    ─► report (table, best_config.yaml, plots, sweep.html, sweep.json)

The training loop needs no knowledge of sweeps: pruning goes through the same two hooks any caller has,
an event sink and ``stop_requested``. A trial that raises is recorded as FAIL with its error and the
sweep goes on; a stop request (Ctrl-C) ends the current trial at its next step boundary with a
checkpoint, marks it failed as interrupted, and ends the sweep, which can be continued later.
"""

from __future__ import annotations

import math
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydantic import ValidationError

from ..config import Config, ConfigError
from ..events import EvalEnd, RunStarted
from . import report as sweep_report
from .space import check_space, config_with_values, suggest
from .storage import display_url, open_study, storage_url

BUILTIN_OBJECTIVES = ("val_loss", "perplexity", "token_accuracy")


class SweepInterrupted(Exception):
    """The user asked to stop; the current trial was checkpointed and is recorded as failed (interrupted)."""


class ObjectiveMissing(Exception):
    """The objective metric is not among what an evaluation reports: a config problem, so the sweep stops."""


@dataclass
class SweepResult:
    out: Path
    study_name: str
    storage: str  # password hidden
    ran: list[int] = field(default_factory=list)  # trial numbers this process ran
    stopped: bool = False  # by the user (Ctrl-C)
    error: str | None = None  # a problem that stopped the sweep (the objective metric is missing)
    rows: list[dict] = field(default_factory=list)  # every trial of the study, for the table
    best: dict | None = None  # number, value, params, run_dir of the best completed trial
    files: dict[str, str] = field(default_factory=dict)

    @property
    def all_failed(self) -> bool:
        states = {r["number"]: r["state"] for r in self.rows}
        return bool(self.ran) and all(states.get(n) == "FAIL" for n in self.ran)


def run_sweep(cfg: Config, *, n_trials: int | None = None, study_name: str | None = None,
              storage: str | None = None, out: str | Path | None = None, quiet: bool = True,
              stop_requested: Callable[[], bool] = lambda: False,
              echo: Callable[[str], None] = print) -> SweepResult:
    """Run ``n_trials`` trials (default ``cfg.sweep.n_trials``) of the study, then write the report.

    Arguments left as None come from ``cfg.sweep``. ``stop_requested`` is polled at every step boundary of
    the current trial and between trials.
    """
    import optuna

    sc = cfg.sweep
    n_trials = sc.n_trials if n_trials is None else n_trials
    name = study_name or sc.study_name
    out = Path(out or sc.output_dir)
    _check_sweepable(cfg)
    url = storage_url(storage or sc.storage, out)
    direction = sc.resolved_direction()
    out.mkdir(parents=True, exist_ok=True)
    sweep_report.claim_folder(out, name, display_url(url))

    old_level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # each trial gets one line of ours instead
    try:
        try:
            study = open_study(url, name, direction, sampler=None, pruner=_pruner(sc))
        except Exception as e:  # a bad URL, a missing database driver, a server that does not answer
            raise ConfigError(f"cannot open the study storage {display_url(url)}: {type(e).__name__}: {e}") from None
        if study.direction.name.lower() != direction:
            raise ConfigError(f"study {name!r} in {display_url(url)} is set to {study.direction.name.lower()}, but "
                              f"sweep.direction resolves to {direction}: use another --study or set sweep.direction")
        study.sampler = _sampler(sc, sc.seed)
        result = SweepResult(out, name, display_url(url))
        objective = _Objective(cfg, out, direction, quiet, stop_requested, result)

        def after_trial(study, trial) -> None:
            result.ran.append(trial.number)
            echo(sweep_report.trial_line(trial, sc.objective))
            if stop_requested():
                result.stopped = True
                study.stop()

        if n_trials > 0 and not stop_requested():
            study.optimize(objective, n_trials=n_trials, catch=(Exception,), callbacks=[after_trial],
                           gc_after_trial=True)
        summary, result.files = sweep_report.write_report(study, cfg, out, display_url(url))
        result.rows, result.best = summary["trials"], summary["best"]
        return result
    finally:
        optuna.logging.set_verbosity(old_level)


def _check_sweepable(cfg: Config) -> None:
    sc = cfg.sweep
    problems = [] if sc.params else ["sweep.params is empty: name at least one config field to search, e.g. "
                                     "sweep.params: {train.lr: {low: 1.0e-5, high: 1.0e-3, log: true}}"]
    problems += check_space(sc.params, Config)
    if not cfg.data.train:
        problems.append("no training data: set data.train")
    if not cfg.data.valid and cfg.data.valid_fraction <= 0:
        problems.append("trials are scored on validation data: set data.valid or data.valid_fraction > 0")
    reported = evaluation_figures(cfg)
    if sc.objective not in reported:
        task_metrics = getattr(cfg.eval, "metrics", None)
        if task_metrics is None:
            problems.append(f"sweep.objective {sc.objective!r}: evaluations report {', '.join(reported)}")
        elif sc.objective not in task_metrics and not any(":" in m for m in task_metrics):
            problems.append(f"sweep.objective {sc.objective!r} is neither one of {', '.join(reported)} "
                            f"nor in eval.metrics ({', '.join(task_metrics) or 'empty'})")
        elif getattr(cfg.eval, "metric_examples", 1) == 0:
            problems.append(f"sweep.objective {sc.objective!r} is a task metric, but eval.metric_examples is 0")
    if problems:
        raise ConfigError("cannot start the sweep:\n  " + "\n  ".join(problems))


def _sampler(sc, seed: int | None):
    import warnings

    import optuna

    if sc.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # constant_liar: workers sharing a study treat each other's running trials as bad, so they
        # spread out instead of sampling the same promising point at once.
        return optuna.samplers.TPESampler(n_startup_trials=sc.startup_trials, seed=seed, constant_liar=True)


def _pruner(sc):
    import optuna

    if sc.pruner == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=sc.prune_after_trials, n_warmup_steps=sc.prune_warmup_steps)


def evaluation_figures(cfg: Config) -> tuple[str, ...]:
    """What every evaluation of a run with this config reports besides task metrics: the held-out loss, then the
    training objective's figures (sft: perplexity, token accuracy; dpo: rewards/accuracy, rewards/margins, ...)."""
    from ..objectives import for_config

    return ("val_loss",) + tuple(for_config(cfg).figures)


def metric_value(event: EvalEnd, name: str) -> float | None:
    """The sweep's metric in one evaluation: a task metric, the training objective's figure, or the held-out loss,
    perplexity or token accuracy."""
    for figures in (getattr(event, "metrics", None) or {}, getattr(event, "stats", None) or {}):
        if name in figures:
            return float(figures[name])
    if name in BUILTIN_OBJECTIVES and getattr(event, name, None) is not None:
        return float(getattr(event, name))
    return None


class _TrialSink:
    """An event sink for one trial: reports each evaluation to Optuna and asks the pruner whether to stop."""

    def __init__(self, trial, objective: str, prune: bool):
        self.trial, self.objective, self.prune = trial, objective, prune
        self.values: list[tuple[int, float]] = []
        self.total_steps: int | None = None
        self.prune_step: int | None = None
        self.missing: list[str] | None = None  # what the evaluation did report, when the objective was not there

    def __call__(self, event) -> None:
        if isinstance(event, RunStarted):
            self.total_steps = event.total_steps
        if not isinstance(event, EvalEnd) or self.prune_step is not None:
            return
        value = metric_value(event, self.objective)
        if value is None:
            self.missing = (["val_loss"] + [n for n in BUILTIN_OBJECTIVES[1:] if getattr(event, n, None) is not None]
                            + sorted(getattr(event, "stats", None) or {}) + sorted(getattr(event, "metrics", None) or {}))
            return
        self.values.append((event.step, value))
        self.trial.report(value, event.step)
        # The last evaluation is the trial's result: there is nothing left to save by pruning there.
        last = self.total_steps is not None and event.step >= self.total_steps
        if self.prune and not last and self.trial.should_prune():
            self.prune_step = event.step

    @property
    def stopping(self) -> bool:
        return self.prune_step is not None or self.missing is not None

    def close(self) -> None:
        pass


class _Objective:
    def __init__(self, cfg: Config, out: Path, direction: str, quiet: bool, stop_requested, result: SweepResult):
        self.cfg, self.out, self.direction, self.quiet = cfg, out, direction, quiet
        self.stop_requested, self.result = stop_requested, result

    def __call__(self, trial) -> float:
        import optuna

        from ..train import train

        sc = self.cfg.sweep
        run_dir = self.out / f"trial-{trial.number:04d}"
        trial.set_user_attr("run_dir", str(run_dir))
        try:
            if self.stop_requested():
                raise SweepInterrupted("interrupted before it started")
            if sc.seed is not None:
                # Seeded per trial number: reproducible, yet workers sharing the study (and a sweep
                # continued later) do not repeat each other's draws, as one seed per process would.
                trial.study.sampler = _sampler(sc, sc.seed + trial.number)
            values = suggest(trial, sc.params, Config)
            trial.set_user_attr("values", values)
            sink = _TrialSink(trial, sc.objective, prune=sc.pruner != "none")
            run = train(trial_config(self.cfg, values, run_dir), sinks=[sink], quiet=self.quiet,
                        stop_requested=lambda: sink.stopping or self.stop_requested())
            trial.set_user_attr("train_status", run.status)
            trial.set_user_attr("steps", run.steps)
            if sink.missing is not None:
                trial.study.stop()
                raise ObjectiveMissing(f"sweep.objective {sc.objective!r} is not reported by evaluations; they "
                                       f"report: {', '.join(sink.missing)}")
            if sink.prune_step is not None:
                trial.set_user_attr("pruned_at_step", sink.prune_step)
                raise optuna.TrialPruned(f"pruned at step {sink.prune_step}")
            if run.status == "interrupted":
                trial.study.stop()
                raise SweepInterrupted(f"interrupted at step {run.steps}; its checkpoint is in {run_dir}")
            finite = [v for _, v in sink.values if math.isfinite(v)]
            if not finite:
                raise RuntimeError(f"no evaluation gave a finite {sc.objective} (did the run evaluate at all?)")
            return min(finite) if self.direction == "minimize" else max(finite)
        except optuna.TrialPruned:
            raise
        except BaseException as e:  # recorded with the trial; Optuna marks it FAIL (and re-raises Ctrl-C)
            if isinstance(e, ObjectiveMissing):
                self.result.error = str(e)
            if isinstance(e, SweepInterrupted):
                self.result.stopped = True
                trial.set_user_attr("interrupted", True)
            trial.set_user_attr("error", f"{type(e).__name__}: {e}")
            tb = "".join(traceback.format_exception(e, limit=-8))
            trial.set_user_attr("traceback", tb if len(tb) <= 6000 else f"{tb[:2000]}\n[...]\n{tb[-4000:]}")
            raise


def trial_config(base: Config, values: dict[str, Any], run_dir: Path) -> Config:
    """The base config with one trial's values and its own run folder; the sweep section is left out."""
    data = config_with_values(base, values)
    data["output_dir"] = str(run_dir)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        where = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"the trial's values {values} make an invalid config: {where}") from None

