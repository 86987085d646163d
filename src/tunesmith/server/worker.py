"""One job, run in its own process: ``python -m tunesmith.server.worker --data-dir D --parent-pid P``.

The supervisor starts workers ahead of need: a worker imports torch and transformers first (seconds),
then waits for a job id on its standard input, so a queued job starts at once. The supervisor has
already moved that job to ``running``; the worker trains it with ``tunesmith.train.train`` and a sink
that writes every event into the job database, records the outcome, and exits: one job per process,
so every job starts with fresh memory and a stuck job can be killed without touching the others.

The worker dies with the server (PR_SET_PDEATHSIG), so after a server crash no orphan keeps training;
the restarted server finds the job still ``running`` and resumes it from its newest checkpoint.
SIGTERM (a server shutting down) stops at the next step boundary with a checkpoint, and the job goes
back to the queue to resume later. `tunesmith worker` (node.py) runs the same ``run_job`` in a forked child.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import signal
import sys
import time
import traceback
from pathlib import Path

from .store import Store, new_id, now

PR_SET_PDEATHSIG = 1
# An event's `stats` (the objective's figures: dpo's rewards/chosen, ...; grpo's reward, reward_std, kl,
# grader/<name>, ...) go into metrics as train_<name> and valid_<name>, beside OpenAI's train_loss and valid_loss;
# sft has none. A reinforcement job's train_reward is the mean grade of the step's sampled answers, its
# valid_reward the mean grade of greedy answers to the held-out prompts (valid_loss is minus that).
STAT_PREFIXES = ("train_", "valid_")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tunesmith.server.worker")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--parent-pid", type=int, required=True)
    p.add_argument("--job", help="the job to run (default: read its id from standard input when assigned)")
    p.add_argument("--on-interrupt", choices=["resume", "fail"], default="resume")
    p.add_argument("--store", help="postgresql://... (default: SQLite in DATA/tunesmith.db)")
    p.add_argument("--worker-id", help="the worker_id the job is held by (the server's node name)")
    args = p.parse_args(argv)
    _die_with_parent(args.parent_pid)
    stop = _Stop()  # installed before the wait, so a SIGTERM then is not fatal
    threads = os.environ.get("TUNESMITH_WORKER_THREADS")
    import torch  # noqa: F401  (warm up: these imports are most of a job's start-up time)

    from .. import train  # noqa: F401

    if threads:
        torch.set_num_threads(int(threads))
    job_id = args.job or sys.stdin.readline().strip()
    if not job_id or stop.terminated:  # the server closed the pipe or is stopping
        return 0
    data_dir = Path(args.data_dir)
    _log_to(data_dir / "logs" / f"{job_id}.log")
    from .store import open_store

    store = open_store(args.store or data_dir / "tunesmith.db")
    return run_job(store, data_dir, job_id, args.on_interrupt, stop, holder=args.worker_id)


def _log_to(path: Path) -> None:
    """From here on, this process's output (tracebacks, warnings) goes to the job's log."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL us when the server dies, then make sure it has not died already."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(3)


class _Stop:
    """Stop requests: SIGTERM (server shutdown), or the job leaving `running` in the database (cancelled)."""

    def __init__(self):
        self.terminated = False
        self.store: Store | None = None
        self.job_id: str | None = None
        self.holder: str | None = None
        self._checked, self._running = 0.0, True
        signal.signal(signal.SIGTERM, self._on_term)

    def _on_term(self, signum, frame):
        self.terminated = True

    def watch(self, store: Store, job_id: str, holder: str | None = None) -> "_Stop":
        self.store, self.job_id, self.holder = store, job_id, holder
        return self

    def __call__(self) -> bool:
        """Stop when the job left `running` (cancelled, paused) or another worker holds it now (our lease lapsed)."""
        if self.terminated:
            return True
        t = time.monotonic()
        if self.store is not None and t - self._checked > 0.25:  # one indexed read per step, 4 a second at most
            status, worker = self.store.job_holder(self.job_id)
            self._checked = t
            self._running = status == "running" and (self.holder is None or worker == self.holder)
        return not self._running


