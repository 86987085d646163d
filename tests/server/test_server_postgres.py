"""Workers on several machines: a real PostgreSQL server (a throwaway cluster made with initdb/pg_ctl in a temporary
folder on a free port), an API server with no workers of its own, and `tunesmith worker` processes, each in its own
working directory, sharing the data folder. A worker killed with SIGKILL mid-job: another takes the job over when
the lease lapses and finishes it from the checkpoint, every step logged once. A worker sent SIGTERM gives its job
back with a checkpoint. 100 jobs queued by 10 clients at once:
each run exactly once."""

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from server_helpers import Server, free_port, wait_for, wait_status

psycopg = pytest.importorskip("psycopg", reason="psycopg (the PostgreSQL driver) is not installed: make setup")


def _pg_tool(name: str) -> str | None:
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found if isinstance(found, str) else (found[-1] if found else None)


INITDB, PG_CTL = _pg_tool("initdb"), _pg_tool("pg_ctl")
if not (INITDB and PG_CTL):
    pytest.skip("PostgreSQL's initdb and pg_ctl are not installed (make setup installs Debian's postgresql as root)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def pg_cluster():
    """A PostgreSQL cluster of its own, trust auth on 127.0.0.1 only, removed afterwards. initdb refuses to run as
    root: as root, the cluster is run by Debian's postgres user in a folder it owns (under /tmp, which it can reach)."""
    as_user = []
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL as another user")
        as_user = ["runuser", "-u", "postgres", "--"]
    base = Path(tempfile.mkdtemp(prefix="tunesmith-pg-"))
    if as_user:
        shutil.chown(base, "postgres")
    cluster, port = base / "cluster", free_port()
    subprocess.run(as_user + [INITDB, "-D", str(cluster), "-U", "tunesmith", "--auth=trust", "-E", "UTF8", "--no-sync"],
                   check=True, capture_output=True)
    opts = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
    subprocess.run(as_user + [PG_CTL, "-D", str(cluster), "-o", opts, "-l", str(base / "log"), "-w", "start"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql://tunesmith@127.0.0.1:{port}"
    finally:
        subprocess.run(as_user + [PG_CTL, "-D", str(cluster), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def _database(cluster_url: str, name: str) -> str:
    with psycopg.connect(cluster_url + "/postgres", autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")
    return f"{cluster_url}/{name}"


class Workers:
    """`tunesmith worker` processes, each started in a working directory of its own."""

    def __init__(self, tmp: Path, url: str, data_dir: Path, model_dir: Path):
        self.tmp, self.url, self.data_dir, self.model_dir = tmp, url, data_dir, model_dir
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, *extra: str) -> subprocess.Popen:
        cwd = self.tmp / name
        cwd.mkdir(exist_ok=True)
        cmd = [sys.executable, "-m", "tunesmith.cli", "worker", "--store", self.url, "--data-dir", str(self.data_dir),
               "--name", name, "--model", f"tiny={self.model_dir}", "--worker-threads", "1", "--poll-seconds", "0.2",
               *extra]
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        log = open(cwd / "worker.log", "ab")
        self.procs[name] = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env)
        return self.procs[name]

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture
def cluster(pg_cluster, tmp_path, tiny_model_dir, request):
    """A database of this test's own, an API server (no workers of its own) on it, and a Workers launcher."""
    url = _database(pg_cluster, request.node.name.replace("test_", "t_")[:40].lower())
    data = tmp_path / "shared"
    api = Server(data, tiny_model_dir, "--store", url, workers=0).start()
    workers = Workers(tmp_path, url, data, tiny_model_dir)
    yield url, api, workers
    workers.stop()
    api.stop()


def _holder(url: str, job_id: str) -> str | None:
    with psycopg.connect(url) as c:
        return c.execute("SELECT worker_id FROM jobs WHERE id = %s", (job_id,)).fetchone()[0]


def _events(client, job_id):
    return list(reversed(list(client.fine_tuning.jobs.list_events(job_id, limit=1000))))


def test_a_killed_workers_job_is_finished_by_another_from_its_checkpoint(cluster, tiny_data):
    url, api, workers = cluster
    for name in ("w1", "w2"):
        workers.start(name, "--lease-seconds", "3")
    c = api.client
    f = c.files.create(file=open(tiny_data[0], "rb"), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(model="tiny", training_file=f.id, hyperparameters={"batch_size": 4},
                                    extra_body={"tunesmith_config": {"train.max_steps": 12, "train.grad_accum": 8,
                                                                     "checkpoint.every_steps": 3, "eval.every_steps": 6,
                                                                     "eval.compare_base": False}})

    def steps():
        return [e.data["step"] for e in _events(c, job.id) if e.type == "metrics" and "train_loss" in e.data]

    wait_for(lambda: c.fine_tuning.jobs.checkpoints.list(job.id).data and max(steps()) >= 5, timeout=180,
             what="a checkpoint and steps after it")
    first = _holder(url, job.id)
    assert first in ("w1", "w2")
    workers.procs[first].send_signal(signal.SIGKILL)  # the machine dies: its job's child dies with it
    workers.procs[first].wait()
    done = wait_status(c, job.id, "succeeded", "failed", timeout=240)
    assert done.status == "succeeded", done.error
    events = _events(c, job.id)
    messages = [e.message for e in events]
    assert any(m.startswith(f"the worker {first} stopped renewing its lease") for m in messages)
    resumed = [m for m in messages if m.startswith("Training resumed at step")]
    # from the newest checkpoint the dead worker had saved: step 3 or 6 when the kill lands soon after the wait, 9 when
    # the tiny job outruns it (an idle machine trains a step in milliseconds)
    assert len(resumed) == 1 and int(resumed[0].split("step ")[1].split(":")[0]) in (3, 6, 9)
    assert steps() == list(range(1, 13))  # every step logged once, in order
    assert sum(m.startswith("Fine-tuning job started") for m in messages) == 2
    ckpts = c.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [k.step_number for k in ckpts] == [12, 9]  # one row per step, the re-saved ones replaced
    reply = c.chat.completions.create(model=done.fine_tuned_model, messages=[{"role": "user", "content": "hi"}],
                                      max_tokens=2)
    assert reply.choices[0].message.content is not None


def test_a_signalled_worker_gives_its_job_back_with_a_checkpoint(cluster, tiny_data):
    url, api, workers = cluster
    w1 = workers.start("w1")
    c = api.client
    f = c.files.create(file=open(tiny_data[0], "rb"), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(model="tiny", training_file=f.id, hyperparameters={"batch_size": 4},
                                    extra_body={"tunesmith_config": {"train.max_steps": 6, "train.grad_accum": 8,
                                                                     "checkpoint.every_steps": 100,
                                                                     "eval.compare_base": False}})
    wait_for(lambda: any(e.type == "metrics" for e in _events(c, job.id)), timeout=180, what="a training step")
    w1.send_signal(signal.SIGTERM)
    assert w1.wait(60) == 0
    back = c.fine_tuning.jobs.retrieve(job.id)
    assert back.status == "queued" and _holder(url, job.id) is None
    gave = [e.message for e in _events(c, job.id) if e.message.startswith("The worker is stopping")]
    assert len(gave) == 1 and "with a checkpoint" in gave[0]
    workers.start("w2")
    done = wait_status(c, job.id, "succeeded", "failed", timeout=180)
    assert done.status == "succeeded", done.error
    assert any(e.message.startswith("Training resumed at step") for e in _events(c, job.id))


def test_100_jobs_from_10_clients_each_run_exactly_once(cluster, tiny_data):
    url, api, workers = cluster
    for name in ("w1", "w2"):
        workers.start(name)
    f = api.client.files.create(file=open(tiny_data[1], "rb"), purpose="fine-tune")
    tiny_job = {"tunesmith_config": {"train.max_steps": 1, "eval.compare_base": False, "data.valid_fraction": 0,
                                     "eval.samples": 0}}
    created, errors = [], []

    def client(n):
        c = api.client
        try:
            for i in range(10):
                created.append(c.fine_tuning.jobs.create(model="tiny", training_file=f.id, suffix=f"c{n}-{i}",
                                                         extra_body=tiny_job).id)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(created)) == 100
    c = api.client
    wait_for(lambda: all(j.status in ("succeeded", "failed") for j in c.fine_tuning.jobs.list(limit=100))
             and len(list(c.fine_tuning.jobs.list(limit=100))) == 100, timeout=600, interval=2,
             what="every job to finish")
    with psycopg.connect(url) as db:
        rows = db.execute("SELECT status, attempts FROM jobs").fetchall()
        starts = dict(db.execute("SELECT job_id, COUNT(*) FROM events WHERE message LIKE 'Fine-tuning job started%%' "
                                 "GROUP BY job_id").fetchall())
        steps = db.execute("SELECT COUNT(*) FROM events WHERE type = 'metrics' AND data LIKE '%%train_loss%%'"
                           ).fetchone()[0]
    assert len(rows) == 100 and {r for r in rows} == {("succeeded", 1)}
    assert sorted(starts) == sorted(created) and set(starts.values()) == {1}
    assert steps == 100
    by_worker = {}
    for job_id in created[:20]:
        for e in _events(c, job_id):
            if e.message.startswith("Fine-tuning job started"):
                by_worker[job_id] = e.message
    assert len(by_worker) == 20
