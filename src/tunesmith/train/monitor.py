"""What an evaluation adds to the validation loss: task metrics on a fixed validation subset, and an
overfitting monitor over the training and validation curves.

Validation loss alone can mislead a fine-tune: a model can keep lowering it while its answers stop
matching the format, or start raising it while training loss still falls (memorising the training set).
So each evaluation also answers the first ``eval.metric_examples`` validation prompts (the same ones every
time, so the numbers form a curve) and scores them with ``eval.metrics``; and the monitor warns when
validation loss has risen ``eval.overfit_patience`` evaluations in a row while the training loss over the
same stretch fell. The monitor lives in memory: after a resume it starts a new history.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from .. import data as tsdata
from ..config import ConfigError, EvalConfig
from ..events import OverfitWarning


@dataclass
class EvalMonitor:
    cfg: EvalConfig
    history: list[tuple[int, float, float | None]] = field(default_factory=list)  # (step, val loss, train loss)
    _loss_sum: float = 0.0  # summed token losses since the previous evaluation (all processes)
    _tokens: int = 0
    _warned: bool = False  # already warned about the current rising streak
    # what the two curves and the warning are called (grpo watches minus its rewards: its overfitting is reward hacking)
    names: tuple[str, str, str] = ("validation loss", "training loss", "possible overfitting")

    def __post_init__(self) -> None:
        check_metrics(self.cfg.metrics)

    # ------------------------------------------------------------ training loss between evaluations

    def add_train_loss(self, loss_sum: float, tokens: int) -> None:
        """One optimizer step: its summed token loss and target-token count."""
        self._loss_sum += loss_sum
        self._tokens += tokens

    def take_train_loss(self) -> float | None:
        """Token-weighted mean training loss since the previous call (None when no step ran)."""
        mean = self._loss_sum / self._tokens if self._tokens else None
        self._loss_sum, self._tokens = 0.0, 0
        return mean

    # ------------------------------------------------------------ overfitting

    def observe(self, step: int, val_loss: float, train_loss: float | None,
                best_step: int | None) -> OverfitWarning | None:
        """Record an evaluation; a warning the first time a rising-validation streak reaches the patience."""
        self.history.append((step, val_loss, train_loss))
        streak = rising_streak([v for _, v, _ in self.history])
        if streak == 0:
            self._warned = False
        k = self.cfg.overfit_patience
        if streak < k or self._warned:
            return None
        window = self.history[-(k + 1):]  # k rises need k + 1 evaluations
        trains = [t for _, _, t in window]
        if any(t is None for t in trains) or not trains[-1] < trains[0]:
            return None  # both losses rising is not the overfitting signature (e.g. lr too high)
        self._warned = True
        vals = [v for _, v, _ in window]
        held, trained, what = self.names
        text = (f"{what} at step {step}: {held} rose {streak} evaluations in a row "
                f"({vals[0]:.4f} -> {vals[-1]:.4f}) while {trained} fell ({trains[0]:.4f} -> {trains[-1]:.4f}); "
                f"the best model so far is from step {best_step}"
                + ("" if self.cfg.early_stopping_patience else "; set eval.early_stopping_patience to stop early"))
        return OverfitWarning(step, text, streak, vals, trains, best_step)

    # ------------------------------------------------------------ generations and task metrics

    def generations(self, model, tokenizer, examples) -> tuple[list[dict], dict[str, float]]:
        """(samples to log, task metrics): one batched generation pass serves both."""
        from ..evaluate import compute_metrics, generate_batch

        n = max(self.cfg.samples, self.cfg.metric_examples)
        chats = [e for e in examples if e.messages and any(m.role == "assistant" for m in e.messages)][:n]
        if not chats:
            return [], {}
        pairs = [tsdata.prompt_and_reference(e) for e in chats]
        convs, refs = [p for p, _ in pairs], [r for _, r in pairs]
        outputs = generate_batch(model, tokenizer, convs, max_new_tokens=self.cfg.max_new_tokens,
                                 batch_size=self.cfg.batch_size)
        samples = [{"prompt": c[-1]["content"], "output": o, "reference": r}
                   for c, o, r in zip(convs, outputs, refs)][:self.cfg.samples]
        m = self.cfg.metric_examples
        metrics = compute_metrics(outputs[:m], refs[:m], self.cfg.metrics) if m and self.cfg.metrics else {}
        return samples, metrics


def rising_streak(values: list[float]) -> int:
    """How many times in a row, counting back from the end, a value was higher than the one before it."""
    n = 0
    for i in range(len(values) - 1, 0, -1):
        if values[i] > values[i - 1]:
            n += 1
        else:
            break
    return n


def check_metrics(names: list[str]) -> None:
    """Fail before the model loads when a metric name is unknown or a custom one cannot be imported."""
    from ..evaluate import get_metric

    if any(":" in n for n in names) and "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # a config's "my_metrics:f1" means my_metrics.py where tunesmith runs
    for name in names:
        try:
            get_metric(name)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"eval.metrics: {e}") from None
