"""Text metrics on (prediction, reference) pairs, and a registry that custom metrics join by name.

Built in:
  exact_match             1 if the stripped strings are equal, else 0
  normalized_exact_match  exact match after SQuAD normalisation (lowercase, no punctuation, no
                          articles, single spaces; Rajpurkar et al. 2016, the official eval script)
  rouge_l                 F1 of the longest common subsequence of lowercased whitespace tokens (Lin 2004)
  bleu, chrf              sacrebleu (Post 2018), on its own 0-100 scale so numbers match papers;
                          the headline is corpus-level, per-example scores are sentence-level

A custom metric is named "module:function", where function(prediction, reference) -> float; its
headline value is the mean over examples. ``register_metric`` adds one under a short name.
"""

from __future__ import annotations

import importlib
import re
import string
from dataclasses import dataclass
from typing import Callable, Sequence

import sacrebleu

from ..graders.similarity import lcs_length  # bit-parallel; the graders' rouge_l and fuzzy_match use it too

ExampleFn = Callable[[str, str], float]
CorpusFn = Callable[[Sequence[str], Sequence[str]], float]
DEFAULT_METRICS = ("exact_match", "normalized_exact_match", "rouge_l", "chrf", "bleu")


@dataclass(frozen=True)
class Metric:
    name: str
    per_example: ExampleFn
    corpus: CorpusFn | None = None  # None: the mean of the per-example scores

    def score(self, predictions: Sequence[str], references: Sequence[str]) -> float:
        if self.corpus is not None:
            return float(self.corpus(predictions, references))
        scores = [_as_float(self.name, self.per_example(p, r)) for p, r in zip(predictions, references)]
        return sum(scores) / len(scores) if scores else float("nan")


# ---------------------------------------------------------------- the metrics


def exact_match(prediction: str, reference: str) -> float:
    return float(prediction.strip() == reference.strip())


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lowercase, drop punctuation, drop a/an/the, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


_PUNCTUATION = frozenset(string.punctuation)


def normalized_exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def rouge_l(prediction: str, reference: str) -> float:
    """F1 of precision LCS/len(pred) and recall LCS/len(ref); two empty strings score 1."""
    pred, ref = prediction.lower().split(), reference.lower().split()
    if not pred or not ref:
        return float(pred == ref)
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def sentence_bleu(prediction: str, reference: str) -> float:
    return sacrebleu.sentence_bleu(prediction, [reference]).score


def corpus_bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    return sacrebleu.corpus_bleu(list(predictions), [list(references)]).score


def sentence_chrf(prediction: str, reference: str) -> float:
    return sacrebleu.sentence_chrf(prediction, [reference]).score


def corpus_chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    return sacrebleu.corpus_chrf(list(predictions), [list(references)]).score


# ---------------------------------------------------------------- registry

_REGISTRY: dict[str, Metric] = {
    "exact_match": Metric("exact_match", exact_match),
    "normalized_exact_match": Metric("normalized_exact_match", normalized_exact_match),
    "rouge_l": Metric("rouge_l", rouge_l),
    "bleu": Metric("bleu", sentence_bleu, corpus_bleu),
    "chrf": Metric("chrf", sentence_chrf, corpus_chrf),
}


def register_metric(name: str, per_example: ExampleFn, corpus: CorpusFn | None = None) -> Metric:
    """Make a metric available by name (replacing one of the same name)."""
    if not callable(per_example) or (corpus is not None and not callable(corpus)):
        raise TypeError(f"metric {name!r}: per_example and corpus must be callables")
    _REGISTRY[name] = Metric(name, per_example, corpus)
    return _REGISTRY[name]


def available_metrics() -> list[str]:
    return sorted(_REGISTRY)


def get_metric(name: str) -> Metric:
    """A registered metric, or "module:function" imported on first use."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        return register_metric(name, _import_metric(name))
    raise ValueError(f"unknown metric {name!r}: use one of {', '.join(available_metrics())}, "
                     "or 'module:function' for your own function(prediction, reference) -> float")


def _import_metric(spec: str) -> ExampleFn:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"custom metric {spec!r} must look like 'module:function' (e.g. 'my_metrics:f1')")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"custom metric {spec!r}: cannot import module {module_name!r} ({e}); "
                         "make sure it is on PYTHONPATH (the current directory is not always)") from e
    fn = module
    for part in attr.split("."):  # allow "module:Class.method"
        if not hasattr(fn, part):
            raise ValueError(f"custom metric {spec!r}: module {module_name!r} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ValueError(f"custom metric {spec!r}: {attr!r} is a {type(fn).__name__}, not a function "
                         "taking (prediction, reference) and returning a float")
    return fn


# ---------------------------------------------------------------- scoring


def compute_metrics(predictions: Sequence[str], references: Sequence[str],
                    names: Sequence[str] | None = None) -> dict[str, float]:
    """{metric name: headline value} (corpus-level for bleu/chrf, mean over examples otherwise)."""
    _check_pairs(predictions, references)
    return {name: get_metric(name).score(predictions, references) for name in _names(names)}


def per_example_scores(predictions: Sequence[str], references: Sequence[str],
                       names: Sequence[str] | None = None) -> dict[str, list[float]]:
    """{metric name: one score per example} (sentence-level for bleu/chrf)."""
    _check_pairs(predictions, references)
    out = {}
    for name in _names(names):
        fn = get_metric(name).per_example
        out[name] = [_as_float(name, fn(p, r)) for p, r in zip(predictions, references)]
    return out


def _as_float(name: str, value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"metric {name!r} returned {value!r}; a metric must return a number") from e


def _names(names: Sequence[str] | None) -> list[str]:
    if isinstance(names, str):  # a lone name, not its characters
        return [names]
    return list(DEFAULT_METRICS if names is None else names)


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references; they must pair up")
