"""The server's parts without HTTP: store pagination and idempotency, recovery policy, override mapping, auth."""

import pytest

from tunesmith.config import ConfigError
from tunesmith.server import jobs as J
from tunesmith.server.auth import Token, TokenAuth
from tunesmith.server.settings import Settings, read_tokens
from tunesmith.server.store import IdempotencyConflict, Store, new_id, now
from tunesmith.server.supervisor import Supervisor


def _job_row(status="queued", attempts=0, **kw):
    return {"id": new_id("ftjob-"), "created_at": now(), "model": "tiny", "training_file": "file-x",
            "hyperparameters": {}, "method": {}, "seed": 1, "overrides": [], "status": status, "attempts": attempts} | kw


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "t.db")
    s.init()
    return s


def test_cursor_pages_newest_first(store):
    ids = [store.create_job(_job_row())[0]["id"] for _ in range(5)]
    page, more = store.list_jobs(after=None, limit=2)
    assert [j["id"] for j in page] == ids[::-1][:2] and more
    page, more = store.list_jobs(after=page[-1]["id"], limit=10)
    assert [j["id"] for j in page] == ids[::-1][2:] and not more


def test_idempotency_same_key_same_job_other_body_conflicts(store):
    a, created_a = store.create_job(_job_row(), idem=("tok", "k1", "hash1"))
    b, created_b = store.create_job(_job_row(), idem=("tok", "k1", "hash1"))
    assert a["id"] == b["id"] and created_a and not created_b
    c, _ = store.create_job(_job_row(), idem=("other-token", "k1", "hash1"))  # keys are per token
    assert c["id"] != a["id"]
    with pytest.raises(IdempotencyConflict):
        store.create_job(_job_row(), idem=("tok", "k1", "hash2"))
    assert len(store.list_jobs(after=None, limit=100)[0]) == 2


def test_compare_and_set_claims(store):
    job, _ = store.create_job(_job_row("queued"))
    assert store.claim(job["id"], "queued", "running")
    assert not store.claim(job["id"], "queued", "running")  # someone else already moved it
    assert store.job_status(job["id"]) == "running"


@pytest.mark.parametrize("policy,attempts,expected,code", [
    ("resume", 1, "queued", None),
    ("resume", 3, "failed", "job_interrupted"),  # max_attempts 3 reached
    ("fail", 1, "failed", "job_interrupted"),
])
def test_recovery_leaves_no_job_running(tmp_path, store, policy, attempts, expected, code):
    settings = Settings(data_dir=tmp_path, tokens=["t"], on_interrupt=policy, max_attempts=3)
    running, _ = store.create_job(_job_row("running", attempts=attempts, worker_pid=None))
    done, _ = store.create_job(_job_row("succeeded"))
    Supervisor(settings, store).recover()
    job = store.get_job(running["id"])
    assert job["status"] == expected and store.get_job(done["id"])["status"] == "succeeded"
    assert (job["error"] or {}).get("code") == code
    last = store.list_events(running["id"], after=None, limit=1)[0][0]["message"]
    assert last.startswith("the server stopped while the job was running") or "Job failed" in last


def test_client_overrides_are_limited_to_safe_keys():
    assert J.check_client_overrides({"train.max_steps": 5, "method.lora.r": 4, "eval.samples": 0}) == [
        "train.max_steps=5", "method.lora.r=4", "eval.samples=0"]
    for key in ("data.train", "model.name", "model.trust_remote_code", "output_dir", "eval.metrics",
                "eval.mlflow_tracking_uri", "safety.moderation_endpoint", "train.augment.paraphrase_model",
                "train.augment", "train"):
        with pytest.raises(J.JobRequestError):
            J.check_client_overrides({key: "x"})


def test_image_jobs_may_set_the_denoise_fields_and_nothing_else_of_the_objective():
    assert J.check_client_overrides({"objective.denoise.validation_prompts": ["a red cross"],
                                     "objective.denoise.inference_steps": 4}) == [
        'objective.denoise.validation_prompts=["a red cross"]', "objective.denoise.inference_steps=4"]
    for key in ("objective.denoise", "objective.name", "objective.denoise.not_a_field", "objective"):
        with pytest.raises(J.JobRequestError):
            J.check_client_overrides({key: "x"})


def test_an_image_job_trains_denoise_on_the_unpacked_folder(tmp_path):
    overrides = J.build_overrides(base_ref="shapes-t2i-32", training_path=tmp_path / "file-a.images",
                                  validation_path=None, run_dir=tmp_path / "run", seed=1, server_defaults=[],
                                  client=[], hyper={"n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 0.5},
                                  objective="denoise")
    cfg = J.config_from(overrides)
    assert (cfg.objective.name, cfg.data.train, cfg.train.batch_size) == ("denoise", str(tmp_path / "file-a.images"), 8)
    assert cfg.train.lr == J.config_from([]).train.lr * 0.5


def test_overrides_map_the_openai_hyperparameters(tmp_path):
    hyper = J.resolve_hyperparameters({"n_epochs": 9}, {"type": "supervised", "supervised": {
        "hyperparameters": {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5}}})
    assert hyper == {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5}  # method wins
    overrides = J.build_overrides(base_ref=str(tmp_path), training_path=tmp_path / "t.jsonl", validation_path=None,
                                  run_dir=tmp_path / "run", hyper=hyper, seed=5, server_defaults=["train.lr=1e-3"],
                                  client=["train.max_steps=3"])
    cfg = J.config_from(overrides)
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.seed, cfg.train.max_steps) == (2, 4, 5, 3)
    assert cfg.train.lr == pytest.approx(5e-4) and cfg.model.name == str(tmp_path) and cfg.data.valid is None
    assert J.resolved_hyperparameters(cfg, hyper) == {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5}
    auto = J.resolve_hyperparameters(None, None)
    cfg = J.config_from(J.build_overrides(base_ref=str(tmp_path), training_path=tmp_path / "t.jsonl", validation_path=None,
                                          run_dir=tmp_path / "r", hyper=auto, seed=1, server_defaults=[], client=[]))
    assert cfg.train.lr == 2e-4 and J.resolved_hyperparameters(cfg, auto)["learning_rate_multiplier"] == 1.0
    with pytest.raises(J.JobRequestError):
        J.resolve_hyperparameters(None, {"type": "reinforcement"})


