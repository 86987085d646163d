"""Reinforcement fine-tuning through the official openai client: jobs (method reinforcement -> objective grpo) with
their hyperparameters echoed resolved, prompt files and graders checked before training, reward figures in
events, checkpoints and the results CSV; and the grader endpoints (alpha/graders/run, /validate), the python
sandbox included, which must leave the server working."""

import json
import math

import openai
import pytest

from server_helpers import TOKEN, Server, wait_status

WORDS = ["apple", "river", "stone", "cloud", "maple", "ember", "frost", "delta", "orbit", "quill"]
# Partial credit, so that even the untrained tiny model's answers differ: the share of the reference's letters that
# the answer uses (its words are a later lesson).
OVERLAP = {"type": "python", "name": "overlap", "source": (
    "def grade(sample, item):\n"
    "    want = set(item['reference_answer'].replace(' ', ''))\n"
    "    return len(want & set(sample['output_text'])) / len(want)\n")}
EXACT = {"type": "string_check", "name": "exact", "operation": "eq", "input": "{{sample.output_text}}",
         "reference": "{{item.reference_answer}}"}
# Jobs only created and cancelled: they must never train long if a worker picks one up.
LONG = {"tunesmith_config": {"train.max_steps": 100000, "eval.compare_base": False}}


def _prompts(n: int, seed: int, trl: bool = False, drop: str | None = None) -> bytes:
    """The tests' word-reversal task as prompts: the user's words, and the reversed words for the grader."""
    import random

    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = rng.sample(WORDS, 3)
        rec = ({"prompt": " ".join(words)} if trl else
               {"messages": [{"role": "system", "content": "reverse"}, {"role": "user", "content": " ".join(words)}]})
        rec["reference_answer"] = " ".join(reversed(words))
        rec.pop(drop, None)
        lines.append(json.dumps(rec))
    return ("\n".join(lines) + "\n").encode()


def _reinforcement(grader=OVERLAP, **hyper):
    inner = {"grader": grader} | ({"hyperparameters": hyper} if hyper else {})
    return {"type": "reinforcement", "reinforcement": inner}


@pytest.fixture(scope="module")
def prompts_file(server):
    return server.client.files.create(file=("prompts.jsonl", _prompts(10, seed=0)), purpose="fine-tune")


def _refused(client, **kwargs) -> dict:
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(model="tiny", **kwargs)
    return e.value.body


# ---------------------------------------------------------------- files


def test_rft_formats_are_the_prompt_readers_formats():
    from tunesmith.data.prompts import PROMPT_ROW_FORMATS
    from tunesmith.server.jobs import METHOD_FORMATS, METHODS

    assert set(METHOD_FORMATS["reinforcement"]) == {f"rft_{f}" for f in PROMPT_ROW_FORMATS}
    assert METHODS["reinforcement"] == "grpo"


def test_prompt_uploads_and_a_bad_prompt_line(server):
    c = server.client
    assert c.files.create(file=("trl.jsonl", _prompts(3, seed=1, trl=True)), purpose="fine-tune").status == "processed"
    good = {"messages": [{"role": "user", "content": "a b"}], "reference_answer": "b a"}
    bad = good | {"messages": good["messages"] + [{"role": "assistant", "content": "b a"}]}
    with pytest.raises(openai.BadRequestError) as e:  # the answer is the model's to sample: E036 on line 2 only
        c.files.create(file=("bad-prompts.jsonl", (json.dumps(good) + "\n" + json.dumps(bad) + "\n" + json.dumps(good)
                                                   + "\n").encode()), purpose="fine-tune")
    err = e.value.body
    assert err["code"] == "E036" and "bad-prompts.jsonl:2" in err["message"]
    assert [(i["code"], i["line"]) for i in err["issues"]] == [("E036", 2)]
    with pytest.raises(openai.BadRequestError) as e:  # the first record decides: SFT records, one missing its answer
        c.files.create(file=("sft-first.jsonl", (json.dumps(bad) + "\n" + json.dumps(good) + "\n").encode()),
                       purpose="fine-tune")
    assert [(i["code"], i["line"]) for i in e.value.body["issues"]] == [("E010", 2)]


