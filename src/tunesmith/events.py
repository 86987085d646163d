"""Typed events a run emits (training, evaluation, the safety gate, the report), and the sinks that consume them.

Top-level so that every package (train, safety, report, sweep, server) imports them without a cycle.

The loop never prints: it emits events, and sinks (console progress, metrics.jsonl, the run log,
TensorBoard, MLflow) decide how to show or store them. A sink is anything with ``__call__(event)`` and
``close()``; a failing sink is reported once and then ignored so that logging can never kill a run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("tunesmith")


@dataclass
class RunStarted:
    output_dir: str
    method: str
    trainable_params: int
    total_params: int
    total_steps: int
    steps_per_epoch: int
    train_examples: int
    valid_examples: int
    device: str
    dtype: str
    processes: int
    resumed_from_step: int = 0
    kind: str = "run_started"


@dataclass
class StepEnd:
    step: int
    total_steps: int
    epoch: float
    loss: float
    lr: float
    grad_norm: float | None
    tokens: int  # target tokens in this step (all processes)
    tokens_per_s: float
    elapsed_s: float
    eta_s: float | None = None  # remaining optimizer steps at this run's average step time (evaluations excluded)
    stats: dict[str, float] = field(default_factory=dict)  # the objective's own (dpo: rewards/chosen, ...), per pair
    kind: str = "train"


@dataclass
class EvalEnd:
    step: int
    epoch: float
    val_loss: float  # the objective's held-out loss (sft: per target token; dpo: per pair): it picks the best
    perplexity: float | None  # sft only
    token_accuracy: float | None  # sft only
    val_tokens: int  # what val_loss averages over: target tokens (sft), pairs (preference objectives)
    is_best: bool
    samples: list[dict] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)  # task metrics on eval.metric_examples validation examples
    train_loss: float | None = None  # mean training loss since the previous evaluation (same unit as val_loss)
    stats: dict[str, float] = field(default_factory=dict)  # the objective's own held-out figures (dpo: rewards/accuracy, ...)
    kind: str = "eval"


@dataclass
class CheckpointSaved:
    step: int
    path: str
    kind: str = "checkpoint"


@dataclass
class Message:
    level: str  # info | warning | error
    text: str
    step: int | None = None
    kind: str = "message"


@dataclass
class EarlyStopped:
    step: int
    best_step: int
    best_val_loss: float
    patience: int
    kind: str = "early_stop"


@dataclass
class OverfitWarning:
    """Validation loss rose ``streak`` evaluations in a row while training loss fell: a warning, like Message."""
    step: int
    text: str
    streak: int
    val_losses: list[float]  # the last streak + 1 validation losses, oldest first
    train_losses: list[float]  # training loss means over the same evaluations
    best_step: int | None
    level: str = "warning"
    kind: str = "overfit_warning"


@dataclass
class RunEnded:
    step: int
    status: str  # completed | early_stopped | interrupted | failed
    best_step: int | None
    best_val_loss: float | None
    elapsed_s: float
    kind: str = "run_ended"


Event = RunStarted | StepEnd | EvalEnd | CheckpointSaved | Message | EarlyStopped | OverfitWarning | RunEnded


class Sink(Protocol):
    def __call__(self, event: Event) -> None: ...
    def close(self) -> None: ...


def event_dict(event: Event) -> dict[str, Any]:
    d = dataclasses.asdict(event)
    d["time"] = time.time()
    return d


class Emitter:
    """Fans events out to sinks; a sink that raises is disabled with one warning."""

    def __init__(self, sinks: list[Sink]):
        self.sinks = list(sinks)

    def __call__(self, event: Event) -> None:
        for sink in list(self.sinks):
            try:
                sink(event)
            except Exception as e:  # logging must never kill a run
                self.sinks.remove(sink)
                log.warning("metrics sink %s failed and was disabled: %s", type(sink).__name__, e)

    def close(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception:
                pass


class JsonlSink:
    """Appends every event as one JSON line (metrics.jsonl), flushed at once so a crash loses nothing."""

    def __init__(self, path: str | Path):
        self.f = open(path, "a", encoding="utf-8")

    def __call__(self, event: Event) -> None:
        self.f.write(json.dumps(event_dict(event), default=str) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


class LogFileSink:
    """Human-readable run log (train.log)."""

    def __init__(self, path: str | Path):
        self.f = open(path, "a", encoding="utf-8")

    def __call__(self, event: Event) -> None:
        self.f.write(time.strftime("%Y-%m-%d %H:%M:%S ") + format_event(event) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


class TensorBoardSink:
    """Scalars to TensorBoard event files under RUN/tensorboard (when the package is installed).

    The writer opens at ``RunStarted``: a resumed run passes ``purge_step`` (the checkpoint's step + 1), so
    the steps a killed run logged after its last checkpoint are dropped by TensorBoard instead of shown
    twice, exactly as metrics.jsonl is truncated on resume.
    """

    def __init__(self, logdir: str | Path):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self._open = lambda purge_step=None: SummaryWriter(log_dir=str(logdir), purge_step=purge_step)
        self.w = None

    def __call__(self, event: Event) -> None:
        if isinstance(event, RunStarted) and self.w is None:
            resumed = event.resumed_from_step
            self.w = self._open(resumed + 1 if resumed else None)
        if not isinstance(event, (StepEnd, EvalEnd)):
            return
        if self.w is None:
            self.w = self._open()
        if isinstance(event, StepEnd):
            self.w.add_scalar("train/loss", event.loss, event.step)
            self.w.add_scalar("train/lr", event.lr, event.step)
            self.w.add_scalar("train/tokens_per_s", event.tokens_per_s, event.step)
            if event.grad_norm is not None:
                self.w.add_scalar("train/grad_norm", event.grad_norm, event.step)
            for name, value in event.stats.items():
                self.w.add_scalar(f"train/{name}", value, event.step)
        elif isinstance(event, EvalEnd):
            self.w.add_scalar("eval/loss", event.val_loss, event.step)
            for name, value in _eval_figures(event).items():
                self.w.add_scalar(f"eval/{name}", value, event.step)
            if event.train_loss is not None:
                self.w.add_scalar("eval/train_loss_since_last_eval", event.train_loss, event.step)
        self.w.flush()

    def close(self) -> None:
        if self.w is not None:
            self.w.close()


def tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


class MLflowSink:
    """Config as params, train/eval scalars as metrics, and at the end the run's report and files as artifacts.

    Logs through an ``MlflowClient`` with an explicit run id, not mlflow's global active run, so a run the
    caller has open is never touched. The id is kept in RUN/mlflow_run_id, so a resumed run goes on
    logging into the same MLflow run.
    """

    ARTIFACTS = ("report.html", "compare.json", "run.json", "preflight.json", "config.resolved.yaml")

    def __init__(self, tracking_uri: str, experiment: str, run_dir: str | Path, params: dict[str, Any] | None = None):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=mlflow_uri(tracking_uri))
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(experiment)
        self.run_dir = Path(run_dir)
        id_file = self.run_dir / "mlflow_run_id"
        self.run_id = id_file.read_text(encoding="utf-8").strip() if id_file.is_file() else ""
        if not self.run_id:
            run = self.client.create_run(exp_id, run_name=self.run_dir.name,
                                         tags={"tunesmith.run_dir": str(self.run_dir.resolve())})
            self.run_id = run.info.run_id
            id_file.write_text(self.run_id + "\n", encoding="utf-8")
            items = [Param(k, str(v)[:6000]) for k, v in sorted((params or {}).items())]
            for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=items[i:i + 100])
        self.status = "FAILED"  # until a RunEnded says otherwise

    def __call__(self, event: Event) -> None:
        if isinstance(event, StepEnd):
            values = {"train/loss": event.loss, "train/lr": event.lr, "train/tokens_per_s": event.tokens_per_s,
                      "train/grad_norm": event.grad_norm} | {f"train/{k}": v for k, v in event.stats.items()}
        elif isinstance(event, EvalEnd):
            values = {"eval/loss": event.val_loss, "eval/train_loss_since_last_eval": event.train_loss}
            values |= {f"eval/{k}": v for k, v in _eval_figures(event).items()}
        elif isinstance(event, RunStarted):
            for k in ("method", "trainable_params", "total_params", "device", "dtype"):
                self.client.set_tag(self.run_id, f"tunesmith.{k}", str(getattr(event, k)))
            return
        elif isinstance(event, (EarlyStopped, OverfitWarning)):
            self.client.set_tag(self.run_id, f"tunesmith.{event.kind}_step", str(event.step))
            return
        elif isinstance(event, RunEnded):
            self.status = {"completed": "FINISHED", "early_stopped": "FINISHED", "interrupted": "KILLED"}.get(
                event.status, "FAILED")
            self.client.set_tag(self.run_id, "tunesmith.status", event.status)
            return
        else:
            return
        self._log(values, event.step)

    def _log(self, values: dict[str, float | None], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_mlflow_key(k), float(v), now, step) for k, v in values.items()
                   if v is not None and math.isfinite(v)]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        """Upload the run's files (the report is written just before the sinks close), then end the run."""
        for name in self.ARTIFACTS:
            if (self.run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(self.run_dir / name))
        self.client.set_terminated(self.run_id, status=self.status)


def mlflow_uri(uri: str) -> str:
    """A folder becomes a file:// URI; anything with a scheme (http://, sqlite:///, databricks) is kept."""
    if ":" in uri or uri.startswith("databricks"):
        resolved = uri
    else:
        resolved = Path(uri).expanduser().resolve().as_uri()
    if resolved.startswith("file:"):
        # MLflow 3 refuses its file store unless opted in ("maintenance mode"). A folder is what a user with
        # no tracking server has, and naming one in the config is the opt-in.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return resolved


def _mlflow_key(name: str) -> str:
    # MLflow keys allow letters, digits, _ - . / and space; a custom "module:function" metric has a colon.
    return re.sub(r"[^\w\-./ ]", "_", name)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1e-4}} -> {"train.lr": 1e-4}: a nested config as MLflow params."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _eval_figures(event: EvalEnd) -> dict[str, float]:
    """An evaluation's figures besides its loss: perplexity and token accuracy (sft), the objective's statistics
    (dpo: rewards/..., logps/...), then the task metrics."""
    sft = {"perplexity": event.perplexity, "token_accuracy": event.token_accuracy}
    return {k: v for k, v in sft.items() if v is not None} | event.stats | event.metrics


