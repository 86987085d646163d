"""Templates ({{item.*}}, {{sample.*}}) and the multi grader's safe formula evaluator."""

import pytest

from tunesmith.graders import GraderError, make_sample
from tunesmith.graders.expression import EvaluationError, compile_expression
from tunesmith.graders.template import TemplateError, compile_template

ITEM = {"answer": "Paris", "n": 3, "ground_truth": {"date": "2021-03-03", "cities": ["Rome", "Oslo"]},
        "odd key": "x", "meta": {"tags": ["a", "b"]}}


def render(text, output="Paris", item=ITEM):
    return compile_template(text, "grader.input").render(make_sample(output), item)


def test_templates_reach_nested_fields_and_json_output():
    assert render("{{ item.answer }} / {{item.ground_truth.date}}") == "Paris / 2021-03-03"
    assert render("{{item.ground_truth.cities[1]}} {{item.ground_truth.cities.0}} {{item[\"odd key\"]}}") == "Oslo Rome x"
    assert render("{{item.n}} {{item.meta}}") == '3 {"tags": ["a", "b"]}'  # non-strings as JSON
    out = '{"result": {"value": 42, "unit": "km"}, "ok": true}'
    assert render("{{sample.output_json.result.value}} {{sample.output_json.ok}} {{sample.output_text}}", out) == \
        f"42 true {out}"
    assert render("no variables, {single} braces") == "no variables, {single} braces"


def test_missing_fields_fail_at_grade_time_with_the_reason():
    with pytest.raises(TemplateError, match=r"the data row has no field 'reference' \(its fields: answer, n"):
        render("{{item.reference}}")
    with pytest.raises(TemplateError, match="item.ground_truth.cities has 2 elements, no index 5"):
        render("{{item.ground_truth.cities[5]}}")
    with pytest.raises(TemplateError, match="the output is not valid JSON, so sample.output_json is null"):
        render("{{sample.output_json.result}}", output="not json")
    with pytest.raises(TemplateError, match="the output is not valid JSON"):
        render("{{sample.output_json}}", output="not json")
    with pytest.raises(TemplateError, match="item.answer is \"Paris\", which has no field 'x'"):
        render("{{item.answer.x}}")


@pytest.mark.parametrize("text, message", [
    ("{{ foo.answer }}", "unknown namespace 'foo'"),
    ("{{sample.text}}", "a sample has no field 'text'; it has output_text, output_json, output_tools"),
    ("{{item}}", "names a whole namespace"),
    ("{{item.a[x]}}", "cannot read the path at '\\[x\\]'"),
])
def test_unknown_variables_fail_when_the_grader_compiles(text, message):
    with pytest.raises(GraderError, match=message):
        compile_template(text, "grader.input")


def test_formula_arithmetic_follows_openai_precedence():
    def ev(text, **values):
        return compile_expression(text, list(values) or ["a"], "multi").evaluate(values)

    assert ev("(a + b) / 2", a=1.0, b=0.0) == 0.5
    assert ev("2 * a ^ 2", a=3.0) == 18.0  # ^ is power, tighter than *
    assert ev("-a ^ 2", a=3.0) == -9.0  # and than unary minus, as in mathematics
    assert ev("2 ^ 3 ^ 2", a=0.0) == 512.0  # right-associative
    assert ev("a ** 2 - 1", a=3.0) == 8.0  # Python's spelling too
    assert ev("min(a, b, 0.5) + max(a, b) + abs(-a) + floor(2.7) + ceil(2.1) + sqrt(16) + exp(0) + log(1)",
              a=0.25, b=0.75) == pytest.approx(0.25 + 0.75 + 0.25 + 2 + 3 + 4 + 1 + 0)


@pytest.mark.parametrize("text, message", [
    ("a.__class__", "attribute access 'a.__class__' is not allowed"),
    ("__import__('os').system('true')", "calling .*__import__.* is not allowed"),
    ("open('/etc/passwd')", "calling 'open' is not allowed; the functions are min, max"),
    ("a.real", "attribute access"),
    ("c + 1", "'c' is not one of the graders: a, b"),
    ("a > b", "a comparison \\(not in OpenAI's calculate_output\\)"),
    ("a if b else 0", "if/else"),
    ("[a][0]", "indexing"),
    ("lambda: 1", "lambda"),
    ("'1' + a", "'1' is not a number"),
    ("a % 2", "this operator"),
    ("a ^ 1000", "the exponent 1000 is too large \\(at most 100\\)"),
    ("a ^ -1000", "the exponent 1000 is too large"),
    ("9 ^ 9 ^ 9", "a number too large"),
    ("1 / 0", "division by zero"),
    ("sqrt(a, b)", "sqrt\\(\\) takes 1 number"),
    ("max()", "max\\(\\) takes one or more"),
    ("abs", "'abs' is not one of the graders: a, b \\(a function"),
    ("a; import os", "not a formula"),
    ("a" * 3000, "at most 2000"),
    ("", "must be a formula"),
])
def test_the_formula_evaluator_refuses_anything_else(text, message):
    with pytest.raises(GraderError, match=message):
        compile_expression(text, ["a", "b"], "grader.calculate_output")


def test_formula_failures_at_grade_time_are_reasons():
    formula = compile_expression("a / (b - 1) + (a + 10) ^ (b * 400) + sqrt(a)", ["a", "b"], "m")
    assert formula.evaluate({"a": 4.0, "b": 0.0}) == pytest.approx(-4 + 1 + 2)
    with pytest.raises(EvaluationError, match="division by zero for a=4, b=1"):
        formula.evaluate({"a": 4.0, "b": 1.0})
    with pytest.raises(EvaluationError, match="a number too large"):
        formula.evaluate({"a": 4.0, "b": 2.0})
    with pytest.raises(EvaluationError, match="math domain error"):
        formula.evaluate({"a": -4.0, "b": 0.0})
    with pytest.raises(EvaluationError, match="outside the real numbers"):
        compile_expression("(a - 9) ^ (1 / 3) + 0", ["a"], "m").evaluate({"a": 1.0})