def test_files_of_another_kind_are_400_naming_the_method_that_fits(server, prompts_file, tiny_data):
    c = server.client
    sft = c.files.create(file=("sft.jsonl", tiny_data[0].read_bytes()), purpose="fine-tune")
    err = _refused(c, training_file=sft.id, method=_reinforcement())
    assert (err["param"], err["code"]) == ("training_file", "E036") and "sft.jsonl:1" in err["message"], err
    assert "or use method.type 'supervised'" in err["message"]
    err = _refused(c, training_file=prompts_file.id)  # prompts for a supervised job: no answers to learn
    assert (err["param"], err["code"]) == ("training_file", "E010"), err
    assert "or use method.type 'reinforcement'" in err["message"]


# ---------------------------------------------------------------- the method: grader and hyperparameters


@pytest.mark.parametrize("text", ["plain", "tab\tand é", "emoji 😀 and 𝔘", "a backslash then u: \\ud83d\\ude00",
                                  "line\u2028separator \x85 next line", "{{item.x}} # not a comment: yes"])
def test_any_grader_text_reaches_the_run_unchanged(text):
    """The grader travels to the worker as a --set value, read as YAML: characters beyond U+FFFF included (JSON's
    surrogate-pair escapes would reach it as two broken characters)."""
    from tunesmith.config import load_config
    from tunesmith.server.reinforcement import method_overrides

    spec = EXACT | {"name": text}
    cfg = load_config(None, ["objective.name=grpo", *method_overrides(spec, None)])
    assert cfg.objective.grpo.grader == spec


def test_auto_hyperparameters_are_echoed_resolved(server, prompts_file):
    """10 prompts without a validation file: 1 held out (data.valid_fraction 0.1), 9 in batches of 8 (the config
    default) = 2 steps per epoch, so eval_interval "auto" is 2; 4 answers per prompt is compute_multiplier 1."""
    c = server.client
    job = c.fine_tuning.jobs.create(model="tiny", training_file=prompts_file.id, method=_reinforcement(EXACT),
                                    extra_body=LONG)
    c.fine_tuning.jobs.cancel(job.id)
    hp = job.method.reinforcement.hyperparameters.model_dump()
    assert hp == {"batch_size": 8, "compute_multiplier": 1.0, "eval_interval": 2, "eval_samples": 1,
                  "learning_rate_multiplier": 1.0, "n_epochs": 3, "reasoning_effort": "default"}
    assert job.method.reinforcement.grader.model_dump(exclude_none=True) == EXACT
    assert job.hyperparameters.model_dump(exclude_none=True) == {"batch_size": 8, "learning_rate_multiplier": 1.0,
                                                                 "n_epochs": 3}
    assert c.fine_tuning.jobs.retrieve(job.id).method.model_dump() == job.method.model_dump()  # stored resolved


@pytest.mark.parametrize("hyper,param,says", [
    ({"eval_samples": 3}, "eval_samples", "answers each held-out prompt once"),
    ({"reasoning_effort": "high"}, "reasoning_effort", "no reasoning-effort setting"),
    ({"compute_multiplier": 0}, "compute_multiplier", "> 0"),
    ({"compute_multiplier": 0.25}, "compute_multiplier", "4 x 0.25 = 1 answers per prompt"),
    ({"eval_interval": 0}, "eval_interval", "integer from 1"),
])
def test_hyperparameters_tunesmith_cannot_honour_are_400(server, prompts_file, hyper, param, says):
    err = _refused(server.client, training_file=prompts_file.id, method=_reinforcement(**hyper))
    assert (err["param"], err["code"]) == (f"method.reinforcement.hyperparameters.{param}", "invalid_value"), err
    assert says in err["message"]


@pytest.mark.parametrize("method,param,code,says", [
    ({"type": "reinforcement"}, "method.reinforcement.grader", "missing_required_parameter", "is required"),
    (_reinforcement(beta=0.1), "method.reinforcement.hyperparameters.beta", "unknown_parameter", "Unrecognized"),
    (_reinforcement() | {"dpo": {"hyperparameters": {"beta": 0.1}}}, "method.dpo", "invalid_value", "method.type"),
    (_reinforcement({"type": "string_check", "operation": "eq", "input": "{{sample.output_text}}"}),
     "method.reinforcement.grader", "invalid_grader", "missing field 'reference'"),
    (_reinforcement({"type": "python", "source": "def grade(sample, item):\n    return (1\n"}),
     "method.reinforcement.grader.source", "invalid_grader", "line 2"),
    (_reinforcement(EXACT | {"input": "{{answer.text}}"}), "method.reinforcement.grader.input", "invalid_grader",
     "unknown namespace 'answer'"),
    (_reinforcement("tunesmith.testing:reward_char_overlap"), "method.reinforcement.grader", "invalid_grader",
     "JSON object"),  # a 'module:function' grader would import code in the server
    (_reinforcement({"type": "score_model", "input": [{"role": "user", "content": "Rate {{sample.output_text}}"}]}),
     "method.reinforcement.grader", "invalid_grader", "--judge-model"),  # this server has no judge model
])
def test_bad_methods_and_graders_are_400(server, prompts_file, method, param, code, says):
    err = _refused(server.client, training_file=prompts_file.id, method=method)
    assert (err["param"], err["code"]) == (param, code), err
    assert says in err["message"]


