"""The job queue's engine, a thread in the server process: validate, launch, watch, recover.

Every tick it
  1. reaps worker processes that ended; a job its worker left `running` was interrupted (crash, OOM kill);
  2. moves `validating_files` jobs to `queued` once their files read cleanly again (or fails them); the reading
     runs in a small thread pool, as a reinforcement job's check runs its grader (a python grader in its sandbox,
     which may take its time limit), and the queue must not wait for it;
  3. kills the worker of a cancelled job that did not stop within the grace period;
  4. hands the oldest `queued` job to a waiting worker while fewer than ``workers`` jobs run;
  5. keeps a waiting ("warm") worker for every free slot (one spare when all are busy): a worker imports
     torch before it is given a job id on its standard input, so a job starts without that delay; each
     worker runs one job and exits.

An interrupted job is put back in the queue and resumes from its newest checkpoint, or is failed with
the reason, as ``--on-interrupt`` says; a job is started at most ``max_attempts`` times. At start-up
``recover()`` applies the same rule to jobs a previous server left `running`, so none stays `running`.
Worker processes are started from this thread only: Linux ties PR_SET_PDEATHSIG to the creating thread.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from .settings import Settings
from .store import Store, now

log = logging.getLogger("tunesmith.server")
SWEEP_EVERY_S = 600.0


class Supervisor:
    def __init__(self, settings: Settings, store: Store):
        self.s, self.store = settings, store
        self.procs: dict[str, subprocess.Popen] = {}  # job id -> its worker
        self.idle: list[subprocess.Popen] = []  # warm workers waiting for a job id
        self._log = None
        self._cancel_seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._checks: dict[str, Future] = {}  # job id -> its files' check, running in _pool
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tunesmith-validate")
        self._thread: threading.Thread | None = None
        self.shutdown_grace_s = 20.0
        self._swept = time.monotonic()
        self._renewed = 0.0
        self._renewed = 0.0

    # ------------------------------------------------------------ lifecycle

    def recover(self) -> None:
        """No job this server ran stays `running` after it stopped: resume it or fail it, by configuration. Jobs held
        by other workers (`tunesmith worker` on other machines, another server) are theirs while their leases hold;
        a lapsed lease frees a job for the next claim (Store.claim_next)."""
        for job in self.store.jobs_with_status("running"):
            if job["worker_id"] not in (None, self.s.node):
                continue
            _kill_stale_worker(job["worker_pid"], self.s.data_dir)
            self.interrupted(job, "the server stopped while the job was running")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tunesmith-supervisor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.shutdown_grace_s + 10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # one bad tick must not stop the queue
                log.exception("supervisor tick failed")
            self._stop.wait(self.s.poll_s)
        self._shutdown_workers()

    def _renew(self) -> None:
        """Extend the leases on the jobs our workers run, a few times per lease."""
        if time.monotonic() - self._renewed < self.s.lease_s / 4:
            return
        self._renewed = time.monotonic()
        self.store.renew_leases(self.s.node, list(self.procs), self.s.lease_s)

    def tick(self) -> None:
        if time.monotonic() - self._swept > SWEEP_EVERY_S:  # files an interrupted upload left (also done at start)
            from .routes_files import sweep_orphans

            self._swept = time.monotonic()
            sweep_orphans(self.s, self.store)
        self._reap()
        self._renew()
        self._validate()
        self._enforce_cancel()
        self._launch()
        self._warm()

    # ------------------------------------------------------------ the steps of a tick

    def _reap(self) -> None:
        self.idle = [p for p in self.idle if p.poll() is None]
        for job_id, proc in list(self.procs.items()):
            rc = proc.poll()
            if rc is None:
                continue
            self._forget(job_id)
            job = self.store.get_job(job_id)
            if job is not None and job["status"] == "running":  # the worker did not record an outcome
                self.interrupted(job, f"the worker process ended unexpectedly ({_describe_exit(rc)})")
            elif job is not None and job["status"] == "paused" and job["worker_pid"] is not None:
                # paused, and its worker died before it said so: the job can be resumed now
                self.store.update_job(job_id, when=("paused",), worker_pid=None, worker_id=None, lease_expires_at=None)

    def _validate(self) -> None:
        waiting = self.store.jobs_with_status("validating_files")
        for job in waiting:
            check = self._checks.get(job["id"])
            if check is None:
                self._checks[job["id"]] = self._pool.submit(self._check_job, job)
                continue
            if not check.done():
                continue
            del self._checks[job["id"]]
            try:
                problem, notes = check.result()
            except Exception as e:  # a job must not wait in validating_files for a check that keeps failing
                log.exception("checking the files of job %s failed", job["id"])
                problem, notes = ("validation_error", f"the files could not be checked ({type(e).__name__}: {e})",
                                  None), []
            for level, text in notes:
                self.store.add_event(job["id"], level, "message", text)
            if problem is None:
                self.store.claim(job["id"], "validating_files", "queued",
                                 event=("info", "message", "Files validated, moving job to queued state"))
                continue
            code, message, param = problem
            self.store.update_job(job["id"], when=("validating_files",), status="failed", finished_at=now(),
                                  error={"code": code, "message": message, "param": param},
                                  event=("error", "message", f"Job failed: {message}"))
        for job_id in set(self._checks) - {j["id"] for j in waiting}:  # cancelled while checked
            if self._checks[job_id].done():
                del self._checks[job_id]

    def _check_job(self, job: dict) -> tuple[tuple[str, str, str] | None, list[tuple[str, str]]]:
        """(problem or None, events to add): the files as at upload; a reinforcement job's grader against them."""
        problem = self._file_problem(job)
        if problem is not None or (job["method"] or {}).get("type") != "reinforcement":
            return problem, []
        return self._grader_problem(job)

    def _file_problem(self, job: dict) -> tuple[str, str, str] | None:
        from ..data import DataError
        from .image_files import FORMAT as IMAGES
        from .image_files import folder_for
        from .routes_files import validate_file

        for param in ("training_file", "validation_file"):
            file_id = job[param]
            if not file_id:
                continue
            path = self._path(file_id)
            if path is None or not path.is_file():
                return "file_not_found", f"{param} {file_id} no longer exists", param
            if self.store.get_file(file_id)["format"] == IMAGES:  # captioned images: their unpacked folder, as read
                folder = folder_for(path)
                if not folder.is_dir():
                    return "file_not_found", f"{param} {file_id}: its unpacked images no longer exist", param
                from ..data.images import read_image_rows

                # now the model is known: images smaller than its resolution are refused too (E040)
                issues = [_in_folder(i, folder, file_id) for i in read_image_rows(folder, resolution=_resolution(job))[2]]
            else:
                issues = validate_file(path)[2]  # SFT records, preference pairs or prompts, read as at upload
            if issues:
                err = DataError([i if i.path and i.path.startswith(file_id + "/") else _rename(i, file_id)
                                 for i in issues])
                return issues[0].code, str(err), param
        return None

    def _grader_problem(self, job: dict) -> tuple[tuple[str, str, str] | None, list[tuple[str, str]]]:
        """Every {{item.FIELD}} the grader reads present in every row; then the grader run on the first training
        rows with an empty answer (reinforcement.probe), reported as an event."""
        from ..data import DataError
        from . import reinforcement as R

        spec = job["method"]["grader"]
        for param in ("training_file", "validation_file"):
            if job[param]:
                issues = R.item_issues(spec, self._path(job[param]), job[param])
                if issues:
                    return (issues[0].code, str(DataError(issues)), param), []
        level, text = R.probe(spec, self._path(job["training_file"]))
        if level == "error":
            return ("invalid_grader", text, "method.reinforcement.grader"), []
        return None, [(level, text)]

    def _path(self, file_id: str) -> Path | None:
        row = self.store.get_file(file_id)
        return self.s.files_dir / row["stored_name"] if row else None

    def _enforce_cancel(self) -> None:
        for job_id, proc in list(self.procs.items()):
            if self.store.job_status(job_id) != "cancelled":
                continue
            first = self._cancel_seen.setdefault(job_id, time.monotonic())
            if time.monotonic() - first > self.s.cancel_grace_s:
                proc.kill()  # reaped next tick; the job is already `cancelled`

    def _launch(self) -> None:
        """Claim the oldest queued job (or one whose worker's lease lapsed) for each free slot: the same claim as
        `tunesmith worker` makes, so servers and workers on a shared store never take the same job."""
        while len(self.procs) < self.s.workers:
            job = self.store.claim_next(self.s.node, self.s.lease_s, max_attempts=self.s.max_attempts,
                                        on_interrupt=self.s.on_interrupt)
            if job is None:
                return
            try:
                proc = self._assign(job["id"])
            except OSError as e:
                self.store.update_job(job["id"], when=("running",), status="failed", finished_at=now(),
                                      error={"code": "worker_start_failed", "message": str(e), "param": None})
                continue
            self.procs[job["id"]] = proc
            self.store.update_job(job["id"], worker_pid=proc.pid)

    def _assign(self, job_id: str) -> subprocess.Popen:
        """Give the job to a warm worker (a fresh one if none is waiting or a waiting one died)."""
        while self.idle:
            proc = self.idle.pop(0)
            try:
                proc.stdin.write(f"{job_id}\n".encode())
                proc.stdin.close()
                return proc
            except (BrokenPipeError, OSError):
                proc.kill()
        proc = self._spawn()
        proc.stdin.write(f"{job_id}\n".encode())
        proc.stdin.close()
        return proc

    def _warm(self) -> None:
        """A waiting worker for every free slot, and one spare while all are busy: the next job, or a job
        resumed after a worker crash, starts without paying for the imports."""
        while self.s.workers and len(self.idle) < max(1, self.s.workers - len(self.procs)):
            self.idle.append(self._spawn())

    def _spawn(self) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "tunesmith.server.worker", "--data-dir", str(self.s.data_dir),
               "--parent-pid", str(os.getpid()), "--on-interrupt", self.s.on_interrupt, "--worker-id", self.s.node]
        if self.s.store_url:
            cmd += ["--store", self.s.store_url]
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_DISABLE_PROGRESS_BARS="1")
        if self.s.worker_threads:
            env["TUNESMITH_WORKER_THREADS"] = str(self.s.worker_threads)
        if self._log is None:  # until a worker has a job, its output goes to the shared log
            self._log = open(self.s.logs_dir / "workers.log", "ab")
        # A session of its own: Ctrl-C in the server's terminal goes to the server, which stops
        # workers gracefully (SIGTERM), rather than interrupting them mid-step.
        return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, close_fds=True)

    # ------------------------------------------------------------ interruption and shutdown

    def interrupted(self, job: dict, reason: str) -> None:
        """A job that was `running` lost its worker: back to the queue to resume, or failed with the reason."""
        attempts, limit = job["attempts"], self.s.max_attempts
        if self.s.on_interrupt == "resume" and attempts < limit:
            self.store.update_job(job["id"], when=("running",), status="queued", worker_pid=None, estimated_finish=None,
                                  worker_id=None, lease_expires_at=None, holder=job["worker_id"],
                                  event=("warn", "message", f"{reason}; the job will resume from its newest checkpoint"))
            return
        why = reason if self.s.on_interrupt == "fail" else f"{reason}, after {attempts} starts (limit {limit})"
        self.store.update_job(job["id"], when=("running",), status="failed", finished_at=now(), worker_pid=None,
                              worker_id=None, holder=job["worker_id"], estimated_finish=None,
                              error={"code": "job_interrupted", "message": why, "param": None},
                              event=("error", "message", f"Job failed: {why}"))

    def _shutdown_workers(self) -> None:
        """Waiting workers get EOF and exit; running ones get SIGTERM, checkpoint at their next step boundary
        and re-queue their job themselves. File checks not started are dropped (the jobs stay validating_files
        and are checked again at the next start)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        for proc in self.idle:
            proc.stdin.close()
        for proc in self.procs.values():
            _signal(proc, signal.SIGTERM)
        deadline = time.monotonic() + self.shutdown_grace_s
        while self.procs and time.monotonic() < deadline:
            for job_id, proc in list(self.procs.items()):
                if proc.poll() is not None:
                    self._forget(job_id)
            time.sleep(0.1)
        for proc in list(self.procs.values()) + self.idle:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        self.procs.clear()
        self.idle.clear()
        for job in self.store.jobs_with_status("running"):
            if job["worker_id"] in (None, self.s.node):
                self.interrupted(job, "the server stopped while the job was running")
        if self._log is not None:
            self._log.close()

    def _forget(self, job_id: str) -> None:
        self.procs.pop(job_id, None)
        self._cancel_seen.pop(job_id, None)


def _resolution(job: dict) -> int:
    """The image side an image job trains at: objective.denoise.resolution, else its base pipeline's own."""
    from ..objectives.denoise import pipeline_resolution
    from .jobs import config_from

    cfg = config_from(job["overrides"])
    return cfg.objective.denoise.resolution or pipeline_resolution(cfg.model.name)


