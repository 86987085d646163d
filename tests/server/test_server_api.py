"""The job server through the official openai client: files, jobs, events, checkpoints, chat, models, auth."""

import json
import urllib.error
import urllib.request

import openai
import pytest

from server_helpers import TOKEN, wait_for, wait_status


# A job that would train far longer than any test: it is cancelled, never finished.
LONG = {"tunesmith_config": {"train.max_steps": 100000, "eval.every_steps": 100000, "eval.compare_base": False}}


def _raw(server, method, path, token=TOKEN, body=None, headers=None):
    """A plain HTTP request (for what the openai client does not send: no token, odd routes)."""
    h = dict(headers or {})
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    if data is not None:
        h["Content-Type"] = "application/json"
    req = urllib.request.Request(server.url + path, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# ---------------------------------------------------------------- auth


@pytest.mark.parametrize("method,path", [("GET", "/v1/models"), ("GET", "/v1/fine_tuning/jobs"), ("POST", "/v1/files"),
                                         ("POST", "/v1/chat/completions"), ("GET", "/v1/no/such/route"),
                                         ("GET", "/v1/fine_tuning/jobs/x/report/report.html")])
def test_every_route_needs_a_token(server, method, path):
    for token in (None, "wrong-token"):
        status, body = _raw(server, method, path, token=token)
        assert status == 401
        err = json.loads(body)["error"]
        assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error"


def test_openai_client_with_a_bad_key_gets_401(server):
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.fine_tuning.jobs.list()
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"


def test_dashboard_without_a_token_is_the_sign_in_page(server):
    status, body = _raw(server, "GET", "/dashboard", token=None)
    assert status == 401 and b'action="/dashboard/login"' in body
    status, body = _raw(server, "GET", "/dashboard")
    assert status == 200 and b'id="loss-chart"' in body


# ---------------------------------------------------------------- files


def test_upload_list_retrieve_delete(server, tiny_data, tmp_path):
    c = server.client
    f = c.files.create(file=("my data.jsonl", open(tiny_data[0], "rb").read()), purpose="fine-tune")
    assert f.id.startswith("file-") and f.filename == "my data.jsonl" and f.status == "processed"
    assert f.bytes == tiny_data[0].stat().st_size
    assert c.files.retrieve(f.id).filename == "my data.jsonl"
    assert f.id in [x.id for x in c.files.list()]
    assert c.files.content(f.id).read() == tiny_data[0].read_bytes()
    stored = list((server.data_dir / "files").iterdir())
    assert all(p.name.startswith("file-") for p in stored)  # opaque names; the client's name is only metadata
    assert c.files.delete(f.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        c.files.retrieve(f.id)


def test_client_file_name_is_never_a_path(server, tiny_data):
    f = server.client.files.create(file=("../../../etc/evil.jsonl", tiny_data[0].read_bytes()), purpose="fine-tune")
    assert f.filename == "evil.jsonl"
    assert not (server.data_dir.parent / "etc").exists()
    assert (server.data_dir / "files" / f"{f.id}.jsonl").is_file()


@pytest.mark.parametrize("name,content,code", [
    ("bad.jsonl", b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{oops\n', "E003"),
    ("empty.jsonl", b"", "E001"),
    ("roles.jsonl", b'{"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n', "E008"),
    ("data.txt", b"hello\n", "E017"),
])
def test_upload_is_validated_with_check_codes(server, name, content, code):
    with pytest.raises(openai.BadRequestError) as e:
        server.client.files.create(file=(name, content), purpose="fine-tune")
    err = e.value.body
    assert e.value.status_code == 400 and err["code"] == code and err["param"] == "file"
    assert name in err["message"] and str(server.data_dir) not in err["message"]  # no server paths leak


def test_upload_errors_list_every_issue_with_its_line(server):
    bad = b'{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}]}\n' \
          b'{"messages": [{"role": "user", "content": "q"}]}\n'
    with pytest.raises(openai.BadRequestError) as e:
        server.client.files.create(file=("two.jsonl", bad), purpose="fine-tune")
    issues = e.value.body["issues"]
    assert {(i["code"], i["line"]) for i in issues} >= {("E009", 1), ("E010", 2)}


def test_upload_wrong_purpose_and_size_limit(server, tiny_data):
    with pytest.raises(openai.BadRequestError) as e:
        server.client.files.create(file=("a.jsonl", tiny_data[0].read_bytes()), purpose="batch")
    assert e.value.body["param"] == "purpose"
    big = tiny_data[0].read_bytes() * 40  # > 0.05 MB (the test server's --max-file-mb)
    with pytest.raises(openai.APIStatusError) as e:
        server.client.files.create(file=("big.jsonl", big), purpose="fine-tune")
    assert e.value.status_code == 413 and e.value.body["code"] == "file_too_large"


# ---------------------------------------------------------------- jobs: the whole life of one


def test_job_runs_to_succeeded(server, finished_job, uploaded):
    job = finished_job
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:tiny:rev:{job.id}"
    assert job.model == "tiny" and job.seed == 7 and job.finished_at >= job.created_at
    assert job.hyperparameters.n_epochs == 2 and job.hyperparameters.batch_size == 8
    assert job.hyperparameters.learning_rate_multiplier == 2
    assert job.trained_tokens > 0 and job.error is None
    # the multiplier scales the server's default lr (1e-2 in these tests) in the frozen config
    resolved = (server.data_dir / "runs" / job.id / "config.resolved.yaml").read_text()
    assert "lr: 0.02" in resolved
    assert server.client.fine_tuning.jobs.retrieve(job.id).status == "succeeded"
    results = job.result_files[0]
    csv = server.client.files.content(results).read().decode()
    assert csv.splitlines()[0].startswith("step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy")
    assert len(csv.splitlines()) == 9
    assert server.client.files.retrieve(results).purpose == "fine-tune-results"


def test_events_tell_the_story_and_paginate(server, finished_job):
    c = server.client
    everything = list(c.fine_tuning.jobs.list_events(finished_job.id, limit=1000))
    messages = [e.message for e in reversed(everything)]  # newest first from the API
    assert messages[0] == f"Created fine-tuning job: {finished_job.id}"
    assert any(m.startswith("Files validated") for m in messages)
    assert messages[-1].startswith("The job has successfully completed")
    train = [e for e in everything if e.type == "metrics" and "train_loss" in e.data]
    assert sorted(e.data["step"] for e in train) == list(range(1, 9))
    assert [e for e in everything if e.type == "metrics" and "valid_loss" in e.data]
    # cursor pagination with after/limit: pages of 5 rebuild the whole list, in order, without overlap
    pages, after = [], None
    while True:
        page = c.fine_tuning.jobs.list_events(finished_job.id, limit=5, **({"after": after} if after else {}))
        pages += page.data
        if not page.has_more:
            break
        after = page.data[-1].id
    assert [e.id for e in pages] == [e.id for e in everything]
    assert len(everything) > 10


def test_checkpoints_listed(server, finished_job):
    ckpts = list(server.client.fine_tuning.jobs.checkpoints.list(finished_job.id))
    assert [c.step_number for c in ckpts] == [8, 4]  # newest first; keep_last 2
    assert ckpts[0].fine_tuned_model_checkpoint == f"{finished_job.fine_tuned_model}:ckpt-step-8"
    assert ckpts[0].metrics.train_loss is not None and ckpts[0].metrics.valid_loss is not None


def test_jobs_list_paginates_newest_first(server, uploaded):
    c = server.client
    ids = [c.fine_tuning.jobs.create(model="tiny", training_file=uploaded[0].id, extra_body=LONG).id for _ in range(3)]
    for i in ids:
        c.fine_tuning.jobs.cancel(i)
    page = c.fine_tuning.jobs.list(limit=2)
    assert [j.id for j in page.data] == ids[::-1][:2] and page.has_more
    nxt = c.fine_tuning.jobs.list(limit=2, after=page.data[-1].id)
    assert nxt.data[0].id == ids[0]
    assert [j.id for j in c.fine_tuning.jobs.list(limit=100)][:3] == ids[::-1]


def test_idempotency_key_returns_the_same_job(server, uploaded):
    c = server.client
    kw = dict(model="tiny", training_file=uploaded[0].id, seed=3, extra_body=LONG)
    a = c.fine_tuning.jobs.create(**kw, extra_headers={"Idempotency-Key": "create-42"})
    b = c.fine_tuning.jobs.create(**kw, extra_headers={"Idempotency-Key": "create-42"})
    assert a.id == b.id
    other = c.fine_tuning.jobs.create(**kw, extra_headers={"Idempotency-Key": "create-43"})
    assert other.id != a.id
    with pytest.raises(openai.ConflictError) as e:  # same key, different request
        c.fine_tuning.jobs.create(**(kw | {"seed": 4}), extra_headers={"Idempotency-Key": "create-42"})
    assert e.value.body["code"] == "idempotency_key_reused"
    for j in (a.id, other.id):
        c.fine_tuning.jobs.cancel(j)


def test_cancel_running_and_queued_jobs(server, uploaded, finished_job):
    c = server.client
    long = c.fine_tuning.jobs.create(model="tiny", training_file=uploaded[0].id, extra_body=LONG)
    wait_for(lambda: any(e.type == "metrics" for e in c.fine_tuning.jobs.list_events(long.id, limit=5)),
             what="the long job to train a step")
    queued = c.fine_tuning.jobs.create(model="tiny", training_file=uploaded[0].id)
    assert wait_status(c, queued.id, "queued").status == "queued"  # one worker, and it is busy
    assert c.fine_tuning.jobs.cancel(queued.id).status == "cancelled"
    assert c.fine_tuning.jobs.cancel(long.id).status == "cancelled"
    wait_for(lambda: any("cancelled at step" in e.message for e in c.fine_tuning.jobs.list_events(long.id, limit=5)),
             what="the worker to stop the cancelled job")
    job = c.fine_tuning.jobs.retrieve(long.id)
    assert job.status == "cancelled" and job.fine_tuned_model is None
    with pytest.raises(openai.BadRequestError) as e:
        c.fine_tuning.jobs.cancel(finished_job.id)
    assert e.value.body["code"] == "job_finished"


@pytest.mark.parametrize("kwargs,param,code", [
    (dict(model="gpt-4o-mini"), "model", "model_not_available"),
    (dict(training_file="file-doesnotexist"), "training_file", "file_not_found"),
    (dict(suffix="no spaces allowed"), "suffix", "invalid_value"),
    (dict(method={"type": "distillation"}), "method.type", "unsupported_method"),
    (dict(hyperparameters={"n_epochs": 0}), "hyperparameters.n_epochs", "invalid_value"),
    (dict(extra_body={"tunesmith_config": {"data.train": "/etc/passwd"}}), "tunesmith_config.data.train", "forbidden_config_key"),
    (dict(extra_body={"tunesmith_config": {"eval.metrics": ["os:system"]}}), "tunesmith_config.eval.metrics", "forbidden_config_key"),
    (dict(extra_body={"tunesmith_config": {"train.augment": {"paraphrase_model": "/x"}}}), "tunesmith_config.train.augment", "forbidden_config_key"),
    (dict(extra_body={"tunesmith_config": {"train.lr": 5}}), "tunesmith_config", "invalid_config"),
    (dict(extra_body={"surprise": 1}), "surprise", "unknown_parameter"),
])
def test_bad_job_requests(server, uploaded, kwargs, param, code):
    base = dict(model="tiny", training_file=uploaded[0].id)
    with pytest.raises(openai.BadRequestError) as e:
        server.client.fine_tuning.jobs.create(**(base | kwargs))
    err = e.value.body
    assert (err["param"], err["code"]) == (param, code), err


def test_unknown_job_is_404(server):
    with pytest.raises(openai.NotFoundError) as e:
        server.client.fine_tuning.jobs.retrieve("ftjob-nope")
    assert e.value.body["code"] == "fine_tuning_job_not_found"


def test_job_on_data_the_model_cannot_take_fails_with_the_code(server):
    """Upload-time checks need no model; token lengths are checked when the job trains (E013 here)."""
    long_text = " ".join(["the quick brown fox"] * 60)
    rec = {"messages": [{"role": "user", "content": long_text}, {"role": "assistant", "content": "ok"}]}
    f = server.client.files.create(file=("long.jsonl", (json.dumps(rec) + "\n").encode() * 4), purpose="fine-tune")
    job = server.client.fine_tuning.jobs.create(model="tiny", training_file=f.id)
    job = wait_status(server.client, job.id, "failed", "succeeded")
    assert job.status == "failed" and job.error.code == "E013" and job.error.param == "training_file"
    assert str(server.data_dir) not in job.error.message


# ---------------------------------------------------------------- models and chat


def test_models_list_has_base_and_fine_tuned(server, finished_job):
    ids = [m.id for m in server.client.models.list()]
    assert "tiny" in ids and finished_job.fine_tuned_model in ids
    assert server.client.models.retrieve(finished_job.fine_tuned_model).owned_by == "user"
    with pytest.raises(openai.NotFoundError):
        server.client.models.retrieve("ft:tiny:x:ftjob-nope")


def test_chat_completion_on_the_fine_tuned_model(server, finished_job):
    msgs = [{"role": "system", "content": "reverse"}, {"role": "user", "content": "fox dog paris"}]
    r = server.client.chat.completions.create(model=finished_job.fine_tuned_model, messages=msgs, max_tokens=6)
    assert r.object == "chat.completion" and r.model == finished_job.fine_tuned_model
    choice = r.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    again = server.client.chat.completions.create(model=finished_job.fine_tuned_model, messages=msgs, max_tokens=6)
    assert again.choices[0].message.content == choice.message.content  # greedy by default: deterministic


def test_streaming_chat_equals_the_non_streamed_reply(server, finished_job):
    msgs = [{"role": "user", "content": "hello world quick"}]
    full = server.client.chat.completions.create(model=finished_job.fine_tuned_model, messages=msgs, max_tokens=8)
    chunks = list(server.client.chat.completions.create(model=finished_job.fine_tuned_model, messages=msgs,
                                                        max_tokens=8, stream=True,
                                                        stream_options={"include_usage": True}))
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_chat_on_a_base_model_and_errors(server):
    r = server.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                              temperature=0.8, seed=1)
    assert r.usage.completion_tokens <= 3
    with pytest.raises(openai.NotFoundError) as e:
        server.client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        server.client.chat.completions.create(model="tiny", messages=[{"role": "tool", "content": "x"}])
    assert e.value.body["param"] == "messages[0].role"