# ---------------------------------------------------------------- validating_files: the grader against the rows


def test_a_grader_reading_a_missing_field_fails_the_job_with_the_line(server):
    c = server.client
    rows = c.files.create(file=("no-reference.jsonl", _prompts(4, seed=3, drop="reference_answer")),
                          purpose="fine-tune")
    job = c.fine_tuning.jobs.create(model="tiny", training_file=rows.id, method=_reinforcement(EXACT), extra_body=LONG)
    job = wait_status(c, job.id, "failed", "queued", "running", "succeeded", timeout=60)
    assert job.status == "failed" and (job.error.code, job.error.param) == ("missing_item_field", "training_file")
    assert f"{rows.id}:1" in job.error.message and "{{item.reference_answer}}" in job.error.message
    assert "no field 'reference_answer'" in job.error.message and f"{rows.id}:4" in job.error.message


def test_a_python_grader_whose_code_cannot_start_fails_the_job(server, prompts_file):
    c = server.client
    broken = {"type": "python", "name": "broken", "source": "import no_such_module_here\n\n"
                                                            "def grade(sample, item):\n    return 1.0\n"}
    job = c.fine_tuning.jobs.create(model="tiny", training_file=prompts_file.id, method=_reinforcement(broken),
                                    extra_body=LONG)
    job = wait_status(c, job.id, "failed", "queued", "running", "succeeded", timeout=60)
    assert job.status == "failed"
    assert (job.error.code, job.error.param) == ("invalid_grader", "method.reinforcement.grader")
    assert "no_such_module_here" in job.error.message


# ---------------------------------------------------------------- one reinforcement job, end to end


