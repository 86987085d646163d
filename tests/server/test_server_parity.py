"""Parity with OpenAI's fine-tuning API through the official openai client: pause and resume, models.delete,
chat with a checkpoint's model id, the jobs.list metadata filter, checkpoint metrics and the results file's columns;
and the README's table of OpenAI's endpoints and fields, checked against the server's routes."""

import csv
import io
import re
from pathlib import Path

import openai
import pytest

from server_helpers import wait_for, wait_status

README = Path(__file__).resolve().parents[2] / "README.md"
# A job slow enough to pause in the middle on any machine: 8 micro-batches a step (as test_server_restart).
SLOW = {"tunesmith_config": {"train.max_steps": 10, "train.grad_accum": 8, "checkpoint.every_steps": 2,
                             "eval.every_steps": 5, "eval.compare_base": False}}


def _messages(client, job_id):
    return [e.message for e in reversed(list(client.fine_tuning.jobs.list_events(job_id, limit=1000)))]


def _train_steps(client, job_id):
    events = client.fine_tuning.jobs.list_events(job_id, limit=1000)
    return [e.data["step"] for e in reversed(list(events)) if e.type == "metrics" and "train_loss" in e.data]


# ---------------------------------------------------------------- pause, resume, then delete the model


@pytest.fixture(scope="module")
def paused_and_resumed(server, uploaded):
    c = server.client
    job = c.fine_tuning.jobs.create(model="tiny", training_file=uploaded[0].id, validation_file=uploaded[1].id,
                                    suffix="pause", hyperparameters={"batch_size": 4}, extra_body=SLOW)
    wait_for(lambda: len(_train_steps(c, job.id)) >= 2, what="two training steps")
    paused = c.fine_tuning.jobs.pause(job.id)
    assert paused.status == "paused" and paused.id == job.id
    stopped = wait_for(lambda: [m for m in _messages(c, job.id) if m.startswith("Job paused at step")],
                       what="the worker to checkpoint and stop")
    at = int(stopped[0].split("step ")[1].split(";")[0])
    steps_then = len(_train_steps(c, job.id))
    assert c.fine_tuning.jobs.pause(job.id).status == "paused"  # pausing again changes nothing
    assert c.fine_tuning.jobs.retrieve(job.id).status == "paused" and len(_train_steps(c, job.id)) == steps_then
    resumed = c.fine_tuning.jobs.resume(job.id)
    assert resumed.status in ("queued", "running")
    done = wait_status(c, job.id, "succeeded", "failed")
    return done, at


def test_pause_stops_with_a_checkpoint_and_resume_continues_from_it(server, paused_and_resumed):
    job, paused_at = paused_and_resumed
    c = server.client
    assert job.status == "succeeded", job.error
    messages = _messages(c, job.id)
    assert f"Training resumed at step {paused_at}" in " ".join(messages)
    assert sorted(set(_train_steps(c, job.id))) == list(range(1, 11))
    with pytest.raises(openai.BadRequestError) as e:
        c.fine_tuning.jobs.resume(job.id)  # not paused
    assert e.value.body["code"] == "job_not_paused"
    with pytest.raises(openai.BadRequestError) as e:
        c.fine_tuning.jobs.pause(job.id)  # finished
    assert e.value.body["code"] == "job_not_pausable"


def test_a_paused_job_can_be_cancelled(server, uploaded):
    c = server.client
    job = c.fine_tuning.jobs.create(model="tiny", training_file=uploaded[0].id, extra_body=SLOW)
    c.fine_tuning.jobs.pause(job.id)
    assert c.fine_tuning.jobs.cancel(job.id).status == "cancelled"


