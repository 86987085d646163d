"""Where a study lives: a SQLite file by default, any Optuna storage URL, or a journal file.

Several `tunesmith sweep` processes (on one machine or many) share a study by naming the same study and
storage. Why SQLite through Optuna's RDB storage, and what is added to make it safe:

- Optuna numbers a new trial inside one write transaction (it counts the trials before it), and SQLite
  allows one writer at a time, so two workers never get the same trial number. Writes are short
  (a trial's parameters, one intermediate value per evaluation, its result), so contention is low;
  the SQLite busy timeout is raised from 5 s to 60 s so a busy moment waits instead of failing.
- Creating the database (tables, schema version, study) is several statements that two workers
  starting at the same moment would race on, so it happens under a file lock beside the database.
- Heartbeats: a worker that dies (killed, machine lost) leaves its trial RUNNING forever; with a
  heartbeat every 60 s, the next worker marks such a trial failed after 4 minutes of silence and
  queues its parameters once more.
- For a shared network file system where SQLite locking is unreliable, a path ending in `.log` selects
  Optuna's journal storage (an append-only file with its own lock); for many machines, a server
  database URL (postgresql://, mysql://) is the robust choice.
"""

from __future__ import annotations

import warnings
from pathlib import Path

HEARTBEAT_S, GRACE_S = 60, 240


def storage_url(storage: str | None, out: Path) -> str:
    """The storage as a URL: default OUT/study.db; a bare file path is a SQLite file (or a .log journal)."""
    if not storage:
        return f"sqlite:///{(out / 'study.db').resolve()}"
    if "://" in storage:
        return storage
    p = Path(storage).expanduser().resolve()
    return f"journal:{p}" if p.suffix == ".log" else f"sqlite:///{p}"


def display_url(url: str) -> str:
    """The URL with any password hidden, for reports and messages."""
    from sqlalchemy.engine import make_url

    if url.startswith("journal:"):
        return url
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def _sqlite_path(url: str) -> Path | None:
    return Path(url[len("sqlite:///"):]) if url.startswith("sqlite:///") and ":memory:" not in url else None


def open_study(url: str, study_name: str, direction: str, sampler, pruner):
    """Create the study, or load it when it exists (a second worker, or a sweep continued later)."""
    import optuna
    from optuna.exceptions import ExperimentalWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)  # heartbeat arguments are marked experimental
        if url.startswith("journal:"):
            from optuna.storages.journal import JournalFileBackend

            path = Path(url[len("journal:"):])
            path.parent.mkdir(parents=True, exist_ok=True)
            storage = optuna.storages.JournalStorage(JournalFileBackend(str(path)))
            return optuna.create_study(storage=storage, study_name=study_name, direction=direction,
                                       sampler=sampler, pruner=pruner, load_if_exists=True)
        db = _sqlite_path(url)
        kwargs = dict(heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                      heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1))
        if db is None:
            storage = optuna.storages.RDBStorage(url, **kwargs)
            return optuna.create_study(storage=storage, study_name=study_name, direction=direction,
                                       sampler=sampler, pruner=pruner, load_if_exists=True)
        from filelock import FileLock  # already installed with torch and huggingface_hub

        db.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(db) + ".lock", timeout=120):
            storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}}, **kwargs)
            return optuna.create_study(storage=storage, study_name=study_name, direction=direction,
                                       sampler=sampler, pruner=pruner, load_if_exists=True)