def format_event(event: Event) -> str:
    if isinstance(event, StepEnd):
        gn = f" grad_norm {event.grad_norm:.3f}" if event.grad_norm is not None else ""
        stats = "".join(f" {k} {v:.3f}" for k, v in event.stats.items())
        return (f"step {event.step}/{event.total_steps} epoch {event.epoch:.2f} loss {event.loss:.4f}{stats} "
                f"lr {event.lr:.2e}{gn}" + (f" tok/s {event.tokens_per_s:.0f}" if event.tokens else "")
                + (f" ETA {_clock(event.eta_s)}" if event.eta_s is not None else ""))
    if isinstance(event, EvalEnd):
        best = " (best)" if event.is_best else ""
        train = f" (train {event.train_loss:.4f})" if event.train_loss is not None else ""
        ppl = f" ppl {event.perplexity:.2f}" if event.perplexity is not None else ""
        acc = f" token_acc {event.token_accuracy:.3f}" if event.token_accuracy is not None else ""
        figures = "".join(f" {k} {v:.3f}" for k, v in (event.stats | event.metrics).items())
        return f"eval step {event.step}: val_loss {event.val_loss:.4f}{train}{ppl}{acc}{figures}{best}"
    if isinstance(event, RunStarted):
        pct = 100.0 * event.trainable_params / max(1, event.total_params)
        return (f"run {event.output_dir}: method {event.method}, trainable {event.trainable_params:,} / "
                f"{event.total_params:,} params ({pct:.2f}%), {event.train_examples} train / "
                f"{event.valid_examples} valid examples, {event.total_steps} steps, {event.device} {event.dtype}"
                + (f", resumed at step {event.resumed_from_step}" if event.resumed_from_step else ""))
    if isinstance(event, CheckpointSaved):
        return f"checkpoint step {event.step}: {event.path}"
    if isinstance(event, (Message, OverfitWarning)):
        return f"{event.level}: {event.text}"
    if isinstance(event, EarlyStopped):
        return (f"early stopping at step {event.step}: no better validation loss for {event.patience} "
                f"evaluations; best was {event.best_val_loss:.4f} at step {event.best_step}")
    if isinstance(event, RunEnded):
        return f"run {event.status} at step {event.step} in {event.elapsed_s:.0f} s"
    return str(event)


