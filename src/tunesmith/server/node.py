"""``tunesmith worker``: a process on any machine that trains the jobs API servers queue in a shared store.

    tunesmith worker --store postgresql://USER@HOST/DB --data-dir /mnt/shared/tunesmith-data [--model tiny=./tiny]

    loop: reap children ─► renew leases ─► claim (SELECT ... FOR UPDATE SKIP LOCKED) ─► fork a child per job
                                                                                  └─ worker.run_job(...)

- A claim takes the oldest queued job, or a running one whose worker's lease lapsed (its machine or process died):
  that one resumes from its newest checkpoint in the shared run folder, at most ``--max-attempts`` starts
  (Store.claim_next). Workers on many machines never take the same job and never wait on each other.
- The lease is renewed every ``--lease-seconds``/3 while the job trains. If the worker is killed (even kill -9) its
  children die with it (PR_SET_PDEATHSIG) and the lease lapses: another worker takes the job over.
- SIGTERM or Ctrl-C gives the jobs up: each child checkpoints at its next step boundary and puts its job back in
  the queue; then the worker exits. A second signal kills the children at once (their jobs' leases then lapse).
- Each job runs in a child forked from this process after torch and the training code are imported, so a job
  starts at once, with fresh memory of its own, and a crash in it does not stop the worker.

The data folder must be the one the API servers use, shared (NFS, CephFS, ...): files/ and runs/ are read and
written by every machine (README: "Workers on several machines" says what it must guarantee).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
import traceback
from pathlib import Path

log = logging.getLogger("tunesmith.worker")

WORKER_EXAMPLES = """examples:
  tunesmith worker --store postgresql://tunesmith@db.internal/tunesmith --data-dir /mnt/shared/tunesmith-data
  tunesmith worker --store postgresql://... --data-dir /mnt/shared/data --model tiny=/models/tiny --jobs 2
