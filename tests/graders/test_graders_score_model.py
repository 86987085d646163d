"""score_model with a stub judge: the conversations it is asked, the sampling parameters passed through,
scores read from free text, truncated to the range as OpenAI does, and an unreadable reply a 0 with a reason."""

import pytest

from tunesmith.graders import GraderError, compile_grader, parse_score

SPEC = {"type": "score_model", "name": "judge", "model": "gpt-4o-2024-08-06",
        "input": [{"role": "developer", "content": "Grade the answer to {{item.question}} from 0 to 10."},
                  {"role": "user", "content": [{"type": "input_text", "text": "Reference: {{item.reference}}"},
                                               {"type": "input_text", "text": "Answer: {{sample.output_text}}"}]}],
        "range": [0, 10]}


class StubJudge:
    def __init__(self, replies):
        self.replies, self.calls = replies, []

    def __call__(self, conversations, **sampling_params):
        self.calls.append((conversations, sampling_params))
        return self.replies[:len(conversations)]


@pytest.mark.parametrize("reply, lo, hi, expected", [
    ("Score: 7/10", 0, 10, 7.0),
    ("Score: 7/10", 0, 1, 0.7),  # a fraction not on the range's top: a share of the range
    ("The answer names the right city.\n**Score:** 8", 0, 10, 8.0),
    ("Rating: 4 out of 5", 1, 5, 4.0),
    ('{"steps": [{"description": "checks", "conclusion": "ok"}], "result": 0.85}', 0, 1, 0.85),
    ('Here is my verdict: {"score": 3}', 0, 10, 3.0),
    ("0.9", 0, 1, 0.9),
    ("**6**.", 0, 10, 6.0),
    ("I would give it 9.", 0, 10, 9.0),
    ("Step 1 checks the date, step 2 the city. Final score: 2", 0, 10, 2.0),  # the keyword wins over other numbers
])
def test_parse_score_reads_free_text(reply, lo, hi, expected):
    assert parse_score(reply, lo, hi) == pytest.approx(expected)


@pytest.mark.parametrize("reply", ["The answer is wrong.", "Between 3 and 4, maybe 5", "Score: 3/0", ""])
def test_parse_score_refuses_what_it_cannot_read(reply):
    assert isinstance(parse_score(reply, 0, 10), str)


def test_grader_renders_the_messages_passes_sampling_params_and_clamps():
    judge = StubJudge(["Score: 7/10", "Score: 12", "Score: -3", "I cannot judge this."])
    grader = compile_grader(SPEC | {"sampling_params": {"temperature": 0.2, "seed": 1}, "pass_threshold": 5},
                            judge=judge)
    items = [{"question": "the capital of France", "reference": "Paris"}] * 4
    grades = grader.grade_batch(["Paris", "Paris, France", "Lyon", "?"], items)
    assert [g.score for g in grades] == [7.0, 10.0, 0.0, 0.0]  # 12 and -3 truncated to [0, 10]
    assert [g.passed for g in grades] == [True, True, False, False]
    assert [g.reason is None for g in grades] == [True, True, True, False]
    assert grades[3].reason.startswith("no score in the judge's reply ('I cannot judge this.')")
    (conversations, params), = judge.calls  # one call for the whole batch
    assert params == {"temperature": 0.2, "seed": 1}
    assert conversations[0] == [
        {"role": "system", "content": "Grade the answer to the capital of France from 0 to 10."},  # developer
        {"role": "user", "content": "Reference: Paris\nAnswer: Paris"}]


def test_template_failures_skip_the_judge():
    judge = StubJudge(["Score: 1"])
    grades = compile_grader(SPEC, judge=judge).grade_batch(["a", "b"], [{"question": "q"}, {"question": "q",
                                                                                             "reference": "r"}])
    assert grades[0].score == 0.0 and "has no field 'reference'" in grades[0].reason
    assert grades[1].score == 1.0
    assert len(judge.calls[0][0]) == 1  # only the row that rendered was asked
    assert judge.calls[0][1] == {}  # no sampling_params: judge(conversations)


@pytest.mark.parametrize("change, judge, message", [
    ({}, None, "a score_model grader needs a judge model: pass judge=... to compile_grader"),
    ({"sampling_params": {"temprature": 0.5}}, StubJudge([]), "unknown parameter 'temprature'; OpenAI's are: "
                                                              "temperature, top_p, seed, max_completions_tokens"),
    ({"range": [10, 0]}, StubJudge([]), r"grader.range: \[min, max\] with min < max"),
    ({"input": []}, StubJudge([]), "grader.input: a list of messages"),
    ({"input": [{"role": "judge", "content": "x"}]}, StubJudge([]), r"grader.input\[0\]: a message is"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, StubJudge([]),
     "a 'input_image' part is not supported; a local judge reads text"),
    ({"input": [{"role": "user", "content": "{{sample.reply}}"}]}, StubJudge([]), "a sample has no field 'reply'"),
])
def test_score_model_spec_errors(change, judge, message):
    with pytest.raises(GraderError, match=message):
        compile_grader(SPEC | change, judge=judge)
