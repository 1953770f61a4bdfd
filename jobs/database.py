"""The database that holds job records: SQLite on one host, PostgreSQL for several.

`FINEPRUNE_DATABASE_URL` (a SQLAlchemy URL) chooses it; unset, records live in
`state/jobs.sqlite` beside the embedded broker. The tables are few and small: a job's row
carries its full record as JSON plus the columns that listings, counts, recovery and retention
filter on, each behind an index, so none of them reads every record.

SQLite runs in WAL mode (readers never wait for the writer) with a generous busy timeout; its
record locks are per-job file locks (one host by construction). PostgreSQL locks the job's row.
"""

from __future__ import annotations

import logging
import os
import weakref
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Engine,
    Float,
    Index,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
)
from sqlalchemy.engine import make_url

log = logging.getLogger(__name__)

metadata = MetaData()

jobs_table = Table(
    "fineprune_jobs",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("owner", String(64), nullable=False),
    Column("state", String(16), nullable=False),
    Column("created_us", BigInteger, nullable=False),  # microseconds since the epoch
    Column("finished_us", BigInteger, nullable=True),
    Column("artifacts_deleted", Boolean, nullable=False, default=False),
    Column("cancel_requested", Boolean, nullable=False, default=False),
    Column("record", Text, nullable=False),  # JobRecord as JSON: the truth; columns index it
    Index("fineprune_jobs_owner_created", "owner", "created_us", "id"),
    Index("fineprune_jobs_state", "state"),
    Index("fineprune_jobs_finished", "finished_us"),
)

idempotency_table = Table(
    "fineprune_idempotency",
    metadata,
    Column("owner", String(64), primary_key=True),
    Column("key_hash", String(64), primary_key=True),
    Column("job_id", String(32), nullable=False),
    Column("payload_hash", String(64), nullable=False),
)

stage_seconds_table = Table(
    "fineprune_stage_seconds",
    metadata,
    Column("job_id", String(32), primary_key=True),
    Column("stage", String(32), primary_key=True),
    Column("seconds", Float, nullable=False),
    Index("fineprune_stage_seconds_stage", "stage"),
)

_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{Path(path).resolve()}"


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def make_engine(url: str) -> Engine:
    """An engine for `url`, tuned for many short transactions from several processes."""
    kwargs: dict[str, Any] = {}
    if is_sqlite(url):
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"timeout": 30.0}
    else:
        kwargs["pool_pre_ping"] = True  # a restarted server must not fail the next request
    engine = create_engine(url, **kwargs)
    if is_sqlite(url):
        event.listen(engine, "connect", _sqlite_pragmas)
    _ENGINES.add(engine)
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer, nor it them
    cursor.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; WAL keeps it safe
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def create_schema(engine: Engine) -> None:
    """Create the tables and indexes that are missing (idempotent, safe to race)."""
    try:
        metadata.create_all(engine, checkfirst=True)
    except Exception:
        # Two processes starting together: the loser's CREATE fails on what the winner made.
        metadata.create_all(engine, checkfirst=True)


def _after_fork_in_child() -> None:
    """A forked process (Celery's pool) must not reuse its parent's connections."""
    for engine in list(_ENGINES):
        engine.dispose(close=False)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
