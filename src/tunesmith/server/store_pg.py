"""The job server's state in PostgreSQL (psycopg 3): the store for API servers and workers on several machines.

The SQL is store.py's, written once with ``?`` placeholders; here a connection is psycopg's (one per thread,
autocommit, rows as dicts), ``?`` becomes ``%s``, a write transaction is ``conn.transaction()``, and a worker's
claim adds ``FOR UPDATE SKIP LOCKED``: two workers asking at once get different jobs, and neither waits for the
other's transaction. Lease times use the server's clock (``clock_timestamp()``), so the machines' clocks need not
agree. Tables are created at first start under an advisory lock (two processes starting together do not race).
"""

from __future__ import annotations

import contextlib
import re
import threading
from typing import Any, Iterator

from .store import INDEXES, SCHEMA, Store

_SCHEMA_LOCK = 7_305_281_119  # pg_advisory_xact_lock key: "tunesmith schema"
_PLACEHOLDER = re.compile(r"\?")


class PgStore(Store):
    kind = "postgresql"
    serial = "BIGSERIAL PRIMARY KEY"
    clock = "EXTRACT(EPOCH FROM clock_timestamp())::double precision"
    skip_locked = " FOR UPDATE SKIP LOCKED"

    def __init__(self, url: str):
        self.url = url
        self.path = url
        self._local = threading.local()

    def describe(self) -> str:
        """The URL without its password, for start-up lines and logs."""
        return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", self.url)

    def conn(self):
        c = getattr(self._local, "conn", None)
        if c is None or c.closed or c.broken:  # a database restart breaks the connection: open a new one
            import psycopg
            from psycopg.rows import dict_row

            c = psycopg.connect(self.url, autocommit=True, row_factory=dict_row, connect_timeout=30)
            self._local.conn = c
            self._local.depth = 0
        return c

    def x(self, sql: str, args: tuple | list = ()):
        # store.py's SQL has no literal % or ? besides the placeholders
        return self.conn().execute(_PLACEHOLDER.sub("%s", sql), tuple(args))

    def init(self) -> None:
        with self.conn().transaction():
            self.conn().execute(f"SELECT pg_advisory_xact_lock({_SCHEMA_LOCK})")
            self.conn().execute(SCHEMA.format(serial=self.serial))
            self.conn().execute(INDEXES)

    @contextlib.contextmanager
    def tx(self) -> Iterator[Any]:
        with self.conn().transaction():
            yield self

    def json_field(self, column: str) -> str:
        return f"({column}::jsonb ->> ?)"