def run_job(store: Store, data_dir: Path, job_id: str, on_interrupt: str, stop: _Stop, holder: str | None = None,
            models: dict[str, str] | None = None) -> int:
    """Train one claimed job to its outcome. ``holder``: the worker_id it was claimed for (outcomes are written
    only while it still holds the job); ``models``: this machine's folders for base models (--model NAME=PATH)."""
    from ..config import ConfigError
    from ..data import DataError
    from ..errors import user_errors
    from ..train import train

    job = store.get_job(job_id)
    if job is None or job["status"] != "running":
        return 0
    clean = _no_paths(data_dir, job)
    if holder is not None and job["worker_id"] != holder:
        return 0  # claimed by another worker meanwhile
    run_dir = data_dir / "runs" / job_id
    resume = run_dir.exists()  # a folder from an earlier attempt: continue from its newest checkpoint
    stop.watch(store, job_id, holder)
    sink = DbSink(store, job_id, data_dir, job)
    store.add_event(job_id, "info", "message", f"Fine-tuning job started (attempt {job['attempts']})"
                    + ("; resuming from the newest checkpoint" if resume else ""))
    try:
        from ..config import load_config

        cfg = load_config(None, localize(job, data_dir, models))
        result = train(cfg, resume=resume, sinks=[sink], quiet=True, stop_requested=stop)
    except user_errors() as e:
        code = _code(e, DataError, ConfigError)
        param = _param(e, job) if isinstance(e, DataError) else None
        _fail(store, job_id, code, clean(str(e)), param, holder)
        return 0
    except Exception as e:  # the job fails; the server and other jobs go on
        traceback.print_exc()
        _fail(store, job_id, "internal_error", clean(f"{type(e).__name__}: {e} (the worker log has the traceback)"), None,
              holder)
        return 1
    if holder is not None and store.job_holder(job_id)[1] != holder:  # our lease lapsed: another worker has it
        store.add_event(job_id, "warn", "message", f"the worker {holder} lost the job at step {result.steps}")
    elif result.status in ("completed", "early_stopped"):
        _succeed(store, job, data_dir, result, holder)
    elif store.job_status(job_id) == "cancelled":
        store.add_event(job_id, "info", "message", f"Job cancelled at step {result.steps}; a checkpoint was saved")
    elif store.job_status(job_id) == "paused":  # resume (POST .../resume) continues from this checkpoint
        store.update_job(job_id, when=("paused",), worker_pid=None, worker_id=None, lease_expires_at=None,
                         event=("info", "message", f"Job paused at step {result.steps}; a checkpoint was saved"))
    elif on_interrupt == "resume":
        store.update_job(job_id, when=("running",), status="queued", worker_pid=None, worker_id=None,
                         lease_expires_at=None, holder=holder,
                         event=("warn", "message", f"The worker is stopping: training paused at step {result.steps} "
                                                   "with a checkpoint; the job goes back to the queue and resumes there"))
    else:
        _fail(store, job_id, "job_interrupted", f"the worker stopped the job at step {result.steps}", None, holder)
    return 0


def _code(e: Exception, data_error: type, config_error: type) -> str:
    if isinstance(e, data_error):
        return sorted(e.codes())[0] if e.codes() else "invalid_data"
    if isinstance(e, config_error):
        return "invalid_config"
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(e).__name__).lower()  # ModelError -> model_error


def _param(e, job: dict) -> str:
    """Which file a data error is about: issues name the stored file, whose name starts with its id (an image upload's
    issues name a file inside its unpacked folder, <id>.images/)."""
    valid = job["validation_file"]
    if valid and any(i.path and any(part.startswith(valid) for part in Path(i.path).parts) for i in e.issues):
        return "validation_file"
    return "training_file"


def localize(job: dict, data_dir: Path, models: dict[str, str] | None = None) -> list[str]:
    """The job's frozen overrides, with its files and run folder under this machine's data folder (a shared folder
    may be mounted at another path than on the server that created the job), and its base model at this machine's
    folder when the worker was given one (--model NAME=PATH)."""
    out, fields = list(job["overrides"]), {}
    for item in out:
        key, _, value = item.partition("=")
        if key in ("data.train", "data.valid"):
            fields[key] = json.dumps(str(data_dir / "files" / Path(json.loads(value)).name))
    fields["output_dir"] = json.dumps(str(data_dir / "runs" / job["id"]))
    if models and job["model"] in models:
        fields["model.name"] = json.dumps(str(models[job["model"]]))
    return out + [f"{k}={v}" for k, v in fields.items()]


def _fail(store: Store, job_id: str, code: str, message: str, param: str | None, holder: str | None = None) -> None:
    store.update_job(job_id, when=("running",), status="failed", finished_at=now(), worker_pid=None, holder=holder,
                     worker_id=None,
                     error={"code": code, "message": message, "param": param},
                     event=("error", "message", f"Job failed: {message}"))


