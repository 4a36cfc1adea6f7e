"""The peewee database, opened from DATABASE_URL, with migrations applied."""
from __future__ import annotations

import logging
from pathlib import Path

from playhouse import migrations
from playhouse.db_url import connect

from models.base import db

log = logging.getLogger(__name__)
MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "models" / "migrations"

SQLITE_PRAGMAS = {
    "journal_mode": "wal",
    "foreign_keys": 1,
    "busy_timeout": 10000,
    # FULL: a commit is on disk before it returns. Capture marks mail read on
    # the server right after committing its rows; with NORMAL (WAL) a power
    # cut could lose rows of mail already marked read.
    "synchronous": "full",
}


def open_database(url: str, *, pooled: bool = False):
    """`pooled`: keep SQLite connections open between uses (the web app).
    Opening one per request, and closing it, cost about a third of a small
    request: the pragmas, and SQLite checkpointing and deleting the WAL
    whenever the last connection to the file closes. Only for processes
    that do not fork after using the database (a child must not use its
    parent's SQLite connection): workers fork a child per job, so they
    connect per use. PostgreSQL connects per use everywhere: a pooled
    connection would outlive a restart of the server and fail a request."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # BEGIN IMMEDIATE: a transaction takes the write lock up front and
        # waits for it (busy_timeout). A deferred one that reads and then
        # writes fails at once with "database is locked" when another worker
        # committed in between (WAL snapshot), so workers could not share it.
        if pooled and path and path != ":memory:":  # each connection to :memory: is a database of its own
            # A connection goes back to the pool at the end of a request and
            # may be taken by another thread next (one thread at a time);
            # one left in a transaction is rolled back first (the pool does).
            database = connect("sqlite+pool" + url[len("sqlite"):], pragmas=SQLITE_PRAGMAS,
                               lock_type="IMMEDIATE", check_same_thread=False, max_connections=64,
                               timeout=10)  # waiting for a free pooled connection; busy_timeout is a pragma
        else:
            database = connect(url, pragmas=SQLITE_PRAGMAS, timeout=10, lock_type="IMMEDIATE")
    else:
        database = connect(url, unquote_password=True)
    db.initialize(database)
    return database


def release_connections() -> None:
    """Close every pooled connection (none are in use): before a server
    forks its workers from this process, so none inherits an open one."""
    close_all = getattr(db.obj, "close_all", None)
    if close_all is not None:
        close_all()


def migrate() -> list[str]:
    """Apply pending migrations; returns the names applied."""
    with db.connection_context():
        applied = migrations.run(db.obj, str(MIGRATIONS_DIR)) or []
    if applied:
        log.info("Applied database migrations: %s", ", ".join(applied))
    return applied
