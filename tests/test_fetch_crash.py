"""A worker killed with SIGKILL at random points of a large fetch, then
restarted: every message is stored and becomes an incident exactly once."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from models import Incident, RemoteKey, StoredMessage, db, utcnow
from tests.support.browser import ROOT, worker_env
from tests.test_fetch import append_many, imap_connection, make_mail  # noqa: F401  (fixture)

LOCK_SECONDS = 2


@pytest.mark.slow
def test_worker_killed_at_random_points_then_restarted_every_message_once(
        imap_connection, dovecot, app_config, run_jobs, monkeypatch):  # noqa: F811
    import datetime as dt

    from jobs import fetch, process
    from services import runtime

    n = 400
    conn = imap_connection()
    append_many(dovecot, conn.user, [make_mail(i) for i in range(n)])
    env = worker_env(app_config)
    env["FETCH_LOCK_SECONDS"] = str(LOCK_SECONDS)
    rng = random.Random(20261130)
    kills = 0
    for _ in range(6):
        worker = subprocess.Popen([sys.executable, "worker.py"], cwd=ROOT, env=env, start_new_session=True,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        fetch.enqueue(conn.id)
        time.sleep(rng.uniform(0.8, 2.5))  # somewhere in start-up, listing, fetching or processing
        os.killpg(worker.pid, signal.SIGKILL)  # the worker and its work horse, no clean-up
        worker.wait()
        kills += 1
        time.sleep(LOCK_SECONDS + 0.3)  # the dead worker's fetch lock expires
    assert kills >= 5
    # The dead workers' jobs stay "started" until RQ's registry clean-up
    # notices their heartbeats stopped (minutes); the restarted worker
    # does not wait for that, and neither does this test.
    from rq.registry import StartedJobRegistry

    from services import queue
    for name in queue.QUEUE_NAMES:
        queue.connection().delete(StartedJobRegistry(name, connection=queue.connection()).key)
    # Restarted: fetch until the folder is empty, re-queue what the dead workers dropped, process it all.
    monkeypatch.setitem(runtime.config(), "FETCH_LOCK_SECONDS", LOCK_SECONDS)
    for _ in range(10):
        result = fetch.fetch(conn.id)
        if result.get("listed") == 0:
            break
    with db.connection_context():
        process.enqueue_stale(0, now=utcnow() + dt.timedelta(seconds=1))
    run_jobs()
    with db.connection_context():
        msgs = list(StoredMessage.select().where(StoredMessage.connection == conn.id))
        incidents = Incident.select().where(Incident.organization == conn.organization_id).count()
        keys = RemoteKey.select().where(RemoteKey.connection == conn.id).count()
    ids = [m.message_id for m in msgs]
    assert len(msgs) == n and len(set(ids)) == n  # every message stored exactly once
    assert all(m.state == "processed" for m in msgs)
    assert incidents == n  # and exactly one incident each
    assert keys == n
    assert dovecot.unseen(conn.user) == []