def _succeed(store: Store, job: dict, data_dir: Path, result, holder: str | None = None) -> None:
    from .jobs import fine_tuned_name

    job_id = job["id"]
    metrics = store.metric_events(job_id)  # read once: both the token count and the results file come from it
    tokens = trained_tokens(metrics)
    results_file = _results_file(store, job_id, data_dir, metrics, job.get("project") or "default")
    name = fine_tuned_name(job["model"], job["suffix"], job_id)
    store.update_job(job_id, when=("running",), status="succeeded", finished_at=now(), fine_tuned_model=name,
                     trained_tokens=tokens, result_files=[results_file], worker_pid=None, estimated_finish=None,
                     worker_id=None, holder=holder,
                     event=("info", "message", f"The job has successfully completed: {name}" + _best(job, result)))


def _best(job: dict, result) -> str:
    if result.best_val_loss is None:
        return ""
    if (job["method"] or {}).get("type") == "reinforcement":  # its validation loss is minus the held-out reward
        return f" (best step {result.best_step}, held-out reward {0.0 - result.best_val_loss:.4f})"
    return f" (best step {result.best_step}, validation loss {result.best_val_loss:.4f})"


def trained_tokens(metric_events: list[dict]) -> int:
    """Target tokens over distinct steps (a resumed job reports some steps twice)."""
    per_step: dict[int, int] = {}
    for ev in metric_events:
        d = ev["data"] or {}
        if "train_loss" in d:
            per_step[d["step"]] = d.get("tokens", 0)
    return sum(per_step.values())


# The hosted API's results file: these columns first, in this order (train_accuracy: the step's mean token accuracy),
# then tunesmith's learning rate and the objective's own figures.
RESULT_COLUMNS = ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"]


def _results_file(store: Store, job_id: str, data_dir: Path, metric_events: list[dict], project: str = "default") -> str:
    """A `fine-tune-results` file (CSV: step, train_loss, train_accuracy, valid_loss, valid_mean_token_accuracy, ...)
    like the hosted API's."""
    rows: dict[int, dict] = {}
    cols = RESULT_COLUMNS + ["learning_rate"]
    for ev in metric_events:
        d = dict(ev["data"] or {})
        if "train_mean_token_accuracy" in d:
            d["train_accuracy"] = d["train_mean_token_accuracy"]
        # the objective's own figures (dpo: train_rewards/margins, valid_rewards/accuracy, ...) after ours
        cols += [k for k in d if k.startswith(STAT_PREFIXES) and k not in cols and k != "train_mean_token_accuracy"]
        r = rows.setdefault(d["step"], {"step": d["step"]})
        r.update((k, d[k]) for k in cols if k in d)
    text = ",".join(cols) + "\n" + "".join(",".join("" if r.get(c) is None else str(r[c]) for c in cols) + "\n"
                                            for _, r in sorted(rows.items()))
    file_id = new_id("file-")
    stored = f"{file_id}.csv"
    (data_dir / "files").mkdir(parents=True, exist_ok=True)
    (data_dir / "files" / stored).write_text(text, encoding="utf-8")
    store.add_file({"id": file_id, "project": project, "filename": f"{job_id}-results.csv", "stored_name": stored,
                    "bytes": len(text.encode()), "created_at": now(), "purpose": "fine-tune-results",
                    "status": "processed"})
    return file_id


def _no_paths(data_dir: Path, job: dict | None = None):
    """Messages and event data go to API clients: data-folder paths read relative to it (file-XXX.jsonl:3,
    runs/ftjob-...), the job's base model folder as its API name, the server user's home as ~ (dpo's reference
    log-probabilities are cached under ~/.cache)."""
    from .http import Scrubber

    models = {}
    for item in (job or {}).get("overrides") or []:
        if item.startswith("model.name="):
            models[job["model"]] = json.loads(item.split("=", 1)[1])
    return Scrubber(data_dir, models)


