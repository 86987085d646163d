"""string_check, text_similarity, multi and function graders: OpenAI's documented examples and semantics,
hand-worked scores, and the errors a bad spec gets (the field, the value, the allowed values)."""

import sys

import pytest

from tunesmith.graders import Grade, GraderError, batched, compile_grader, make_sample

CHECK = {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}", "reference": "{{item.answer}}"}


@pytest.mark.parametrize("operation, scores", [
    # replies to the reference "Paris": equal, other case, containing it, containing it in another case
    ("eq", [1, 0, 0, 0]),  # case-sensitive equality
    ("ne", [0, 1, 1, 1]),
    ("like", [1, 0, 1, 0]),  # contains, case-sensitive
    ("ilike", [1, 1, 1, 1]),  # contains, ignoring case
])
def test_string_check_operations(operation, scores):
    grader = compile_grader(CHECK | {"operation": operation})
    replies = ["Paris", "paris", "It is Paris.", "PARIS!"]
    grades = grader.grade_batch(replies, [{"answer": "Paris"}] * 4)
    assert [g.score for g in grades] == scores and all(g.reason is None for g in grades)


def test_string_check_does_not_strip_and_reports_missing_fields():
    grader = compile_grader(CHECK | {"operation": "eq"})
    grades = grader.grade_batch(["Paris ", "Paris"], [{"answer": "Paris"}, {"label": "Paris"}])
    assert grades[0] == Grade(0.0)
    assert grades[1].score == 0.0 and "the data row has no field 'answer' (its fields: label)" in grades[1].reason


@pytest.mark.parametrize("spec, message", [
    ({"type": "string_check", "input": "a", "reference": "b", "operation": "contains"},
     r"grader.operation: 'contains' is not one of: eq, ne, like, ilike"),
    ({"type": "string_check", "input": "a", "operation": "eq"}, r"grader: missing field 'reference'"),
    ({"type": "string_check", "input": "a", "reference": "b", "operation": "eq", "operator": "eq"},
     r"grader: unknown field 'operator'; a string_check grader has: type, name, input, reference, operation"),
    ({"type": "string_check", "input": 3, "reference": "b", "operation": "eq"}, r"grader.input: expected a str, got 3"),
    ({"type": "text_similarity", "input": "a", "reference": "b", "evaluation_metric": "blue"},
     r"'blue' is not one of: cosine, fuzzy_match, bleu, gleu, meteor, rouge_1, rouge_2, rouge_3, rouge_4, rouge_5"),
    ({"type": "text_similarity", "input": "a", "reference": "b", "evaluation_metric": "cosine"},
     r"'cosine' compares embeddings, and no embedding model was given"),
    ({"type": "text_similarity", "input": "a", "reference": "b", "evaluation_metric": "bleu", "pass_threshold": "hi"},
     r"grader.pass_threshold: expected a number"),
    ({"type": "exact_match"}, r"grader.type: 'exact_match' is not one of: string_check, text_similarity, python"),
    ({"type": "label_model", "labels": []}, r"label_model is OpenAI's, not supported here"),
    ({"name": "no type"}, r"grader.type: None is not one of"),
    ({"type": "string_check", "input": "{{answer}}", "reference": "b", "operation": "eq"},
     r"grader.input: template \{\{answer\}\}: unknown namespace 'answer'"),
])
def test_bad_specs_are_refused_naming_field_value_and_choices(spec, message):
    with pytest.raises(GraderError, match=message):
        compile_grader(spec)


def test_text_similarity_scores_and_pass_threshold():
    spec = {"type": "text_similarity", "name": "sim", "input": "{{sample.output_text}}",
            "reference": "{{item.reference}}", "pass_threshold": 0.8}
    item = {"reference": "the cat sat on the mat"}
    rouge = compile_grader(spec | {"evaluation_metric": "rouge_l"})
    grades = rouge.grade_batch(["the cat on the mat", "a dog", "the cat sat on the mat"], [item] * 3)
    assert [g.score for g in grades] == pytest.approx([10 / 11, 0.0, 1.0])
    assert [g.passed for g in grades] == [True, False, True]
    fuzzy = compile_grader(spec | {"evaluation_metric": "fuzzy_match", "reference": "kitten"})
    assert fuzzy.grade_batch(["sitting"], [{}])[0].score == pytest.approx(8 / 13)


def test_cosine_uses_the_embedding_model_given():
    calls = []

    def embed(texts):  # a bag of two words: "cat" and "dog" counts
        calls.append(list(texts))
        return [[t.count("cat"), t.count("dog")] for t in texts]

    grader = compile_grader({"type": "text_similarity", "input": "{{sample.output_text}}",
                             "reference": "{{item.ref}}", "evaluation_metric": "cosine"}, embed=embed)
    grades = grader.grade_batch(["cat", "cat dog", "dog"], [{"ref": "cat"}, {"ref": "cat"}, {"ref": "cat"}])
    assert [g.score for g in grades] == pytest.approx([1.0, 2 ** -0.5, 0.0])
    assert len(calls) == 1  # the whole batch in one call: the three inputs, then the three references


