"""Evaluate a model end to end, and compare a base and a tuned model on the same examples.

``evaluate_model`` = batched generation + metrics + teacher-forced loss (the run's validation loss, loss.py).
``compare`` counts per-example wins / losses / ties of tuned over base on one metric and gives a
paired bootstrap 95% confidence interval of the mean difference (Efron & Tibshirani 1993; paired,
as in Koehn 2004): resample examples with replacement, recompute the mean of (tuned - base), take
the 2.5th and 97.5th percentiles. An interval that excludes 0 means the difference is unlikely to
be an accident of which examples were held out.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

import numpy as np

from .generate import Conversation, generate_batch
from .loss import reference_loss, validation_loss
from .metrics import DEFAULT_METRICS, compute_metrics, per_example_scores

# Rows of the comparison table where a smaller number is the better one.
LOWER_IS_BETTER = ("loss", "perplexity")


@dataclass
class EvalResult:
    predictions: list[str]
    metrics: dict[str, float]  # headline value per metric
    per_example: dict[str, list[float]]  # metric -> one score per example
    loss: dict | None = None  # validation_loss(): {"loss", "perplexity", "tokens", "token_accuracy", ...}

    def summary(self) -> dict[str, float]:
        """Metrics plus loss and perplexity, the rows of a comparison table."""
        out = dict(self.metrics)
        if self.loss is not None:
            out.update(loss=self.loss["loss"], perplexity=self.loss["perplexity"])
        return out

    def to_json(self) -> dict:
        return _json_safe(asdict(self))


@dataclass
class Comparison:
    metrics_a: dict[str, float]  # a: the base model
    metrics_b: dict[str, float]  # b: the tuned model
    wins: int  # examples where b scores higher than a on `metric`
    losses: int
    ties: int
    diff: float  # mean over examples of (b - a) on `metric`
    ci_low: float  # paired bootstrap 95% interval of `diff`
    ci_high: float
    metric: str = "exact_match"
    n: int = 0
    mean_a: float = 0.0  # mean per-example score on `metric` (diff = mean_b - mean_a)
    mean_b: float = 0.0
    n_boot: int = 1000
    per_example_diff: list[float] = field(default_factory=list, repr=False)

    @property
    def significant(self) -> bool:
        """The 95% interval excludes zero."""
        return self.ci_low > 0 or self.ci_high < 0

    def to_json(self) -> dict:
        return _json_safe(asdict(self) | {"significant": self.significant})


def evaluate_model(model, tokenizer, conversations: Sequence[Conversation], references: Sequence[str], *,
                   batch_size: int = 8, max_new_tokens: int = 64, metrics: Sequence[str] | None = None,
                   loss: bool = True, stop_strings: Sequence[str] | None = None, examples: Sequence | None = None,
                   data=None) -> EvalResult:
    """Greedy replies to every conversation, scored against the references; plus the loss.

    ``examples``: the ``data.Example``s the conversations and references were taken from (prompt_and_reference);
    the loss is then the run's validation loss on them (``validation_loss`` with ``data``, the run's DataConfig).
    Without them it is the loss of the references alone (``reference_loss``).
    """
    if len(conversations) != len(references):
        raise ValueError(f"{len(conversations)} conversations but {len(references)} references; they must pair up")
    if examples is not None and len(examples) != len(references):
        raise ValueError(f"{len(examples)} examples but {len(references)} references; they must pair up")
    # The loss first: an example that cannot be scored (DataError) stops the evaluation before generation does.
    scored = None
    if loss and examples is not None:
        scored = validation_loss(model, tokenizer, examples, data, batch_size=batch_size)
    elif loss:
        scored = reference_loss(model, tokenizer, conversations, references, batch_size=batch_size)
    predictions = generate_batch(model, tokenizer, conversations, max_new_tokens=max_new_tokens,
                                 batch_size=batch_size, stop_strings=stop_strings)
    return EvalResult(
        predictions=predictions,
        metrics=compute_metrics(predictions, references, metrics),
        per_example=per_example_scores(predictions, references, metrics),
        loss=scored,
    )


def compare(preds_a: Sequence[str], preds_b: Sequence[str], references: Sequence[str], metric: str = "exact_match",
            n_boot: int = 1000, seed: int = 0) -> Comparison:
    """Tuned (b) against base (a) on the same references: wins/losses/ties and a bootstrap CI of the mean gain."""
    if not (len(preds_a) == len(preds_b) == len(references)):
        raise ValueError(f"compare needs one prediction per reference from each model: got {len(preds_a)}, "
                         f"{len(preds_b)} predictions and {len(references)} references")
    _check_comparable(len(references), n_boot)
    names = _table_metrics(metric)
    return _comparison(per_example_scores(preds_a, references, [metric])[metric],
                       per_example_scores(preds_b, references, [metric])[metric],
                       compute_metrics(preds_a, references, names), compute_metrics(preds_b, references, names),
                       metric, n_boot, seed)


def compare_results(base: EvalResult, tuned: EvalResult, metric: str = "exact_match", n_boot: int = 1000,
                    seed: int = 0) -> Comparison:
    """``compare`` from two evaluate_model results on the same references, with the scores they already hold.

    Nothing is scored again; both results must hold ``metric`` and DEFAULT_METRICS.
    """
    _check_comparable(len(tuned.predictions), n_boot)
    names = _table_metrics(metric)
    return _comparison(base.per_example[metric], tuned.per_example[metric], {n: base.metrics[n] for n in names},
                       {n: tuned.metrics[n] for n in names}, metric, n_boot, seed)


def _check_comparable(n: int, n_boot: int) -> None:
    if not n:
        raise ValueError("compare needs at least one example")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")


def _table_metrics(metric: str) -> list[str]:
    """The headline metrics a Comparison carries: the defaults, plus ``metric``."""
    return list(DEFAULT_METRICS) + ([metric] if metric not in DEFAULT_METRICS else [])


def _comparison(scores_a: Sequence[float], scores_b: Sequence[float], metrics_a: dict[str, float],
                metrics_b: dict[str, float], metric: str, n_boot: int, seed: int) -> Comparison:
    a = np.asarray(scores_a, dtype=np.float64)  # (N,)
    b = np.asarray(scores_b, dtype=np.float64)  # (N,)
    d = b - a  # (N,)
    low, high = paired_bootstrap_ci(d, n_boot=n_boot, seed=seed)
    return Comparison(
        metrics_a=metrics_a, metrics_b=metrics_b,
        wins=int((d > 0).sum()), losses=int((d < 0).sum()), ties=int((d == 0).sum()),
        diff=float(d.mean()), ci_low=low, ci_high=high, metric=metric, n=len(d), mean_a=float(a.mean()),
        mean_b=float(b.mean()), n_boot=n_boot,
        per_example_diff=d.tolist())


def paired_bootstrap_ci(diffs: np.ndarray, *, n_boot: int = 1000, seed: int = 0,
                        level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean of ``diffs`` (N,) over ``n_boot`` resamples of the examples."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diffs), size=(n_boot, len(diffs)))  # (n_boot, N)
    means = diffs[idx].mean(axis=1)  # (n_boot,)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


# ---------------------------------------------------------------- tables


def comparison_rows(base, tuned) -> list[tuple[str, float | None, float | None]]:
    """(name, base value, tuned value) for every metric either side has, then loss and perplexity."""
    a, b = _summary(base), _summary(tuned)
    names = [n for n in a if n not in LOWER_IS_BETTER] + [n for n in b if n not in a and n not in LOWER_IS_BETTER]
    names += [n for n in LOWER_IS_BETTER if n in a or n in b]
    return [(n, a.get(n), b.get(n)) for n in names]


def format_comparison(base, tuned, cmp: Comparison | None = None) -> str:
    """A Markdown table (readable as plain text in a log): metric | base | tuned | delta, then the verdict.

    ``base`` and ``tuned`` are EvalResults or plain {metric: value} mappings.
    """
    lines = ["| metric | base | tuned | delta |", "|---|---:|---:|---:|"]
    for name, a, b in comparison_rows(base, tuned):
        lines.append(f"| {name} | {_fmt(a)} | {_fmt(b)} | {_fmt_delta(a, b)} |")
    if cmp is not None:
        lines.append("")
        lines.append(verdict(cmp))
    return "\n".join(lines)


def comparison_table(base, tuned, cmp: Comparison | None = None, *, title: str = "base versus tuned"):
    """The same table as a rich Table, deltas coloured by whether they are improvements."""
    from rich.table import Table

    table = Table(title=title, caption=verdict(cmp) if cmp is not None else None)
    table.add_column("metric")
    for col in ("base", "tuned", "delta"):
        table.add_column(col, justify="right")
    for name, a, b in comparison_rows(base, tuned):
        table.add_row(name, _fmt(a), _fmt(b), _styled_delta(name, a, b))
    return table


def verdict(cmp: Comparison) -> str:
    """One line: wins/losses/ties and the mean difference with its interval."""
    sig = "significant" if cmp.significant else "not significant"
    return (f"{cmp.metric} over {cmp.n} examples: tuned wins {cmp.wins}, loses {cmp.losses}, ties {cmp.ties}; "
            f"mean difference {cmp.diff:+.4f} (95% CI {cmp.ci_low:+.4f} to {cmp.ci_high:+.4f}, {sig})")


def _summary(result) -> dict[str, float]:
    if isinstance(result, EvalResult):
        return result.summary()
    if isinstance(result, Mapping):
        return dict(result)
    raise TypeError(f"expected an EvalResult or a mapping of metric values, got {type(result).__name__}")


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if abs(value) < 1e6 else f"{value:.4g}"


def _fmt_delta(a: float | None, b: float | None) -> str:
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
        return "-"
    return f"{b - a:+.4f}"


def _styled_delta(name: str, a: float | None, b: float | None) -> str:
    text = _fmt_delta(a, b)
    if text == "-" or a == b:
        return text
    better = (b < a) if name in LOWER_IS_BETTER else (b > a)
    return f"[green]{text}[/green]" if better else f"[red]{text}[/red]"


def _json_safe(value):
    """NaN and infinity are not JSON: write them as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