def test_models_delete_removes_a_fine_tuned_model(server, paused_and_resumed):
    job, _ = paused_and_resumed
    c, name = server.client, job.fine_tuned_model
    reply = c.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert reply.model == name
    gone = c.models.delete(name)
    assert (gone.id, gone.deleted, gone.object) == (name, True, "model")
    assert name not in [m.id for m in c.models.list()]
    for call in (lambda: c.models.retrieve(name), lambda: c.models.delete(name),
                 lambda: c.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}])):
        with pytest.raises(openai.NotFoundError) as e:
            call()
        assert e.value.body["code"] == "model_not_found"
    assert not (server.data_dir / "runs" / job.id / "best").exists()
    assert c.fine_tuning.jobs.retrieve(job.id).fine_tuned_model == name  # the job keeps its record
    with pytest.raises(openai.PermissionDeniedError) as e:
        c.models.delete("tiny")
    assert e.value.body["code"] == "model_not_deletable"


# ---------------------------------------------------------------- checkpoints


def test_chat_with_a_checkpoint_model_id(server, finished_job):
    c = server.client
    ckpts = list(c.fine_tuning.jobs.checkpoints.list(finished_job.id))
    for ck in ckpts:
        r = c.chat.completions.create(model=ck.fine_tuned_model_checkpoint, max_tokens=4,
                                      messages=[{"role": "user", "content": "fox dog"}])
        assert r.model == ck.fine_tuned_model_checkpoint and r.usage.completion_tokens >= 1
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model=f"{finished_job.fine_tuned_model}:ckpt-step-3",  # never saved
                                  messages=[{"role": "user", "content": "x"}])
    assert e.value.body["code"] == "model_not_found"


def test_checkpoint_model_holds_the_checkpoint_weights(server, finished_job):
    """In-process: the served checkpoint model's trained parameters are the checkpoint's tensors."""
    import torch
    from safetensors.torch import load_file

    from tunesmith.server.inference import CheckpointRef, load_checkpoint_model

    run = server.data_dir / "runs" / finished_job.id
    ckpt = sorted(p for p in (run / "checkpoints").iterdir() if p.is_dir())[0]
    model, _ = load_checkpoint_model(CheckpointRef(str(run), str(ckpt)))
    params = dict(model.named_parameters())
    tensors = load_file(ckpt / "trainable.safetensors")
    assert tensors and all(torch.equal(params[n].detach().to(t.dtype), t) for n, t in tensors.items())


def test_checkpoint_metrics_carry_the_evaluation_figures(server, finished_job):
    c = server.client
    evals = {e.data["step"]: e.data for e in c.fine_tuning.jobs.list_events(finished_job.id, limit=1000)
             if e.type == "metrics" and "valid_loss" in e.data}
    for ck in c.fine_tuning.jobs.checkpoints.list(finished_job.id):
        m = ck.metrics
        assert m.valid_mean_token_accuracy is not None
        assert m.valid_mean_token_accuracy == evals[ck.step_number]["valid_mean_token_accuracy"]
        assert m.valid_loss == evals[ck.step_number]["valid_loss"]
        assert m.train_loss is not None and 0 <= m.train_mean_token_accuracy <= 1


def test_results_file_has_openais_columns(server, finished_job):
    text = server.client.files.content(finished_job.result_files[0]).read().decode()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0])[:5] == ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"]
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    assert all(0 <= float(r["train_accuracy"]) <= 1 for r in rows)
    assert [r["step"] for r in rows if r["valid_mean_token_accuracy"]] == ["4", "8"]


# ---------------------------------------------------------------- jobs.list(metadata=...)


def test_jobs_list_filters_by_metadata(server, uploaded):
    c = server.client
    long = {"tunesmith_config": {"train.max_steps": 100000, "eval.compare_base": False}}
    a = c.fine_tuning.jobs.create(model="tiny", training_file=uploaded[0].id, metadata={"team": "a", "run": "1"},
                                  extra_body=long)
    b = c.fine_tuning.jobs.create(model="tiny", training_file=uploaded[0].id, metadata={"team": "b"}, extra_body=long)
    for j in (a, b):
        c.fine_tuning.jobs.cancel(j.id)
    assert [j.id for j in c.fine_tuning.jobs.list(metadata={"team": "a"})] == [a.id]
    assert [j.id for j in c.fine_tuning.jobs.list(metadata={"team": "b"})] == [b.id]
    assert [j.id for j in c.fine_tuning.jobs.list(metadata={"team": "a", "run": "1"})] == [a.id]
    assert list(c.fine_tuning.jobs.list(metadata={"team": "a", "run": "2"})) == []
    assert list(c.fine_tuning.jobs.list(metadata={"team": "c"})) == []
    without = [j.id for j in c.fine_tuning.jobs.list(limit=100, extra_query={"metadata": "null"})]
    assert a.id not in without and b.id not in without and without
    assert c.fine_tuning.jobs.retrieve(a.id).metadata == {"team": "a", "run": "1"}


