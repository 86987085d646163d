"""Reliability: a server killed with SIGKILL mid-job, and a worker killed mid-job. No job stays `running`;
the interrupted job resumes from its newest checkpoint and finishes."""

import os
import signal
import sqlite3
from pathlib import Path

from server_helpers import Server, wait_for, wait_status


def _worker_pid(data_dir: Path, job_id: str) -> int | None:
    with sqlite3.connect(data_dir / "tunesmith.db") as db:
        return db.execute("SELECT worker_pid FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]


def _db_status(data_dir: Path, job_id: str) -> str:
    with sqlite3.connect(data_dir / "tunesmith.db") as db:
        return db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]


def _gone(pid: int) -> bool:
    """Exited (a zombie counts: it runs no code)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def _train_steps(client, job_id):
    events = list(client.fine_tuning.jobs.list_events(job_id, limit=1000))
    return [e.data["step"] for e in reversed(events) if e.type == "metrics" and "train_loss" in e.data]


def _messages(client, job_id):
    return [e.message for e in reversed(list(client.fine_tuning.jobs.list_events(job_id, limit=1000)))]


def test_killed_server_and_worker_resume_from_checkpoint(tmp_path, tiny_model_dir, tiny_data):
    data = tmp_path / "data"
    srv = Server(data, tiny_model_dir).start()
    c = srv.client
    f = c.files.create(file=open(tiny_data[0], "rb"), purpose="fine-tune")
    # 8 micro-batches per step make each step slow enough, on any machine, to kill the job in the middle.
    job = c.fine_tuning.jobs.create(model="tiny", training_file=f.id, hyperparameters={"batch_size": 4},
                                    extra_body={"tunesmith_config": {"train.max_steps": 24, "train.grad_accum": 8,
                                                                     "checkpoint.every_steps": 3, "eval.every_steps": 12,
                                                                     "eval.compare_base": False}})

    # 1. SIGKILL the server once a checkpoint exists and training went on past it.
    wait_for(lambda: c.fine_tuning.jobs.checkpoints.list(job.id).data and max(_train_steps(c, job.id)) >= 4,
             what="a checkpoint and a few steps")
    pid = _worker_pid(data, job.id)
    srv.kill()
    wait_for(lambda: _gone(pid), timeout=10, what="the worker to die with the server")
    assert _db_status(data, job.id) == "running"  # what the crash left behind

    # 2. Restart: the job is not left `running` from before; it resumes from its checkpoint.
    srv = Server(data, tiny_model_dir).start()
    c = srv.client
    assert c.fine_tuning.jobs.retrieve(job.id).status in ("queued", "running")
    resumed = wait_for(lambda: [m for m in _messages(c, job.id) if m.startswith("Training resumed at step")],
                       what="the job to resume")
    first_resume = int(resumed[0].split("step ")[1].split(":")[0])
    assert first_resume >= 3 and first_resume % 3 == 0  # a checkpoint step, not step 0

    # 3. SIGKILL the worker alone: the server notices, and the job resumes again.
    wait_for(lambda: max(_train_steps(c, job.id)) >= first_resume + 4, what="training after the resume")
    pid = _worker_pid(data, job.id)
    os.kill(pid, signal.SIGKILL)
    done = wait_status(c, job.id, "succeeded", "failed")
    assert done.status == "succeeded", done.error
    messages = _messages(c, job.id)
    assert any(m.startswith("the server stopped while the job was running; the job will resume") for m in messages)
    assert any(m.startswith("the worker process ended unexpectedly (killed by SIGKILL)") for m in messages)
    assert sum(m.startswith("Training resumed at step") for m in messages) == 2
    steps = _train_steps(c, job.id)
    assert max(steps) == 24 and set(steps) == set(range(1, 25))  # every step trained, some twice
    assert (data / "runs" / job.id / "best").is_dir()
    srv.stop()
