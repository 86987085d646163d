"""The job server's state: one SQLite file (WAL mode) shared by the HTTP server and the worker processes.

    files        uploaded training/validation files (the bytes live in DATA/files/<id><ext>)
    jobs         fine-tuning jobs and their status; the resolved config overrides are frozen at creation
    events       what a job reported (messages and metrics), in order; `seq` is the cursor
    checkpoints  checkpoints a job saved
    idempotency  Idempotency-Key -> job, per API token

WAL lets the dashboard and API read while a worker writes. Every thread and process opens its own
connection (sqlite3 connections must not be shared across threads); writes that read-then-write run
inside ``BEGIN IMMEDIATE`` so two writers never interleave.
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
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    filename TEXT NOT NULL,
    stored_name TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    purpose TEXT NOT NULL,
    status TEXT NOT NULL,
    format TEXT,
    examples INTEGER,
    sha256 TEXT,
    deleted INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    created_at INTEGER NOT NULL,
    model TEXT NOT NULL,
    training_file TEXT NOT NULL,
    validation_file TEXT,
    hyperparameters TEXT NOT NULL,
    method TEXT NOT NULL,
    suffix TEXT,
    seed INTEGER NOT NULL,
    metadata TEXT,
    overrides TEXT NOT NULL,
    status TEXT NOT NULL,
    error TEXT,
    fine_tuned_model TEXT,
    started_at INTEGER,
    finished_at INTEGER,
    estimated_finish INTEGER,
    trained_tokens INTEGER,
    result_files TEXT NOT NULL DEFAULT '[]',
    attempts INTEGER NOT NULL DEFAULT 0,
    worker_pid INTEGER
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status);
CREATE INDEX IF NOT EXISTS jobs_ft_model ON jobs(fine_tuned_model);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    job_id TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    level TEXT NOT NULL,
    type TEXT NOT NULL,
    message TEXT NOT NULL,
    data TEXT
);
CREATE INDEX IF NOT EXISTS events_job ON events(job_id, seq);
CREATE TABLE IF NOT EXISTS checkpoints (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    job_id TEXT NOT NULL,
    created_at INTEGER NOT NULL,
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
    created_at INTEGER NOT NULL,
    PRIMARY KEY (token_fp, key)
);
"""

TERMINAL = ("succeeded", "failed", "cancelled")
ACTIVE = ("validating_files", "queued", "running")
_JSON_COLUMNS = {"hyperparameters", "method", "metadata", "overrides", "error", "result_files", "data", "metrics"}
_ALPHABET = string.ascii_letters + string.digits


def new_id(prefix: str, n: int = 24) -> str:
    """An opaque id like ``ftjob-3kQ...``: random, so ids reveal nothing and cannot be guessed."""
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(n))


def now() -> int:
    return int(time.time())


