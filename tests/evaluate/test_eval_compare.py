import json

import pytest
from rich.console import Console
from rich.table import Table

from eval_helpers import CONVERSATIONS
from tunesmith.evaluate import EvalResult, compare, comparison_table, evaluate_model, format_comparison

REFS = ["a", "b", "c", "d"]
BASE = ["a", "x", "c", "y"]   # exact match per example: 1 0 1 0
TUNED = ["a", "b", "z", "d"]  # exact match per example: 1 1 0 1  -> diff 0 +1 -1 +1


def test_wins_losses_ties_and_diff():
    cmp = compare(BASE, TUNED, REFS)
    assert (cmp.wins, cmp.losses, cmp.ties, cmp.n) == (2, 1, 1, 4)
    assert cmp.diff == pytest.approx(0.25) == cmp.mean_b - cmp.mean_a
    assert (cmp.mean_a, cmp.mean_b) == (0.5, 0.75)
    assert cmp.metrics_a["exact_match"] == 0.5 and cmp.metrics_b["exact_match"] == 0.75
    assert cmp.per_example_diff == [0.0, 1.0, -1.0, 1.0]


def test_bootstrap_ci_contains_diff_and_is_seeded():
    refs = REFS * 10
    cmp = compare(BASE * 10, TUNED * 10, refs, n_boot=500, seed=3)
    assert cmp.ci_low <= cmp.diff <= cmp.ci_high
    assert cmp.ci_low < cmp.ci_high
    again = compare(BASE * 10, TUNED * 10, refs, n_boot=500, seed=3)
    assert (again.ci_low, again.ci_high) == (cmp.ci_low, cmp.ci_high)
    other = compare(BASE * 10, TUNED * 10, refs, n_boot=500, seed=4)
    assert (other.ci_low, other.ci_high) != (cmp.ci_low, cmp.ci_high)


def test_identical_models_have_a_zero_interval():
    cmp = compare(BASE, BASE, REFS, metric="rouge_l")
    assert (cmp.wins, cmp.losses, cmp.ties) == (0, 0, 4)
    assert cmp.diff == cmp.ci_low == cmp.ci_high == 0.0
    assert not cmp.significant


def test_compare_checks_inputs():
    with pytest.raises(ValueError, match="one prediction per reference"):
        compare(BASE, TUNED[:3], REFS)
    with pytest.raises(ValueError, match="unknown metric"):
        compare(BASE, TUNED, REFS, metric="accuracy")


def test_format_comparison_lists_every_metric_and_delta():
    cmp = compare(BASE, TUNED, REFS)
    base = EvalResult(BASE, cmp.metrics_a, {}, {"loss": 2.0, "perplexity": 7.389, "tokens": 8})
    tuned = EvalResult(TUNED, cmp.metrics_b, {}, {"loss": 1.5, "perplexity": 4.482, "tokens": 8})
    text = format_comparison(base, tuned, cmp)
    for name in ("exact_match", "normalized_exact_match", "rouge_l", "chrf", "bleu", "loss", "perplexity"):
        assert f"| {name} |" in text
    assert "| exact_match | 0.5000 | 0.7500 | +0.2500 |" in text
    assert "| loss | 2.0000 | 1.5000 | -0.5000 |" in text
    assert "tuned wins 2, loses 1, ties 1" in text

    table = comparison_table(base, tuned, cmp)
    assert isinstance(table, Table) and table.row_count == 7
    console = Console(record=True, width=120)
    console.print(table)
    assert "exact_match" in console.export_text()


def test_format_comparison_takes_plain_mappings():
    text = format_comparison({"exact_match": 0.1}, {"exact_match": 0.3, "custom": 1.0})
    assert "| exact_match | 0.1000 | 0.3000 | +0.2000 |" in text and "| custom | - | 1.0000 | - |" in text


def test_evaluate_model_ties_it_together(model, eval_tok):
    refs = ["paris", "fox", "2024", "paris", "abc", "may"]
    result = evaluate_model(model, eval_tok, CONVERSATIONS, refs, batch_size=4, max_new_tokens=6,
                            metrics=["exact_match", "chrf"])
    assert len(result.predictions) == len(refs)
    assert set(result.metrics) == {"exact_match", "chrf"}
    assert all(len(v) == len(refs) for v in result.per_example.values())
    assert result.loss["tokens"] > len(refs) and result.loss["loss"] > 0
    data = json.loads(json.dumps(result.to_json()))
    assert data["predictions"] == result.predictions
    cmp = compare(result.predictions, refs, refs)
    assert json.loads(json.dumps(cmp.to_json()))["wins"] == cmp.wins


def test_to_json_turns_non_finite_into_null():
    result = EvalResult([], {"bleu": float("nan")}, {}, {"loss": float("inf"), "perplexity": float("inf"), "tokens": 0})
    assert json.dumps(result.to_json()) == \
        '{"predictions": [], "metrics": {"bleu": null}, "per_example": {}, ' \
        '"loss": {"loss": null, "perplexity": null, "tokens": 0}}'