def test_chat_fields_the_server_cannot_honour_are_refused(server):
    for extra in ({"logprobs": True}, {"response_format": {"type": "json_object"}}, {"presence_penalty": 0.5}):
        with pytest.raises(openai.BadRequestError) as e:
            server.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], **extra)
        assert e.value.body["code"] == "unsupported_parameter" and e.value.body["param"] == next(iter(extra))
    ok = server.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=1,
                                               logprobs=False, response_format={"type": "text"}, presence_penalty=0)
    assert ok.choices[0].finish_reason in ("stop", "length")


# ---------------------------------------------------------------- the README's table, held to the routes


def _readme_tables():
    section = README.read_text().split("## Job server", 1)[1].split("\n## ", 1)[0]
    endpoints, fields = [], []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if len(cells) >= 3 and re.fullmatch(r"`(GET|POST|DELETE) /v1/\S+`", cells[0]):
            method, path = cells[0].strip("`").split(" ")
            endpoints.append((method, path, cells[1]))
        elif len(cells) >= 4 and cells[0] in ("job create", "job", "checkpoint metrics", "chat", "file", "results file",
                                              "images"):
            fields += [(cells[0], name.strip("` "), cells[2]) for name in cells[1].split(",")]
    return endpoints, fields


def _shape(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "{}", path)


def test_readme_table_lists_every_route_with_its_status(tmp_path):
    from tunesmith.server.api import create_app
    from tunesmith.server.settings import Settings

    app = create_app(Settings(data_dir=tmp_path, tokens=["t"]))
    routes = {(m, _shape(r.path)) for r in app.routes if r.path.startswith("/v1/") for m in r.methods - {"HEAD"}}
    endpoints, _ = _readme_tables()
    statuses = {s.split(" ")[0].strip("*") for _, _, s in endpoints}
    assert statuses <= {"same", "extended", "tunesmith", "not"}, statuses
    listed = {(m, _shape(p)) for m, p, _ in endpoints}
    assert routes <= listed, f"routes missing from the README table: {sorted(routes - listed)}"
    for method, path, status in endpoints:
        served = (method, _shape(path)) in routes
        assert served == (not status.startswith("not")), (method, path, status)


def test_readme_field_tables_cover_the_request_models():
    from tunesmith.server.routes_chat import NEUTRAL, ChatRequest
    from tunesmith.server.routes_jobs import CreateJob

    _, fields = _readme_tables()
    create = {n for kind, n, _ in fields if kind == "job create"}
    chat = {n: s for kind, n, s in fields if kind == "chat"}
    assert set(CreateJob.model_fields) <= create, set(CreateJob.model_fields) - create
    assert set(ChatRequest.model_fields) <= set(chat), set(ChatRequest.model_fields) - set(chat)
    for name in NEUTRAL:  # what the server refuses is written down as not supported
        assert chat[name].startswith("not"), name


def test_readme_images_fields_cover_the_request_model():
    from tunesmith.server.routes_images import NEUTRAL, ImageRequest

    _, fields = _readme_tables()
    images = {n: s for kind, n, s in fields if kind == "images"}
    assert set(ImageRequest.model_fields) <= set(images), set(ImageRequest.model_fields) - set(images)
    assert all(images[name].startswith("not") for name in NEUTRAL if name in ("style", "stream", "partial_images"))