"""


def add_parser(sub) -> None:
    import argparse

    s = sub.add_parser("worker", help="train queued jobs of a shared job store (workers on several machines)",
                       epilog=WORKER_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Claims queued fine-tuning jobs from the store API servers use (tunesmith serve "
                       "--store ...), trains them with the shared data folder, renews a lease on each while it trains, "
                       "and gives them back on SIGTERM or Ctrl-C. A job whose worker died is resumed by another.")
    s.add_argument("--store", required=True, help="postgresql://USER[:PASSWORD]@HOST[:PORT]/DB (or a SQLite file on "
                   "this machine)")
    s.add_argument("--data-dir", required=True, help="the shared data folder of the API servers (files/, runs/)")
    s.add_argument("--model", dest="models", action="append", default=[], metavar="NAME=PATH",
                   help="where a base model the servers offer as NAME is on this machine (default: the path the "
                   "server registered)")
    s.add_argument("--jobs", type=int, default=1, help="jobs trained at the same time (default 1)")
    s.add_argument("--lease-seconds", type=float, default=60.0, help="a job whose lease is not renewed for this long "
                   "is taken over by another worker (renewed every third of it)")
    s.add_argument("--max-attempts", type=int, default=3,
                   help="starts of one job (first run + resumes) before it fails")
    s.add_argument("--on-interrupt", choices=["resume", "fail"], default="resume",
                   help="a job whose worker died: resume it from its newest checkpoint, or fail it")
    s.add_argument("--poll-seconds", type=float, default=1.0, help="how often an idle worker looks for a job")
    s.add_argument("--worker-threads", type=int, help="torch threads per job (default: torch's choice)")
    s.add_argument("--name", help="this worker's name in jobs' worker_id (default worker@HOST:PID)")


def run(args) -> int:
    from ..config import ConfigError

    if args.jobs < 1 or args.lease_seconds <= 0 or args.max_attempts < 1:
        raise ConfigError("--jobs and --max-attempts must be at least 1, --lease-seconds above 0")
    models = {}
    for item in args.models:
        name, sep, path = item.partition("=")
        if not sep or not Path(path).expanduser().exists():
            raise ConfigError(f"--model {item!r}: expected NAME=PATH with an existing PATH")
        models[name] = str(Path(path).expanduser().resolve())
    data_dir = Path(args.data_dir).expanduser().resolve()
    if not (data_dir / "files").is_dir():
        raise ConfigError(f"--data-dir {data_dir}: no files/ folder: give the data folder the API servers use")
    return Worker(args.store, data_dir, models, args).serve()


class Worker:
    def __init__(self, store_url: str, data_dir: Path, models: dict[str, str], args):
        from .store import open_store

        self.url, self.data_dir, self.models, self.args = store_url, data_dir, models, args
        self.store = open_store(store_url)
        self.name = args.name or f"worker@{socket.gethostname()}:{os.getpid()}"
        self.children: dict[str, int] = {}  # job id -> child pid
        self.stopping = 0  # signals received
        self._renewed = 0.0

    def serve(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        if self.args.worker_threads:
            os.environ["TUNESMITH_WORKER_THREADS"] = str(self.args.worker_threads)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import torch  # noqa: F401  (imported once here: every forked job starts with it loaded)

        _warm_imports()

        if self.args.worker_threads:
            torch.set_num_threads(self.args.worker_threads)
        self.store.init()
        print(f"tunesmith worker {self.name}: store {self.store.describe()}, data {self.data_dir}, "
              f"{self.args.jobs} job(s) at a time, lease {self.args.lease_seconds:.0f} s", file=sys.stderr, flush=True)
        while not (self.stopping and not self.children):
            self._reap()
            self._renew()
            while not self.stopping and len(self.children) < self.args.jobs:
                job = self.store.claim_next(self.name, self.args.lease_seconds, max_attempts=self.args.max_attempts,
                                            on_interrupt=self.args.on_interrupt, pid=None)
                if job is None:
                    break
                self._fork(job)
            time.sleep(0.1 if self.stopping else self.args.poll_seconds)
        return 0

    def _on_signal(self, signum, frame) -> None:
        """First signal: the children checkpoint and give their jobs back. Second: they are killed now."""
        self.stopping += 1
        for pid in self.children.values():
            try:
                os.kill(pid, signal.SIGTERM if self.stopping == 1 else signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _renew(self) -> None:
        if not self.children or time.monotonic() - self._renewed < self.args.lease_seconds / 3:
            return
        self._renewed = time.monotonic()
        held = self.store.renew_leases(self.name, list(self.children), self.args.lease_seconds)
        for job_id in set(self.children) - held:
            log.info("job %s is no longer held by this worker (cancelled, paused or taken over)", job_id)

    def _reap(self) -> None:
        for job_id, pid in list(self.children.items()):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done == 0:
                continue
            del self.children[job_id]
            job = self.store.get_job(job_id)
            if job is not None and job["status"] == "running" and job["worker_id"] == self.name:
                self._interrupted(job, f"the job's process on {self.name} ended unexpectedly ({_describe(status)})")

    def _interrupted(self, job: dict, reason: str) -> None:
        from .store import now

        attempts, limit = job["attempts"], self.args.max_attempts
        if self.args.on_interrupt == "resume" and attempts < limit:
            resume = f"{reason}; the job will resume from its newest checkpoint"
            self.store.update_job(job["id"], when=("running",), holder=self.name, status="queued", worker_id=None,
                                  worker_pid=None, lease_expires_at=None, event=("warn", "message", resume))
            return
        why = reason if self.args.on_interrupt == "fail" else f"{reason}, after {attempts} starts (limit {limit})"
        self.store.update_job(job["id"], when=("running",), holder=self.name, status="failed", finished_at=now(),
                              worker_id=None, worker_pid=None,
                              error={"code": "job_interrupted", "message": why, "param": None},
                              event=("error", "message", f"Job failed: {why}"))

    def _fork(self, job: dict) -> None:
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the child: train the job, then leave without running the parent's cleanup
            rc = 1
            try:
                rc = self._child(job["id"], parent)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(rc)
        self.children[job["id"]] = pid
        self.store.update_job(job["id"], holder=self.name, worker_pid=pid)

    def _child(self, job_id: str, parent: int) -> int:
        from .worker import _die_with_parent, _log_to, _Stop, run_job

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the worker, which asks the children (SIGTERM)
        _die_with_parent(parent)
        stop = _Stop()  # SIGTERM: checkpoint at the next step boundary and give the job back
        self.store.forget_connections()
        _log_to(self.data_dir / "logs" / f"{job_id}.log")
        return run_job(self.store, self.data_dir, job_id, self.args.on_interrupt, stop, holder=self.name,
                       models=self.models)


def _warm_imports() -> None:
    """What a job imports on its way (training, the metrics' libraries, the report's plotting): about half of a tiny
    job's time when each child paid for it; imported once here, every forked child has it."""
    from .. import train  # noqa: F401
    from ..config import EvalConfig
    from ..report import html, plots  # noqa: F401
    from ..train.monitor import check_metrics

    check_metrics(EvalConfig().metrics)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            return f"killed by {signal.Signals(sig).name}"
        except ValueError:
            return f"killed by signal {sig}"
    return f"exit code {os.WEXITSTATUS(status)}"