class ConsoleSink:
    """A rich progress bar (step, loss, lr, tokens/s, ETA) plus eval lines and warnings."""

    def __init__(self, quiet: bool = False):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.console = Console(stderr=True)
        self.quiet = quiet
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self.console,
            disable=quiet or not self.console.is_terminal)
        self.task = None

    def __call__(self, event: Event) -> None:
        if isinstance(event, RunStarted):
            self.console.print(format_event(event))
            self.progress.start()
            self.task = self.progress.add_task("train", total=event.total_steps, completed=event.resumed_from_step, info="")
        elif isinstance(event, StepEnd):
            info = f"loss {event.loss:.4f} lr {event.lr:.1e}" + (f" {event.tokens_per_s:.0f} tok/s" if event.tokens else "")
            if self.task is not None:
                self.progress.update(self.task, completed=event.step, info=info)
            if not self.progress.live.is_started and not self.quiet:
                self.console.print(format_event(event))  # no terminal: plain lines
        elif isinstance(event, EvalEnd):
            self.console.print(format_event(event))
            for s in event.samples[:3]:
                if "image" in s:  # text-to-image: where the drawn images are
                    self.console.print(f"  [dim]prompt:[/dim] {s['prompt'][-80:]!r} -> {s['image']} row {s['row'] + 1}",
                                       markup=True, highlight=False)
                    continue
                self.console.print(f"  [dim]prompt:[/dim] {s['prompt'][-80:]!r}\n  [dim]output:[/dim] {s['output'][:120]!r}"
                                   f"\n  [dim]expect:[/dim] {s['reference'][:120]!r}", markup=True, highlight=False)
        elif isinstance(event, (Message, OverfitWarning, EarlyStopped, CheckpointSaved)):
            if isinstance(event, CheckpointSaved) and self.quiet:
                return
            style = "yellow" if getattr(event, "level", "") == "warning" else None
            self.console.print(format_event(event), style=style, markup=False, highlight=False)
        elif isinstance(event, RunEnded):
            self.progress.stop()
            self.console.print(format_event(event))

    def close(self) -> None:
        self.progress.stop()


def print_err(text: str) -> None:
    sys.stderr.write(text.rstrip() + "\n")
