"""How processes hold their database connections: the web app keeps SQLite
connections open between requests (a pool); workers, which fork a child per
job, and everything on PostgreSQL connect per use."""
from __future__ import annotations

import sqlite3

from peewee import SqliteDatabase
from playhouse.pool import PooledDatabase

from models import Organization, db
from services import database


def test_web_requests_reuse_one_sqlite_connection_and_postgresql_connects_per_request(app, client, monkeypatch):
    if not isinstance(db.obj, SqliteDatabase):
        assert not isinstance(db.obj, PooledDatabase), "a pooled connection would outlive a server restart"
        return
    assert isinstance(db.obj, PooledDatabase)
    opened = []
    real_connect = sqlite3.connect
    monkeypatch.setattr(sqlite3, "connect", lambda *a, **kw: opened.append(a) or real_connect(*a, **kw))
    for _ in range(3):
        assert client.get("/healthz").status_code in (200, 503)
    assert len(opened) <= 1, "one connection, kept between requests"
    assert db.is_closed(), "back in the pool after each request"


def test_a_transaction_a_request_left_open_is_rolled_back_before_the_next_one(app):
    with app.test_request_context():
        app.preprocess_request()  # opens the request's connection
        db.begin()
        Organization.create(name="Half done")
        app.do_teardown_request()  # closes it without committing, as an exception would
    with db.connection_context():
        assert not Organization.select().where(Organization.name == "Half done").exists()
        with db.atomic() as tx:  # nothing holds the write lock any more
            Organization.create(name="Writable again")
            tx.rollback()


def test_workers_connect_per_use(app_config):
    """worker.py opens the database unpooled: a forked job must never get
    its parent's open SQLite connection."""
    url = app_config["DATABASE_URL"]
    try:
        assert not isinstance(database.open_database(url), PooledDatabase)
    finally:
        database.open_database(url, pooled=True)  # as the app fixture had it


def test_the_app_holds_no_connection_once_created(app_config):
    """gunicorn --preload forks its workers after create_app: none may inherit an open connection."""
    from app import create_app

    create_app(dict(app_config))
    assert db.is_closed()
    if isinstance(db.obj, PooledDatabase):
        assert not db.obj._in_use and not db.obj._connections
