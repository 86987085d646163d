"""The job server's state: SQLite (one machine, the default) or PostgreSQL (several machines), same tables.

    files        uploaded training/validation files (the bytes live in DATA/files/<id><ext>), per project
    jobs         fine-tuning jobs and their status; the resolved config overrides are frozen at creation; the
                 worker that runs one holds a lease on it (worker_id, lease_expires_at), renewed while it trains
    events       what a job reported (messages and metrics), in order; `seq` is the cursor
    checkpoints  checkpoints a job saved
    idempotency  Idempotency-Key -> job, per API token

SQLite: WAL lets the dashboard and API read while a worker writes; every thread and process opens its own
connection; writes that read-then-write run inside ``BEGIN IMMEDIATE`` so two writers never interleave.
PostgreSQL (store_pg.py): the same SQL with the driver's placeholders; a worker claims the next job with
``SELECT ... FOR UPDATE SKIP LOCKED``, so workers on many machines never take the same job, and never wait on
each other. Lease times come from the database's clock, so machines' clocks need not agree.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import sqlite3
import string
import threading
import time
from pathlib import Path
from typing import Any, Iterator

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq {serial},
    id TEXT UNIQUE NOT NULL,
    project TEXT NOT NULL DEFAULT 'default',
    filename TEXT NOT NULL,
    stored_name TEXT NOT NULL,
    bytes BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    purpose TEXT NOT NULL,
    status TEXT NOT NULL,
    format TEXT,
    examples INTEGER,
    sha256 TEXT,
    deleted INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS jobs (
    seq {serial},
    id TEXT UNIQUE NOT NULL,
    project TEXT NOT NULL DEFAULT 'default',
    created_at BIGINT NOT NULL,
    model TEXT NOT NULL,
    training_file TEXT NOT NULL,
    validation_file TEXT,
    hyperparameters TEXT NOT NULL,
    method TEXT NOT NULL,
    suffix TEXT,
    seed BIGINT NOT NULL,
    metadata TEXT,
    overrides TEXT NOT NULL,
    status TEXT NOT NULL,
    error TEXT,
    fine_tuned_model TEXT,
    started_at BIGINT,
    finished_at BIGINT,
    estimated_finish BIGINT,
    trained_tokens BIGINT,
    result_files TEXT NOT NULL DEFAULT '[]',
    attempts INTEGER NOT NULL DEFAULT 0,
    worker_pid INTEGER,
    worker_id TEXT,
    lease_expires_at DOUBLE PRECISION,
    model_deleted INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status);
CREATE INDEX IF NOT EXISTS jobs_ft_model ON jobs(fine_tuned_model);
CREATE TABLE IF NOT EXISTS events (
    seq {serial},
    id TEXT UNIQUE NOT NULL,
    job_id TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    level TEXT NOT NULL,
    type TEXT NOT NULL,
    message TEXT NOT NULL,
    data TEXT
);
CREATE INDEX IF NOT EXISTS events_job ON events(job_id, seq);
CREATE TABLE IF NOT EXISTS checkpoints (
    seq {serial},
    id TEXT UNIQUE NOT NULL,
    job_id TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    step INTEGER NOT NULL,
    path TEXT NOT NULL,
    metrics TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS checkpoints_job ON checkpoints(job_id, seq);
CREATE TABLE IF NOT EXISTS idempotency (
    token_fp TEXT NOT NULL,
    key TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    job_id TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (token_fp, key)
);
"""
# Indexes on columns an older file gets by ALTER TABLE: made after it.
INDEXES = """
CREATE INDEX IF NOT EXISTS files_project ON files(project, seq);
CREATE INDEX IF NOT EXISTS jobs_project ON jobs(project, seq);
"""
# Columns added since the first release: an older SQLite file gets them at start (ALTER TABLE ADD COLUMN).
ADDED_COLUMNS = {"files": {"project": "TEXT NOT NULL DEFAULT 'default'"},
                 "jobs": {"project": "TEXT NOT NULL DEFAULT 'default'", "worker_id": "TEXT",
                          "lease_expires_at": "DOUBLE PRECISION", "model_deleted": "INTEGER NOT NULL DEFAULT 0"}}

