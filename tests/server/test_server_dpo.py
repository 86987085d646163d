"""DPO jobs through the official openai client: the method echoed resolved, preference files checked at upload
and against the job's method, and one DPO job on the tiny model run to the end."""

import json
import random
from pathlib import Path

import openai
import pytest

from server_helpers import wait_status

WORDS = ["apple", "river", "stone", "cloud", "maple", "ember", "frost", "delta", "orbit", "quill"]
# Jobs that are only created and cancelled: they must never train long if a worker picks one up.
LONG = {"tunesmith_config": {"train.max_steps": 100000, "eval.every_steps": 100000, "eval.compare_base": False}}


def _pairs(n: int, seed: int, trl: bool = False) -> bytes:
    """The tests' tiny task as preference pairs: the reversed words preferred to the words as given."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = rng.sample(WORDS, 3)
        prompt, good, bad = " ".join(words), " ".join(reversed(words)), " ".join(words)
        rec = ({"prompt": prompt, "chosen": good, "rejected": bad} if trl else
               {"input": {"messages": [{"role": "system", "content": "reverse"}, {"role": "user", "content": prompt}]},
                "preferred_output": [{"role": "assistant", "content": good}],
                "non_preferred_output": [{"role": "assistant", "content": bad}]})
        lines.append(json.dumps(rec))
    return ("\n".join(lines) + "\n").encode()


@pytest.fixture(scope="module")
def pairs_file(server):
    return server.client.files.create(file=("pairs.jsonl", _pairs(8, seed=0)), purpose="fine-tune")


@pytest.fixture(scope="module")
def sft_file(server, tiny_data):
    return server.client.files.create(file=("sft.jsonl", tiny_data[0].read_bytes()), purpose="fine-tune")


def _created_and_cancelled(client, **kwargs):
    job = client.fine_tuning.jobs.create(model="tiny", **kwargs, extra_body=LONG)
    client.fine_tuning.jobs.cancel(job.id)
    return job


# ---------------------------------------------------------------- the method, resolved


def test_dpo_job_with_auto_hyperparameters_echoes_them_resolved(server, pairs_file):
    c = server.client
    job = _created_and_cancelled(c, training_file=pairs_file.id, method={"type": "dpo"})
    assert job.method.type == "dpo" and job.method.supervised is None
    hp = job.method.dpo.hyperparameters
    assert (hp.beta, hp.learning_rate_multiplier) == (0.1, 1.0)  # the config default beta; lr as configured
    assert isinstance(hp.n_epochs, int) and isinstance(hp.batch_size, int)
    assert job.hyperparameters.n_epochs == hp.n_epochs and job.hyperparameters.batch_size == hp.batch_size
    again = c.fine_tuning.jobs.retrieve(job.id)
    assert again.method.model_dump() == job.method.model_dump()  # stored resolved, not recomputed


def test_dpo_job_with_explicit_hyperparameters(server, pairs_file):
    hyper = {"beta": 0.5, "n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5}
    job = _created_and_cancelled(server.client, training_file=pairs_file.id,
                                 method={"type": "dpo", "dpo": {"hyperparameters": hyper}})
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.model_dump() == hyper
    assert not hasattr(job.hyperparameters, "beta") or job.hyperparameters.beta is None  # OpenAI's top level has none


@pytest.mark.parametrize("beta", [0, -0.1, "high", True])
def test_dpo_beta_must_be_positive(server, pairs_file, beta):
    with pytest.raises(openai.BadRequestError) as e:
        server.client.fine_tuning.jobs.create(model="tiny", training_file=pairs_file.id,
                                              method={"type": "dpo", "dpo": {"hyperparameters": {"beta": beta}}})
    err = e.value.body
    assert (err["param"], err["code"]) == ("method.dpo.hyperparameters.beta", "invalid_value"), err
    assert "beta" in err["message"] and "> 0" in err["message"]


@pytest.mark.parametrize("method,param,code", [
    ({"type": "distillation"}, "method.type", "unsupported_method"),
    ({"type": "dpo", "supervised": {"hyperparameters": {"n_epochs": 1}}}, "method.supervised", "invalid_value"),
])
def test_unsupported_or_mismatched_method_is_400(server, pairs_file, method, param, code):
    with pytest.raises(openai.BadRequestError) as e:
        server.client.fine_tuning.jobs.create(model="tiny", training_file=pairs_file.id, method=method)
    err = e.value.body
    assert (err["param"], err["code"]) == (param, code), err


# ---------------------------------------------------------------- files: preference data, and the job's method


def test_method_formats_are_the_readers_formats():
    from tunesmith.data import FORMATS
    from tunesmith.data.preference import PAIR_OBJECTIVES, PREFERENCE_FORMATS
    from tunesmith.server.jobs import METHOD_FORMATS, METHODS

    assert set(METHOD_FORMATS["supervised"]) == set(FORMATS)
    assert set(METHOD_FORMATS["dpo"]) == set(PREFERENCE_FORMATS) - {"unpaired"} and METHODS["dpo"] in PAIR_OBJECTIVES


def test_preference_uploads_in_both_formats(server):
    c = server.client
    openai_f = c.files.create(file=("openai.jsonl", _pairs(3, seed=1)), purpose="fine-tune")
    trl_f = c.files.create(file=("trl.jsonl", _pairs(3, seed=1, trl=True)), purpose="fine-tune")
    assert openai_f.status == trl_f.status == "processed"


def test_bad_preference_line_is_400_with_file_and_line(server):
    good = {"prompt": "a b", "chosen": "b a", "rejected": "a b"}
    bad = b"\n".join(json.dumps(r).encode() for r in (good, good | {"rejected": "b a"}, {"prompt": "x", "chosen": "y"}))
    with pytest.raises(openai.BadRequestError) as e:
        server.client.files.create(file=("bad-pairs.jsonl", bad + b"\n"), purpose="fine-tune")
    err = e.value.body
    assert err["param"] == "file" and "bad-pairs.jsonl:2" in err["message"]
    assert {(i["code"], i["line"]) for i in err["issues"]} >= {("E030", 2)}
    assert 3 in {i["line"] for i in err["issues"]}  # the record with no rejected answer
    assert str(server.data_dir) not in err["message"]


def test_supervised_file_for_a_dpo_job_is_400_with_the_line(server, sft_file):
    with pytest.raises(openai.BadRequestError) as e:
        server.client.fine_tuning.jobs.create(model="tiny", training_file=sft_file.id, method={"type": "dpo"})
    err = e.value.body
    assert (err["param"], err["code"]) == ("training_file", "E026"), err
    assert sft_file.id in err["message"] and "sft.jsonl:1" in err["message"] and "preferred_output" in err["message"]
    assert err["issues"][0]["line"] == 1 and str(server.data_dir) not in err["message"]


def test_preference_file_for_a_supervised_job_is_400(server, sft_file, pairs_file):
    c = server.client
    with pytest.raises(openai.BadRequestError) as e:
        c.fine_tuning.jobs.create(model="tiny", training_file=pairs_file.id)
    err = e.value.body
    assert (err["param"], err["code"]) == ("training_file", "E026") and "pairs.jsonl:1" in err["message"], err
    with pytest.raises(openai.BadRequestError) as e:  # the validation file is checked the same way
        c.fine_tuning.jobs.create(model="tiny", training_file=pairs_file.id, validation_file=sft_file.id,
                                  method={"type": "dpo"})
    assert (e.value.body["param"], e.value.body["code"]) == ("validation_file", "E026")


# ---------------------------------------------------------------- one DPO job, end to end


def test_dpo_job_runs_to_succeeded(server, pairs_file):
    """8 pairs in batches of 4, 2 epochs = 4 steps, evaluated and checkpointed every 2 on 4 TRL-format pairs."""
    c = server.client
    valid = c.files.create(file=("valid-pairs.jsonl", _pairs(4, seed=2, trl=True)), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(
        model="tiny", training_file=pairs_file.id, validation_file=valid.id, seed=3,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 2, "batch_size": 4}}},
        extra_body={"tunesmith_config": {"eval.every_steps": 2, "checkpoint.every_steps": 2,
                                         "eval.compare_base": False}})
    job = wait_status(c, job.id, "succeeded", "failed", "cancelled")
    assert job.status == "succeeded", job.error
    assert job.method.dpo.hyperparameters.beta == 0.2 and job.trained_tokens > 0
    messages = [e.message for e in c.fine_tuning.jobs.list_events(job.id, limit=200)]
    assert not [m for m in messages if str(Path.home()) in m or str(server.data_dir) in m]  # no server paths
    metrics = [e.data for e in c.fine_tuning.jobs.list_events(job.id, limit=200) if e.type == "metrics"]
    train = [d for d in metrics if "train_loss" in d]
    evals = [d for d in metrics if "valid_loss" in d]
    assert sorted(d["step"] for d in train) == [1, 2, 3, 4] and {d["step"] for d in evals} == {2, 4}
    assert all(0.0 <= d["valid_rewards/accuracy"] <= 1.0 and d["valid_mean_token_accuracy"] is None for d in evals)
    assert all("train_rewards/margins" in d for d in train)
    newest = c.fine_tuning.jobs.checkpoints.list(job.id).data[0]
    assert newest.step_number == 4 and newest.metrics.valid_loss is not None
    assert {"train_rewards/margins", "valid_rewards/accuracy"} <= set(newest.metrics.model_dump())
    csv = c.files.content(job.result_files[0]).text
    header = csv.splitlines()[0].split(",")
    assert header[:5] == ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"]
    assert "valid_rewards/accuracy" in header  # OpenAI's columns first (train_accuracy empty: a DPO step has none)
    assert len(csv.splitlines()) == 5  # the header and steps 1-4


# ---------------------------------------------------------------- the worker's metrics for a DPO run, without one


def test_worker_metrics_take_dpo_events(tmp_path):
    """EvalEnd without perplexity or token accuracy, and `stats` on both events: metrics events, checkpoint
    metrics and the results CSV carry the objective's figures, and nothing fails on the Nones."""
    from tunesmith.events import CheckpointSaved, EvalEnd, StepEnd
    from tunesmith.server.store import Store, new_id, now
    from tunesmith.server.worker import DbSink, _results_file

    store = Store(tmp_path / "t.db")
    store.init()
    job, _ = store.create_job({"id": new_id("ftjob-"), "created_at": now(), "model": "tiny", "training_file": "f",
                               "hyperparameters": {}, "method": {"type": "dpo"}, "seed": 1, "overrides": [],
                               "status": "running"})
    sink = DbSink(store, job["id"], tmp_path)
    stats = {"rewards/chosen": 0.2, "rewards/rejected": -0.1, "rewards/margins": 0.3, "rewards/accuracy": 0.75,
             "logps/chosen": -5.0, "logps/rejected": -6.0, "sft_loss": 2.5}
    sink(StepEnd(step=1, total_steps=2, epoch=0.5, loss=0.69, lr=1e-3, grad_norm=1.0, tokens=10, tokens_per_s=5.0,
                 elapsed_s=2.0, stats=stats))
    sink(EvalEnd(step=1, epoch=0.5, val_loss=0.6, perplexity=None, token_accuracy=None, val_tokens=4, is_best=True,
                 stats=stats | {"rewards/accuracy": 1.0}))
    sink(CheckpointSaved(step=1, path=str(tmp_path / "ckpt")))
    train, valid = (e["data"] for e in store.metric_events(job["id"]))
    assert train["train_loss"] == 0.69 and train["train_rewards/margins"] == 0.3 and train["train_sft_loss"] == 2.5
    assert valid["valid_loss"] == 0.6 and valid["valid_mean_token_accuracy"] is None and valid["perplexity"] is None
    assert valid["valid_rewards/accuracy"] == 1.0
    events = store.list_events(job["id"], after=None, limit=10)[0]
    assert any("reward accuracy=1.0000" in e["message"] for e in events)
    ckpt = store.list_checkpoints(job["id"])[0]["metrics"]
    assert ckpt["train_loss"] == 0.69 and ckpt["valid_loss"] == 0.6 and ckpt["valid_rewards/accuracy"] == 1.0
    assert "valid_mean_token_accuracy" not in ckpt  # unknown for dpo: left out rather than null
    file_id = _results_file(store, job["id"], tmp_path, store.metric_events(job["id"]))
    csv = (tmp_path / "files" / store.get_file(file_id)["stored_name"]).read_text().splitlines()
    header = csv[0].split(",")
    assert header[:6] == ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy",
                          "learning_rate"]
    assert csv[1].split(",")[header.index("valid_rewards/accuracy")] == "1.0"