def _in_folder(issue, folder: Path, file_id: str):
    """An issue inside an image upload's folder as FILE_ID/member (never the server's path)."""
    import dataclasses

    path = Path(issue.path) if issue.path else None
    if path is None or not path.is_relative_to(folder):
        return issue
    return dataclasses.replace(issue, path=f"{file_id}/{path.relative_to(folder).as_posix()}",
                               message=issue.message.replace(str(folder) + "/", ""))


def _rename(issue, file_id: str):
    """Data issues name the client's file id, never the server's storage path."""
    import dataclasses

    return dataclasses.replace(issue, path=file_id)


def _signal(proc: subprocess.Popen, sig: int) -> None:
    try:
        proc.send_signal(sig)
    except ProcessLookupError:
        pass


def _describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit code {rc}"


def _kill_stale_worker(pid: int | None, data_dir: Path) -> None:
    """A job's worker still alive from a previous server (normally impossible: workers die with it).

    A worker is recognised by its command line, ``-m tunesmith.server.worker --data-dir DATA_DIR``; its job id
    came on standard input, so it is not there to match.
    """
    if not pid:
        return
    cmdline = Path(f"/proc/{pid}/cmdline")
    try:
        args = cmdline.read_bytes().split(b"\0")
    except OSError:
        return
    if b"tunesmith.server.worker" not in args or str(data_dir).encode() not in args:
        return  # the pid was reused by an unrelated process, or belongs to another server's worker
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    for _ in range(100):
        if not cmdline.exists():
            return
        time.sleep(0.05)