TERMINAL = ("succeeded", "failed", "cancelled")
ACTIVE = ("validating_files", "queued", "running", "paused")  # a job that still needs its files
_JSON_COLUMNS = {"hyperparameters", "method", "metadata", "overrides", "error", "result_files", "data", "metrics"}
_ALPHABET = string.ascii_letters + string.digits


def new_id(prefix: str, n: int = 24) -> str:
    """An opaque id like ``ftjob-3kQ...``: random, so ids reveal nothing and cannot be guessed."""
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(n))


def now() -> int:
    return int(time.time())


def open_store(where: str | Path) -> "Store":
    """A store for ``postgresql://...`` (or ``postgres://``) or a SQLite file path."""
    text = str(where)
    if text.startswith(("postgresql://", "postgres://")):
        from .store_pg import PgStore

        return PgStore(text)
    return Store(text)


class Store:
    """Thin, explicit data access; rows come back as plain dicts (JSON columns decoded).

    SQL here is written once, with ``?`` placeholders; the PostgreSQL store (store_pg.py) changes only how a
    connection is opened, how a write transaction starts, and the few phrases below that differ."""

    kind = "sqlite"
    serial = "INTEGER PRIMARY KEY AUTOINCREMENT"
    clock = "((julianday('now') - 2440587.5) * 86400.0)"  # the database's time, in Unix seconds
    skip_locked = ""  # BEGIN IMMEDIATE already serialises writers

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._local = threading.local()

    def describe(self) -> str:
        return self.path

    # ------------------------------------------------------------ connections

    def conn(self):
        c = getattr(self._local, "conn", None)
        if c is None:
            # isolation_level=None: autocommit, transactions only where we open them explicitly.
            c = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            c.row_factory = sqlite3.Row
            c.execute("PRAGMA journal_mode=WAL")
            c.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
            c.execute("PRAGMA busy_timeout=30000")
            self._local.conn = c
        return c

    def x(self, sql: str, args: tuple | list = ()):
        """Execute on this thread's connection; returns the cursor."""
        return self.conn().execute(sql, tuple(args))

    def init(self) -> None:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.conn().executescript(SCHEMA.format(serial=self.serial))
        for table, cols in ADDED_COLUMNS.items():
            have = {r["name"] for r in self.conn().execute(f"PRAGMA table_info({table})")}
            for col, decl in cols.items():
                if col not in have:
                    self.conn().execute(f"ALTER TABLE {table} ADD COLUMN {col} {decl}")
        self.conn().executescript(INDEXES)

    @contextlib.contextmanager
    def tx(self) -> Iterator[Any]:
        """A write transaction that takes the write lock up front (no read-then-upgrade deadlocks)."""
        c = self.conn()
        c.execute("BEGIN IMMEDIATE")
        try:
            yield self
        except BaseException:
            c.execute("ROLLBACK")
            raise
        c.execute("COMMIT")

    def close(self) -> None:
        c = getattr(self._local, "conn", None)
        if c is not None:
            c.close()
            self._local.conn = None

    def forget_connections(self) -> None:
        """In a forked child: open connections of its own, never the parent's."""
        self._local = threading.local()

    def _one(self, sql: str, args: tuple = ()) -> dict | None:
        row = self.x(sql, args).fetchone()
        return _decode(row) if row is not None else None

    def _all(self, sql: str, args: tuple = ()) -> list[dict]:
        return [_decode(r) for r in self.x(sql, args).fetchall()]

    def json_field(self, column: str) -> str:
        """SQL for one key of a JSON text column, the key given as the next parameter."""
        return f"json_extract({column}, '$.\"' || ? || '\"')"

    # ------------------------------------------------------------ files

    def add_file(self, row: dict) -> dict:
        _insert(self, "files", row)
        return self.get_file(row["id"])

    def get_file(self, file_id: str) -> dict | None:
        return self._one("SELECT * FROM files WHERE id = ? AND deleted = 0", (file_id,))

    def list_files(self, *, purpose: str | None, after: str | None, limit: int, order: str,
                   project: str | None = None) -> tuple[list[dict], bool]:
        where, args = ["deleted = 0"], []
        if purpose:
            where.append("purpose = ?")
            args.append(purpose)
        if project is not None:
            where.append("project = ?")
            args.append(project)
        return self._page("files", where, args, after, limit, newest_first=order != "asc")

    def delete_file(self, file_id: str) -> None:
        self.x("UPDATE files SET deleted = 1 WHERE id = ?", (file_id,))

    def file_in_use(self, file_id: str) -> str | None:
        row = self.x(f"SELECT id FROM jobs WHERE (training_file = ? OR validation_file = ?) AND status IN {ACTIVE} "
                     "LIMIT 1", (file_id, file_id)).fetchone()
        return row["id"] if row else None

    def stored_names(self) -> set[str]:
        """Every file the store knows (deleted ones too: their bytes are removed with the row's delete)."""
        return {r["stored_name"] for r in self.x("SELECT stored_name FROM files WHERE deleted = 0").fetchall()}

    def project_usage(self, project: str) -> tuple[int, int]:
        """(bytes of the project's stored files, its jobs not finished yet)."""
        stored = self.x("SELECT COALESCE(SUM(bytes), 0) AS n FROM files WHERE project = ? AND deleted = 0",
                        (project,)).fetchone()["n"]
        jobs = self.x(f"SELECT COUNT(*) AS n FROM jobs WHERE project = ? AND status IN {ACTIVE}",
                      (project,)).fetchone()["n"]
        return int(stored), int(jobs)

    # ------------------------------------------------------------ jobs

    def create_job(self, row: dict, *, idem: tuple[str, str, str] | None = None, events: list[str] = (),
                   max_active: int | None = None) -> tuple[dict, bool]:
        """Insert a job with its first events (info messages); with ``idem`` = (token_fp, key, request_hash), a
        key seen before returns the job it created instead. With ``max_active``, refuses (QuotaExceeded) when the
        job's project already has that many jobs not finished. Returns (job, created)."""
        with self.tx():
            if idem is not None:
                seen = self.x("SELECT job_id, request_hash FROM idempotency WHERE token_fp = ? AND key = ?",
                              idem[:2]).fetchone()
                if seen is not None:
                    if seen["request_hash"] != idem[2]:
                        raise IdempotencyConflict(idem[1])
                    return self.get_job(seen["job_id"]), False
            if max_active is not None:
                active = self.x(f"SELECT COUNT(*) AS n FROM jobs WHERE project = ? AND status IN {ACTIVE}",
                                (row.get("project", "default"),)).fetchone()["n"]
                if active >= max_active:
                    raise QuotaExceeded(active)
            _insert(self, "jobs", row)
            if idem is not None:
                self.x("INSERT INTO idempotency VALUES (?, ?, ?, ?, ?)", (*idem, row["id"], now()))
            for text in [f"Created fine-tuning job: {row['id']}", *events]:
                self._event(row["id"], "info", "message", text)
        return self.get_job(row["id"]), True

    def get_job(self, job_id: str) -> dict | None:
        return self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))

    def job_status(self, job_id: str) -> str | None:
        row = self.x("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row["status"] if row else None

    def job_holder(self, job_id: str) -> tuple[str | None, str | None]:
        """(status, worker_id): what a running worker checks between steps."""
        row = self.x("SELECT status, worker_id FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return (row["status"], row["worker_id"]) if row else (None, None)

    def list_jobs(self, *, after: str | None, limit: int, project: str | None = None,
                  metadata: dict[str, str] | None = None, metadata_null: bool = False,
                  status: str | None = None) -> tuple[list[dict], bool]:
        where, args = [], []
        if project is not None:
            where.append("project = ?")
            args.append(project)
        if metadata_null:
            where.append("metadata IS NULL")
        for key, value in (metadata or {}).items():
            where.append(f"{self.json_field('metadata')} = ?")
            args += [key, value]
        if status:
            where.append("status = ?")
            args.append(status)
        return self._page("jobs", where, args, after, limit, newest_first=True)

    def jobs_with_status(self, *statuses: str) -> list[dict]:
        marks = ",".join("?" * len(statuses))
        return self._all(f"SELECT * FROM jobs WHERE status IN ({marks}) ORDER BY seq", statuses)

    def job_by_model(self, name: str) -> dict | None:
        return self._one("SELECT * FROM jobs WHERE fine_tuned_model = ? AND status = 'succeeded' AND model_deleted = 0",
                         (name,))

    def succeeded_jobs(self, project: str | None = None) -> list[dict]:
        sql = "SELECT * FROM jobs WHERE status = 'succeeded' AND fine_tuned_model IS NOT NULL AND model_deleted = 0"
        if project is None:
            return self._all(sql + " ORDER BY seq")
        return self._all(sql + " AND project = ? ORDER BY seq", (project,))

    def update_job(self, job_id: str, *, when: tuple[str, ...] | None = None, event: tuple | None = None,
                   holder: str | None = None, **fields: Any) -> bool:
        """Set fields (JSON-encoding dicts/lists), only if the job's status is in ``when`` (if given) and, with
        ``holder``, only while that worker holds it; add ``event`` = (level, type, message[, data]) in the same
        transaction. True if the row changed."""
        sets = ", ".join(f"{k} = ?" for k in fields)
        args = [_encode(k, v) for k, v in fields.items()]
        sql = f"UPDATE jobs SET {sets} WHERE id = ?"
        args.append(job_id)
        if when:
            sql += f" AND status IN ({','.join('?' * len(when))})"
            args += list(when)
        if holder is not None:
            sql += " AND worker_id = ?"
            args.append(holder)
        with self.tx():
            changed = self.x(sql, args).rowcount > 0 if fields else True
            if changed and event is not None:
                self._event(job_id, *event)
        return changed

    def claim(self, job_id: str, from_status: str, to_status: str, **fields: Any) -> bool:
        """Atomically move a job between statuses (compare-and-set); False if someone else moved it."""
        return self.update_job(job_id, when=(from_status,), status=to_status, **fields)

    # ------------------------------------------------------------ leases: workers on any machine

    def claim_next(self, worker_id: str, lease_s: float, *, max_attempts: int, on_interrupt: str = "resume",
                   pid: int | None = None) -> dict | None:
        """Take the oldest job to run: a queued one, or a running one whose worker's lease expired (its machine or
        process died); the latter resumes from its newest checkpoint, or fails when its starts are used up (or
        ``on_interrupt`` is fail), and the search goes on. Returns the claimed job (now `running`, held by
        ``worker_id`` until ``lease_s`` from now unless renewed), or None."""
        while True:
            with self.tx():
                row = self.x(f"SELECT id, status, attempts, worker_id FROM jobs WHERE status = 'queued' OR "
                             f"(status = 'running' AND lease_expires_at < {self.clock}) ORDER BY seq LIMIT 1"
                             f"{self.skip_locked}").fetchone()
                if row is None:
                    return None
                job_id, expired = row["id"], row["status"] == "running"
                if expired and (on_interrupt == "fail" or row["attempts"] >= max_attempts):
                    why = (f"the worker {row['worker_id']} stopped renewing its lease (its process or machine died)"
                           + (f", after {row['attempts']} starts (limit {max_attempts})" if on_interrupt != "fail"
                              else ""))
                    self.x("UPDATE jobs SET status = 'failed', finished_at = ?, worker_id = NULL, worker_pid = NULL, "
                           "estimated_finish = NULL, error = ? WHERE id = ?",
                           (now(), json.dumps({"code": "job_interrupted", "message": why, "param": None}), job_id))
                    self._event(job_id, "error", "message", f"Job failed: {why}")
                    continue
                self.x(f"UPDATE jobs SET status = 'running', attempts = attempts + 1, worker_id = ?, worker_pid = ?, "
                       f"lease_expires_at = {self.clock} + ?, started_at = COALESCE(started_at, ?), "
                       f"estimated_finish = NULL WHERE id = ?", (worker_id, pid, float(lease_s), now(), job_id))
                if expired:
                    self._event(job_id, "warn", "message", f"the worker {row['worker_id']} stopped renewing its lease "
                                "(its process or machine died); the job will resume from its newest checkpoint")
            return self.get_job(job_id)

    def renew_leases(self, worker_id: str, job_ids: list[str], lease_s: float) -> set[str]:
        """Extend this worker's leases; returns the job ids it still holds (a job cancelled, paused, or taken over
        after a lease lapsed is no longer held)."""
        if not job_ids:
            return set()
        marks = ",".join("?" * len(job_ids))
        with self.tx():
            self.x(f"UPDATE jobs SET lease_expires_at = {self.clock} + ? WHERE worker_id = ? AND status = 'running' "
                   f"AND id IN ({marks})", (float(lease_s), worker_id, *job_ids))
            rows = self.x(f"SELECT id FROM jobs WHERE worker_id = ? AND status = 'running' AND id IN ({marks})",
                          (worker_id, *job_ids)).fetchall()
        return {r["id"] for r in rows}

    def running_held_by(self, worker_prefix: str) -> list[dict]:
        return self._all("SELECT * FROM jobs WHERE status = 'running' AND worker_id LIKE ? ORDER BY seq",
                         (worker_prefix + "%",))

    # ------------------------------------------------------------ events and checkpoints

    def add_event(self, job_id: str, level: str, type_: str, message: str, data: dict | None = None) -> None:
        with self.tx():
            self._event(job_id, level, type_, message, data)

    def _event(self, job_id: str, level: str, type_: str, message: str, data: dict | None = None) -> None:
        self.x("INSERT INTO events (id, job_id, created_at, level, type, message, data) VALUES (?, ?, ?, ?, ?, ?, ?)",
               (new_id("ftevent-"), job_id, now(), level, type_, message,
                json.dumps(data, default=str) if data is not None else None))

    def list_events(self, job_id: str, *, after: str | None, limit: int) -> tuple[list[dict], bool]:
        return self._page("events", ["job_id = ?"], [job_id], after, limit, newest_first=True)

    def events_since(self, job_id: str, seq: int, limit: int = 5000) -> list[dict]:
        """Oldest first, for the dashboard's incremental loss curve."""
        return self._all("SELECT * FROM events WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?", (job_id, seq, limit))

    def metric_events(self, job_id: str) -> list[dict]:
        return self._all("SELECT * FROM events WHERE job_id = ? AND type = 'metrics' ORDER BY seq", (job_id,))

    def add_checkpoint(self, row: dict, event: tuple) -> None:
        """A checkpoint saved again at the same step (a resumed run) replaces the earlier row."""
        with self.tx():
            self.x("DELETE FROM checkpoints WHERE job_id = ? AND step = ?", (row["job_id"], row["step"]))
            _insert(self, "checkpoints", row)
            self._event(row["job_id"], *event)

    def list_checkpoints(self, job_id: str) -> list[dict]:
        return self._all("SELECT * FROM checkpoints WHERE job_id = ? ORDER BY seq DESC", (job_id,))

    # ------------------------------------------------------------ cursor pages

    def _page(self, table: str, where: list[str], args: list, after: str | None, limit: int,
              newest_first: bool) -> tuple[list[dict], bool]:
        """One page, cursor ``after`` = the id of the last item of the previous page; has_more by limit+1."""
        where, args = list(where), list(args)
        if after:
            row = self.x(f"SELECT seq FROM {table} WHERE id = ?", (after,)).fetchone()
            if row is None:
                raise UnknownCursor(after)
            where.append("seq < ?" if newest_first else "seq > ?")
            args.append(row["seq"])
        sql = f"SELECT * FROM {table}" + (f" WHERE {' AND '.join(where)}" if where else "")
        sql += f" ORDER BY seq {'DESC' if newest_first else 'ASC'} LIMIT ?"
        rows = self._all(sql, (*args, limit + 1))
        return rows[:limit], len(rows) > limit


class IdempotencyConflict(Exception):
    """The same Idempotency-Key was sent with a different request body."""


class UnknownCursor(Exception):
    """A pagination cursor (``after``) that names no item."""


class QuotaExceeded(Exception):
    """A project already has as many unfinished jobs as its quota allows."""


def _insert(store: Store, table: str, row: dict) -> None:
    cols = ", ".join(row)
    store.x(f"INSERT INTO {table} ({cols}) VALUES ({', '.join('?' * len(row))})",
            [_encode(k, v) for k, v in row.items()])


def _encode(key: str, value: Any) -> Any:
    return json.dumps(value, default=str) if key in _JSON_COLUMNS and value is not None else value


def _decode(row) -> dict:
    d = dict(row)
    for k in _JSON_COLUMNS & d.keys():
        if d[k] is not None:
            d[k] = json.loads(d[k])
    return d