def test_server_defaults_cannot_move_server_owned_fields():
    assert J.check_server_overrides(["method.name=full"]) == ["method.name=full"]
    for item in ("data.train=x.jsonl", "output_dir=/tmp/x", "model.name=other"):
        with pytest.raises(ConfigError):
            J.check_server_overrides([item])
    with pytest.raises(ConfigError):
        J.check_server_overrides(["train.lrr=1"])  # a typo stops the server start


def test_token_check_and_generated_token(tmp_path, monkeypatch):
    auth = TokenAuth(None, [Token("alpha-token", "a"), Token("beta-token", "b", admin=True)], b"")
    assert auth.check("beta-token").admin and auth.check("alpha-token").project == "a"
    assert auth.check("alpha-token") != auth.check("beta-token")
    assert auth.check("gamma") is None and auth.check("") is None and auth.check(None) is None
    monkeypatch.delenv("TUNESMITH_API_TOKENS", raising=False)
    tokens, source = read_tokens(None, tmp_path)
    assert len(tokens) == 1 and len(tokens[0].token) >= 32 and tokens[0].project == "default" and "generated" in source
    assert (tmp_path / "api-tokens").stat().st_mode & 0o777 == 0o600
    assert read_tokens(None, tmp_path)[0] == tokens  # kept across restarts
    monkeypatch.setenv("TUNESMITH_API_TOKENS", "a1, b2")
    assert read_tokens(None, tmp_path)[0] == [Token("a1"), Token("b2")]


def test_fine_tuned_model_name():
    assert J.fine_tuned_name("tiny", "rev", "ftjob-abc") == "ft:tiny:rev:ftjob-abc"
    assert J.fine_tuned_name("tiny", None, "ftjob-abc") == "ft:tiny::ftjob-abc"


def test_recovery_kills_a_leftover_worker_of_this_data_dir_and_no_other_process(tmp_path):
    """A worker's job id arrives on stdin, so it is recognised by module and data dir on its command line."""
    import subprocess
    import sys
    import time

    from tunesmith.server.supervisor import _kill_stale_worker

    def fake_worker(data_dir):  # the command line of a real worker, sleeping instead of training
        return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-m", "tunesmith.server.worker",
                                 "--data-dir", str(data_dir)])

    ours, other, unrelated = fake_worker(tmp_path), fake_worker(tmp_path / "elsewhere"), \
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.2)
        for proc in (ours, other, unrelated):
            _kill_stale_worker(proc.pid, tmp_path)
        assert ours.wait(timeout=10) == -9
        time.sleep(0.2)
        assert other.poll() is None and unrelated.poll() is None
    finally:
        for proc in (ours, other, unrelated):
            proc.kill()
            proc.wait()


def test_claim_next_takes_queued_then_lapsed_leases_within_max_attempts(store):
    """The claim workers on every machine make (here on SQLite; PostgreSQL adds SKIP LOCKED): the oldest queued job,
    then a running job whose lease lapsed (resumed: attempts + 1), or failed once its starts are used up."""
    import time

    queued, _ = store.create_job(_job_row("queued"))
    lapsed, _ = store.create_job(_job_row("running", attempts=1, worker_id="w-dead", lease_expires_at=time.time() - 5))
    spent, _ = store.create_job(_job_row("running", attempts=3, worker_id="w-dead", lease_expires_at=time.time() - 5))
    held, _ = store.create_job(_job_row("running", attempts=1, worker_id="w-alive", lease_expires_at=time.time() + 60))
    got = store.claim_next("w1", 30, max_attempts=3)
    assert got["id"] == queued["id"] and got["worker_id"] == "w1" and got["attempts"] == 1
    got = store.claim_next("w2", 30, max_attempts=3)
    assert got["id"] == lapsed["id"] and got["attempts"] == 2 and got["worker_id"] == "w2"
    assert "stopped renewing its lease" in store.list_events(lapsed["id"], after=None, limit=1)[0][0]["message"]
    assert store.claim_next("w3", 30, max_attempts=3) is None  # the spent one failed, the held one is not free
    failed = store.get_job(spent["id"])
    assert failed["status"] == "failed" and failed["error"]["code"] == "job_interrupted"
    assert store.get_job(held["id"])["worker_id"] == "w-alive"
    assert store.renew_leases("w2", [lapsed["id"], held["id"]], 30) == {lapsed["id"]}  # only its own