class Store:
    """Thin, explicit data access over the SQLite file; rows come back as plain dicts (JSON columns decoded)."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._local = threading.local()

    # ------------------------------------------------------------ connections

    def conn(self) -> sqlite3.Connection:
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

    def init(self) -> None:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.conn().executescript(SCHEMA)

    @contextlib.contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that takes the write lock up front (no read-then-upgrade deadlocks)."""
        c = self.conn()
        c.execute("BEGIN IMMEDIATE")
        try:
            yield c
        except BaseException:
            c.execute("ROLLBACK")
            raise
        c.execute("COMMIT")

    def close(self) -> None:
        c = getattr(self._local, "conn", None)
        if c is not None:
            c.close()
            self._local.conn = None

    def _one(self, sql: str, args: tuple = ()) -> dict | None:
        row = self.conn().execute(sql, args).fetchone()
        return _decode(row) if row is not None else None

    def _all(self, sql: str, args: tuple = ()) -> list[dict]:
        return [_decode(r) for r in self.conn().execute(sql, args).fetchall()]

    # ------------------------------------------------------------ files

    def add_file(self, row: dict) -> dict:
        _insert(self.conn(), "files", row)
        return self.get_file(row["id"])

    def get_file(self, file_id: str) -> dict | None:
        return self._one("SELECT * FROM files WHERE id = ? AND deleted = 0", (file_id,))

    def list_files(self, *, purpose: str | None, after: str | None, limit: int, order: str) -> tuple[list[dict], bool]:
        where, args = ["deleted = 0"], []
        if purpose:
            where.append("purpose = ?")
            args.append(purpose)
        return self._page("files", where, args, after, limit, newest_first=order != "asc")

    def delete_file(self, file_id: str) -> None:
        self.conn().execute("UPDATE files SET deleted = 1 WHERE id = ?", (file_id,))

    def file_in_use(self, file_id: str) -> str | None:
        row = self.conn().execute(
            f"SELECT id FROM jobs WHERE (training_file = ? OR validation_file = ?) AND status IN {ACTIVE} LIMIT 1",
            (file_id, file_id)).fetchone()
        return row[0] if row else None

    # ------------------------------------------------------------ jobs

    def create_job(self, row: dict, *, idem: tuple[str, str, str] | None = None,
                   events: list[str] = ()) -> tuple[dict, bool]:
        """Insert a job with its first events (info messages); with ``idem`` = (token_fp, key, request_hash), a
        key seen before returns the job it created instead. Returns (job, created)."""
        with self.tx() as c:
            if idem is not None:
                seen = c.execute("SELECT job_id, request_hash FROM idempotency WHERE token_fp = ? AND key = ?",
                                 idem[:2]).fetchone()
                if seen is not None:
                    if seen["request_hash"] != idem[2]:
                        raise IdempotencyConflict(idem[1])
                    return self.get_job(seen["job_id"]), False
            _insert(c, "jobs", row)
            if idem is not None:
                c.execute("INSERT INTO idempotency VALUES (?, ?, ?, ?, ?)", (*idem, row["id"], now()))
            for text in [f"Created fine-tuning job: {row['id']}", *events]:
                self._event(c, row["id"], "info", "message", text)
        return self.get_job(row["id"]), True

    def get_job(self, job_id: str) -> dict | None:
        return self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))

    def job_status(self, job_id: str) -> str | None:
        row = self.conn().execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row[0] if row else None

    def list_jobs(self, *, after: str | None, limit: int) -> tuple[list[dict], bool]:
        return self._page("jobs", [], [], after, limit, newest_first=True)

    def jobs_with_status(self, *statuses: str) -> list[dict]:
        marks = ",".join("?" * len(statuses))
        return self._all(f"SELECT * FROM jobs WHERE status IN ({marks}) ORDER BY seq", statuses)

    def job_by_model(self, name: str) -> dict | None:
        return self._one("SELECT * FROM jobs WHERE fine_tuned_model = ? AND status = 'succeeded'", (name,))

    def succeeded_jobs(self) -> list[dict]:
        return self._all("SELECT * FROM jobs WHERE status = 'succeeded' AND fine_tuned_model IS NOT NULL ORDER BY seq")

    def update_job(self, job_id: str, *, when: tuple[str, ...] | None = None, event: tuple | None = None,
                   **fields: Any) -> bool:
        """Set fields (JSON-encoding dicts/lists), only if the job's status is in ``when`` (if given), and
        add ``event`` = (level, type, message[, data]) in the same transaction. True if the row changed."""
        sets = ", ".join(f"{k} = ?" for k in fields)
        args = [_encode(k, v) for k, v in fields.items()]
        sql = f"UPDATE jobs SET {sets} WHERE id = ?"
        args.append(job_id)
        if when:
            sql += f" AND status IN ({','.join('?' * len(when))})"
            args += list(when)
        with self.tx() as c:
            changed = c.execute(sql, args).rowcount > 0 if fields else True
            if changed and event is not None:
                self._event(c, job_id, *event)
        return changed

    def claim(self, job_id: str, from_status: str, to_status: str, **fields: Any) -> bool:
        """Atomically move a job between statuses (compare-and-set); False if someone else moved it."""
        return self.update_job(job_id, when=(from_status,), status=to_status, **fields)

    # ------------------------------------------------------------ events and checkpoints

    def add_event(self, job_id: str, level: str, type_: str, message: str, data: dict | None = None) -> None:
        with self.tx() as c:
            self._event(c, job_id, level, type_, message, data)

    @staticmethod
    def _event(c: sqlite3.Connection, job_id: str, level: str, type_: str, message: str,
               data: dict | None = None) -> None:
        c.execute("INSERT INTO events (id, job_id, created_at, level, type, message, data) VALUES (?, ?, ?, ?, ?, ?, ?)",
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
        with self.tx() as c:
            _insert(c, "checkpoints", row)
            self._event(c, row["job_id"], *event)

    def list_checkpoints(self, job_id: str) -> list[dict]:
        return self._all("SELECT * FROM checkpoints WHERE job_id = ? ORDER BY seq DESC", (job_id,))

    # ------------------------------------------------------------ cursor pages

    def _page(self, table: str, where: list[str], args: list, after: str | None, limit: int,
              newest_first: bool) -> tuple[list[dict], bool]:
        """One page, cursor ``after`` = the id of the last item of the previous page; has_more by limit+1."""
        where, args = list(where), list(args)
        if after:
            row = self.conn().execute(f"SELECT seq FROM {table} WHERE id = ?", (after,)).fetchone()
            if row is None:
                raise UnknownCursor(after)
            where.append("seq < ?" if newest_first else "seq > ?")
            args.append(row[0])
        sql = f"SELECT * FROM {table}" + (f" WHERE {' AND '.join(where)}" if where else "")
        sql += f" ORDER BY seq {'DESC' if newest_first else 'ASC'} LIMIT ?"
        rows = self._all(sql, (*args, limit + 1))
        return rows[:limit], len(rows) > limit


class IdempotencyConflict(Exception):
    """The same Idempotency-Key was sent with a different request body."""


class UnknownCursor(Exception):
    """A pagination cursor (``after``) that names no item."""


def _insert(c: sqlite3.Connection, table: str, row: dict) -> None:
    cols = ", ".join(row)
    c.execute(f"INSERT INTO {table} ({cols}) VALUES ({', '.join('?' * len(row))})",
              [_encode(k, v) for k, v in row.items()])


def _encode(key: str, value: Any) -> Any:
    return json.dumps(value, default=str) if key in _JSON_COLUMNS and value is not None else value


def _decode(row: sqlite3.Row) -> dict:
    d = dict(row)
    for k in _JSON_COLUMNS & d.keys():
        if d[k] is not None:
            d[k] = json.loads(d[k])
    return d