class DbSink:
    """Training events into the job database: metrics events for the loss curve, messages, checkpoints."""

    def __init__(self, store: Store, job_id: str, data_dir: Path, job: dict | None = None):
        self.store, self.job_id, self.clean = store, job_id, _no_paths(data_dir, job)
        # The newest step's and evaluation's figures, for checkpoint metrics; a resumed job starts from what the
        # earlier attempt recorded, so its first checkpoint does not show the held-out figures as null.
        self.last_train: dict = {"train_loss": None}
        self.last_valid: dict = {"valid_loss": None}
        # Steps an earlier attempt logged: a resumed run trains them again from its checkpoint (bit-exact resume,
        # the same figures) and does not log them twice.
        self.logged_train: set[int] = set()
        self.logged_valid: set[int] = set()
        for ev in store.metric_events(job_id):
            d = ev["data"] or {}
            if "train_loss" in d:
                self.last_train = {k: v for k, v in d.items() if k.startswith("train_")}
                self.logged_train.add(d["step"])
            elif "valid_loss" in d:
                self.last_valid = {k: v for k, v in d.items() if k.startswith("valid_") and v is not None}
                self.logged_valid.add(d["step"])

    def __call__(self, event) -> None:
        from ..events import CheckpointSaved, EarlyStopped, EvalEnd, Message, RunEnded, RunStarted, StepEnd

        s = self.store
        if isinstance(event, StepEnd) and event.step in self.logged_train:
            return
        if isinstance(event, EvalEnd) and event.step in self.logged_valid:
            return
        if isinstance(event, StepEnd):
            stats = {f"train_{k}": v for k, v in event.stats.items()}
            self.last_train = {"train_loss": event.loss} | stats
            data = {"step": event.step, "total_steps": event.total_steps, "train_loss": event.loss,
                    "learning_rate": event.lr, "epoch": event.epoch, "grad_norm": event.grad_norm,
                    "tokens": event.tokens, "tokens_per_s": event.tokens_per_s, "eta_s": event.eta_s} | stats
            finish = int(time.time() + event.eta_s) if event.eta_s is not None else None
            s.update_job(self.job_id, estimated_finish=finish,
                         event=("info", "metrics", f"Step {event.step}/{event.total_steps}: training loss="
                                                   f"{event.loss:.4f}{_rewards(event.stats)}", data))
        elif isinstance(event, EvalEnd):
            # sft: token accuracy and perplexity; dpo: None for both, and its figures in stats
            figures = {"valid_loss": event.val_loss, "valid_mean_token_accuracy": event.token_accuracy}
            self.last_valid = ({k: v for k, v in figures.items() if v is not None}
                               | {f"valid_{k}": v for k, v in event.stats.items()})
            data = {"step": event.step} | figures | {"perplexity": event.perplexity, "is_best": event.is_best,
                                                     "samples": event.samples} | self.last_valid
            s.add_event(self.job_id, "info", "metrics", f"Step {event.step}: validation loss={event.val_loss:.4f}"
                        f"{_rewards(event.stats)}" + (" (best so far)" if event.is_best else ""), data)
        elif isinstance(event, CheckpointSaved):
            metrics = {"step": event.step} | self.last_train | self.last_valid
            s.add_checkpoint({"id": new_id("ftckpt-"), "job_id": self.job_id, "created_at": now(), "step": event.step,
                              "path": event.path, "metrics": metrics},
                             ("info", "message", f"Checkpoint created at step {event.step}"))
        elif isinstance(event, RunStarted):
            s.add_event(self.job_id, "info", "message",
                        f"Training {'resumed at step ' + str(event.resumed_from_step) if event.resumed_from_step else 'started'}"
                        f": {event.total_steps} steps, method {event.method}, {event.trainable_params:,} of "
                        f"{event.total_params:,} parameters trained, {event.train_examples} training and "
                        f"{event.valid_examples} validation examples, on {event.device}",
                        self.clean(json.loads(json.dumps(event.__dict__, default=str))))
        elif isinstance(event, Message):
            s.add_event(self.job_id, {"warning": "warn"}.get(event.level, event.level), "message", self.clean(event.text))
        elif isinstance(event, EarlyStopped):
            s.add_event(self.job_id, "info", "message", f"Early stopping at step {event.step}: best validation loss "
                        f"{event.best_val_loss:.4f} at step {event.best_step}")
        elif isinstance(event, RunEnded):
            s.add_event(self.job_id, "info", "message", f"Training {event.status} at step {event.step} "
                        f"in {event.elapsed_s:.0f} s")

    def close(self) -> None:
        pass


def _rewards(stats: dict) -> str:
    """The headline figures for an event message: a preference run's ', reward accuracy=0.75, margin=0.31', a
    reinforcement run's mean grade ', reward=0.62'."""
    names = {"rewards/accuracy": "reward accuracy", "rewards/margins": "margin", "reward": "reward"}
    return "".join(f", {label}={stats[k]:.4f}" for k, label in names.items() if stats.get(k) is not None)


if __name__ == "__main__":
    sys.exit(main())