def test_multi_grader_openai_example_averages_and_reports_each_grader():
    # the multigrader example of OpenAI's (and Azure's) RFT guide: the mean of a BLEU and a label check
    spec = {"type": "multi", "name": "Example multigrader",
            "graders": {"similarity_score": {"type": "text_similarity", "name": "similarity grader",
                                             "input": "{{ sample.output_text }}", "reference": "{{ item.summary }}",
                                             "evaluation_metric": "bleu"},
                        "label_checker": {"type": "string_check", "name": "label grader",
                                          "input": "{{ sample.output_text }}", "reference": "{{ item.label }}",
                                          "operation": "eq"}},
            "calculate_output": "(similarity_score + label_checker) / 2"}
    grader = compile_grader(spec)
    items = [{"summary": "the cat sat on the mat", "label": "positive"},
             {"summary": "the cat sat on the mat", "label": "the cat sat on the mat"},
             {"label": "x"}]
    grades = grader.grade_batch(["the cat sat on the mat"] * 3, items)
    assert [g.score for g in grades] == pytest.approx([0.5, 1.0, 0.0])
    assert grades[0].sub_scores == {"similarity_score": pytest.approx(1.0), "label_checker": 0.0}
    assert grades[0].reason is None
    assert grades[2].reason.startswith("similarity_score: {{item.summary}}: the data row has no field 'summary'")


def test_multi_formula_failure_is_that_samples_zero():
    spec = {"type": "multi", "graders": {"a": CHECK | {"operation": "like"}, "b": CHECK | {"operation": "eq"}},
            "calculate_output": "a / b"}
    grades = compile_grader(spec).grade_batch(["Paris", "Paris!"], [{"answer": "Paris"}] * 2)
    assert grades[0] == Grade(1.0, None, {"a": 1.0, "b": 1.0})
    assert grades[1].score == 0.0 and "division by zero for a=1, b=0" in grades[1].reason
    assert grades[1].sub_scores == {"a": 1.0, "b": 0.0}


@pytest.mark.parametrize("graders, formula, message", [
    ({"a": CHECK | {"operation": "eq"}}, "a + c", r"'c' is not one of the graders: a"),
    ({"a-b": CHECK | {"operation": "eq"}}, "1", r"grader.graders.a-b: the name 'a-b' cannot appear"),
    ({"a": {"type": "multi", "graders": {}, "calculate_output": "1"}}, "a", "a multi grader inside a multi"),
    ({"a": CHECK | {"operation": "equal"}}, "a", r"grader.graders.a.operation: 'equal' is not one of"),
    ({}, "1", r"grader.graders: name at least one grader"),
    ({"a": CHECK | {"operation": "eq"}}, "a.__class__", "attribute access"),
])
def test_multi_spec_errors(graders, formula, message):
    with pytest.raises(GraderError, match=message):
        compile_grader({"type": "multi", "graders": graders, "calculate_output": formula})


def _module(tmp_path, monkeypatch, text):
    (tmp_path / "my_rewards.py").write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_rewards", None)


def test_function_graders_by_module_path_and_batched(tmp_path, monkeypatch):
    _module(tmp_path, monkeypatch, "from tunesmith.graders import batched\n"
            "def exact(sample, item):\n    return float(sample['output_text'] == item['answer'])\n"
            "def broken(sample, item):\n    return {'x': 1} if item['answer'] == 'Rome' else 1 / 0\n"
            "@batched\ndef lengths(samples, items):\n    return [len(s['output_text']) for s in samples]\n")
    items = [{"answer": "Paris"}, {"answer": "Rome"}]
    assert [g.score for g in compile_grader("my_rewards:exact").grade_batch(["Paris", "Oslo"], items)] == [1.0, 0.0]
    assert [g.score for g in compile_grader("my_rewards:lengths").grade_batch(["ab", "abcd"], items)] == [2.0, 4.0]
    broken = compile_grader("my_rewards:broken").grade_batch(["a", "b"], items)
    assert broken[0] == Grade(0.0, "my_rewards:broken raised ZeroDivisionError: division by zero")
    assert broken[1].score == 0.0 and "returned {'x': 1} (dict), not a number" in broken[1].reason
    direct = compile_grader(batched(lambda samples, items: [0.5] * len(samples)))
    assert [g.score for g in direct.grade_batch(["a", make_sample("b")], items)] == [0.5, 0.5]
    for spec, message in [("my_rewards", "written 'module:function'"), ("no_such_mod:f", "cannot import module"),
                          ("my_rewards:missing", "has no attribute 'missing'")]:
        with pytest.raises(GraderError, match=message):
            compile_grader(spec)


def test_batch_arguments_are_checked():
    grader = compile_grader(CHECK | {"operation": "eq"})
    with pytest.raises(ValueError, match="2 samples but 1 items"):
        grader.grade_batch(["a", "b"], [{}])
    with pytest.raises(TypeError, match="an item is the data row, a dict"):
        grader.grade_batch(["a"], ["row"])
