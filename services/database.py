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


def open_database(url: str):
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # BEGIN IMMEDIATE: a transaction takes the write lock up front and
        # waits for it (busy_timeout). A deferred one that reads and then
        # writes fails at once with "database is locked" when another worker
        # committed in between (WAL snapshot), so workers could not share it.
        database = connect(url, pragmas=SQLITE_PRAGMAS, timeout=10, lock_type="IMMEDIATE")
    else:
        database = connect(url, unquote_password=True)
    db.initialize(database)
    return database


def migrate() -> list[str]:
    """Apply pending migrations; returns the names applied."""
    with db.connection_context():
        applied = migrations.run(db.obj, str(MIGRATIONS_DIR)) or []
    if applied:
        log.info("Applied database migrations: %s", ", ".join(applied))
    return applied