def test_reinforcement_job_runs_to_succeeded_with_rewards(server):
    """8 prompts in batches of 4, 2 epochs = 4 steps, 2 answers each (compute_multiplier 0.5 of 4), evaluated and
    checkpointed every 2 steps on 4 held-out TRL-format prompts, graded by a python grader with partial credit.
    The tiny model's answers run to the 6-token limit, so cut answers are kept in the loss for it to be live."""
    c = server.client
    train = c.files.create(file=("train-prompts.jsonl", _prompts(8, seed=4)), purpose="fine-tune")
    valid = c.files.create(file=("valid-prompts.jsonl", _prompts(4, seed=5, trl=True)), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(
        model="tiny", training_file=train.id, validation_file=valid.id, seed=3,
        method=_reinforcement(OVERLAP, n_epochs=2, batch_size=4, compute_multiplier=0.5, eval_interval=2,
                              eval_samples="auto", reasoning_effort="default"),
        extra_body={"tunesmith_config": {"objective.grpo.max_completion_length": 6, "checkpoint.every_steps": 2,
                                         "objective.grpo.mask_truncated_completions": False,
                                         "eval.compare_base": False}})
    job = wait_status(c, job.id, "succeeded", "failed", "cancelled")
    assert job.status == "succeeded", job.error
    assert job.method.reinforcement.hyperparameters.model_dump() == {
        "batch_size": 4, "compute_multiplier": 0.5, "eval_interval": 2, "eval_samples": 1,
        "learning_rate_multiplier": 1.0, "n_epochs": 2, "reasoning_effort": "default"}
    events = c.fine_tuning.jobs.list_events(job.id, limit=300).data
    messages = [e.message for e in events]
    assert any(m.startswith("Grader check on the first 3 training rows with an empty answer: scores 0, 0, 0")
               for m in messages), messages
    assert any("grpo: 2 answers sampled per prompt" in m for m in messages)
    assert any("held-out reward" in m for m in messages if m.startswith("The job has successfully completed"))
    metrics = [e.data for e in events if e.type == "metrics"]
    train_points = sorted((d for d in metrics if "train_loss" in d), key=lambda d: d["step"])
    evals = [d for d in metrics if "valid_loss" in d]
    assert [d["step"] for d in train_points] == [1, 2, 3, 4] and {d["step"] for d in evals} == {2, 4}
    for d in train_points:
        assert 0.0 < d["train_reward"] < 1.0 and d["train_reward_std"] >= 0.0
        assert 0.0 <= d["train_frac_reward_zero_std"] <= 1.0 and 1 <= d["train_completion_length"] <= 6
    assert any(d["train_reward_std"] > 0 and d["train_loss"] != 0 for d in train_points)  # groups that teach
    for d in evals:  # the held-out figure: mean grade of greedy answers; valid_loss is minus it
        assert 0.0 <= d["valid_reward"] <= 1.0 and d["valid_loss"] == pytest.approx(-d["valid_reward"])
        assert d["valid_mean_token_accuracy"] is None
    assert any("reward=" in e.message for e in events if e.type == "metrics")
    newest = c.fine_tuning.jobs.checkpoints.list(job.id).data[0]
    assert newest.step_number == 4
    assert {"train_reward", "train_reward_std", "valid_reward", "valid_loss"} <= set(newest.metrics.model_dump())
    csv = c.files.content(job.result_files[0]).text.splitlines()
    header = csv[0].split(",")
    assert header[:5] == ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"]
    assert {"train_reward", "valid_reward"} <= set(header)
    assert len(csv) == 5
    valid_at_4 = float(csv[4].split(",")[header.index("valid_reward")])
    assert valid_at_4 == pytest.approx(next(d["valid_reward"] for d in evals if d["step"] == 4))
    assert math.isfinite(valid_at_4)


# ---------------------------------------------------------------- the grader endpoints


def test_graders_validate(server):
    g = server.client.fine_tuning.alpha.graders
    assert g.validate(grader=EXACT).grader.model_dump(exclude_none=True) == EXACT
    with pytest.raises(openai.BadRequestError) as e:
        g.validate(grader={"type": "text_similarity", "input": "{{sample.output_text}}", "reference": "x",
                           "evaluation_metric": "bleuu"})
    assert (e.value.body["param"], e.value.body["code"]) == ("grader.evaluation_metric", "invalid_grader")
    assert "bleu" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:  # no --judge-model on this server
        g.validate(grader={"type": "score_model", "name": "judge", "input": [{"role": "user", "content": "Rate it"}]})
    assert e.value.body["code"] == "invalid_grader" and "--judge-model" in e.value.body["message"]


def test_graders_run_string_check_multi_and_a_missing_field(server):
    g = server.client.fine_tuning.alpha.graders
    item = {"reference_answer": "river apple"}
    ok = g.run(grader=EXACT, model_sample="river apple", item=item)
    assert ok.reward == 1.0 and ok.metadata.name == "exact" and ok.metadata.type == "string_check"
    assert not any(v for v in ok.metadata.errors.model_dump().values()) and ok.sub_rewards == {}
    assert ok.metadata.execution_time >= 0 and ok.model_dump()["metadata"]["reason"] is None
    multi = {"type": "multi", "name": "mix", "calculate_output": "0.5 * exact + 0.5 * overlap",
             "graders": {"exact": EXACT, "overlap": {"type": "text_similarity", "name": "overlap",
                                                     "input": "{{sample.output_text}}",
                                                     "reference": "{{item.reference_answer}}",
                                                     "evaluation_metric": "fuzzy_match"}}}
    mixed = g.run(grader=multi, model_sample="river", item=item)
    assert mixed.sub_rewards["exact"] == 0.0 and 0.0 < mixed.sub_rewards["overlap"] < 1.0
    assert mixed.reward == pytest.approx(0.5 * mixed.sub_rewards["overlap"])
    missing = g.run(grader=EXACT, model_sample="river apple", item={"answer": "river apple"})
    assert missing.reward == 0.0 and missing.metadata.errors.invalid_variable_error
    assert "no field 'reference_answer'" in missing.model_dump()["metadata"]["reason"]


ATTACKS = {
    "reads a file": "def grade(sample, item):\n    return len(open('/etc/passwd').read())\n",
    "opens a socket": ("import socket\n\ndef grade(sample, item):\n"
                       "    socket.create_connection(('127.0.0.1', 9))\n    return 1.0\n"),
    "forks": "import os\n\ndef grade(sample, item):\n    os.fork()\n    return 1.0\n",
    "loops forever": "def grade(sample, item):\n    while True:\n        pass\n",
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_graders_run_sandbox_gives_0_with_a_reason_and_the_server_goes_on(server, attack):
    g = server.client.fine_tuning.alpha.graders
    out = g.run(grader={"type": "python", "name": "attack", "source": ATTACKS[attack]}, model_sample="x", item={})
    errors = out.metadata.errors
    assert out.reward == 0.0 and errors.python_grader_runtime_error, out
    reason = errors.python_grader_runtime_error_details
    if attack == "loops forever":
        assert "timed out after 10 s" in reason and errors.unresponsive_reward_error
    else:
        assert reason.startswith("sandbox: ") and "is not allowed" in reason, reason
    fine = g.run(grader=OVERLAP, model_sample="b a", item={"reference_answer": "a b"})  # the server goes on
    assert fine.reward == 1.0
    assert "tiny" in {m.id for m in server.client.models.list()}


def test_grader_routes_need_the_token(server):
    stranger = openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-a-token", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.fine_tuning.alpha.graders.run(grader=EXACT, model_sample="a", item={"reference_answer": "a"})
    with pytest.raises(openai.AuthenticationError):
        stranger.fine_tuning.alpha.graders.validate(grader=EXACT)


# ---------------------------------------------------------------- a server with a judge model


def test_score_model_graders_ask_the_servers_judge(tmp_path_factory, tiny_model_dir):
    """--judge-model: score_model graders validate and run (the tiny model's reply holds no score: 0, with the
    parse error flagged); a judge the server does not offer stops the start."""
    from tunesmith.config import ConfigError
    from tunesmith.server.api import create_app
    from tunesmith.server.settings import Settings

    data = tmp_path_factory.mktemp("judge-server") / "data"
    srv = Server(data, tiny_model_dir, "--judge-model", "tiny").start()
    try:
        g = srv.client.fine_tuning.alpha.graders
        judge = {"type": "score_model", "name": "judge", "range": [0, 1],
                 "sampling_params": {"max_completions_tokens": 4},
                 "input": [{"role": "user", "content": "Score 0 to 1: {{sample.output_text}}"}]}
        assert g.validate(grader=judge).grader.model_dump(exclude_none=True, warnings=False) == judge
        out = g.run(grader=judge, model_sample="x")
        assert out.metadata.sampled_model_name == "tiny" and out.metadata.type == "score_model"
        assert out.reward == 0.0 and out.metadata.errors.model_grader_parse_error, out
        # a job with that grader: the worker asks the server's judge (1 step of 4 prompts, 2 answers each)
        c = srv.client
        rows = c.files.create(file=("judged.jsonl", _prompts(4, seed=6)), purpose="fine-tune")
        job = c.fine_tuning.jobs.create(
            model="tiny", training_file=rows.id, validation_file=rows.id,
            method=_reinforcement(judge, n_epochs=1, batch_size=4, compute_multiplier=0.5),
            extra_body={"tunesmith_config": {"objective.grpo.max_completion_length": 4, "eval.compare_base": False}})
        job = wait_status(c, job.id, "succeeded", "failed", "cancelled")
        assert job.status == "succeeded", job.error
        messages = [e.message for e in c.fine_tuning.jobs.list_events(job.id, limit=100).data]
        assert any(m.startswith("Grader check: skipped") for m in messages) and \
            any(m.startswith("Step 1/1: training loss=") and "reward=" in m for m in messages), messages
    finally:
        srv.stop()
    with pytest.raises(ConfigError, match="--judge-model 'nope'"):
        create_app(Settings(data_dir=data.parent / "other", tokens=[TOKEN], judge_model="nope"))


def test_the_operator_cannot_set_a_jobs_grader_or_judge_with_set():
    from tunesmith.config import ConfigError
    from tunesmith.server.jobs import check_server_overrides

    with pytest.raises(ConfigError, match="set by the server for each job"):
        check_server_overrides(['objective.grpo.grader={"type": "string_check"}'])
    with pytest.raises(ConfigError, match="--judge-model NAME"):
        check_server_overrides(["objective.grpo.judge_model=tiny"])
