from pathlib import Path

import pytest
import sacrebleu

from tunesmith.evaluate import compute_metrics, get_metric, normalize_answer, per_example_scores, rouge_l
from tunesmith.evaluate.metrics import lcs_length

PREDS = ["Paris", "the cat sat on the mat", "2024-01-05", "It is 4."]
REFS = [" Paris ", "the cat is on the mat", "2024-01-05", "it is 4"]


@pytest.fixture
def custom_module_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))


def test_exact_match():
    assert per_example_scores(PREDS, REFS, ["exact_match"])["exact_match"] == [1.0, 0.0, 1.0, 0.0]
    assert compute_metrics(PREDS, REFS, ["exact_match"]) == {"exact_match": 0.5}


def test_normalized_exact_match_follows_squad():
    assert normalize_answer("The  Cat, sat on a MAT!") == "cat sat on mat"
    assert normalize_answer("An apple") == "apple"
    assert per_example_scores(PREDS, REFS, ["normalized_exact_match"])["normalized_exact_match"] == [1, 0, 1, 1]


def test_rouge_l_on_known_pairs():
    assert lcs_length("a b c d".split(), "a c e".split()) == 2
    # LCS "a c": precision 2/4, recall 2/3, F1 = 2 * (1/2 * 2/3) / (1/2 + 2/3) = 4/7
    assert rouge_l("a b c d", "a c e") == pytest.approx(4 / 7)
    # LCS "the cat on the mat" = 5 of 6 tokens on both sides
    assert rouge_l("the cat sat on the mat", "The cat is on the mat") == pytest.approx(5 / 6)
    assert rouge_l("", "") == 1.0 and rouge_l("x", "") == 0.0 and rouge_l("x y", "z") == 0.0


def test_bleu_and_chrf_equal_sacrebleu():
    got = compute_metrics(PREDS, REFS, ["bleu", "chrf"])
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(PREDS, [REFS]).score)
    assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(PREDS, [REFS]).score)
    per = per_example_scores(PREDS, REFS, ["bleu", "chrf"])
    assert per["bleu"] == pytest.approx([sacrebleu.sentence_bleu(p, [r]).score for p, r in zip(PREDS, REFS)])
    assert per["chrf"] == pytest.approx([sacrebleu.sentence_chrf(p, [r]).score for p, r in zip(PREDS, REFS)])


def test_default_metrics():
    got = compute_metrics(PREDS, REFS)
    assert set(got) == {"exact_match", "normalized_exact_match", "rouge_l", "chrf", "bleu"}
    assert set(per_example_scores(PREDS, REFS)) == set(got)


def test_custom_metric_by_module_and_function(custom_module_on_path):
    name = "eval_custom_metric:first_word_match"
    assert per_example_scores(PREDS, REFS, [name])[name] == [1.0, 1.0, 1.0, 1.0]
    assert compute_metrics(["x y", "a"], ["x", "b"], [name]) == {name: 0.5}


@pytest.mark.parametrize("name, match", [
    ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
    ("eval_custom_metric:missing", "has no attribute 'missing'"),
    ("eval_custom_metric:NOT_A_FUNCTION", "is a int, not a function"),
    ("eval_custom_metric:", "must look like 'module:function'"),
    ("blue", "unknown metric 'blue'.*bleu"),
])
def test_bad_custom_metric_is_explained(custom_module_on_path, name, match):
    with pytest.raises(ValueError, match=match):
        get_metric(name)


def test_metric_returning_a_non_number(custom_module_on_path):
    with pytest.raises(TypeError, match="must return a number"):
        per_example_scores(["a"], ["a"], ["eval_custom_metric:broken"])


def test_lengths_must_match():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        compute_metrics(["a", "b"], ["a"])
