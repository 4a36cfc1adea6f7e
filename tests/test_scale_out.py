"""Scale-out: two `worker.py` processes and two `worker.py scheduler`
processes on one Redis and one database, 200 IMAP connections due at once on
a short interval. Every message is stored exactly once and becomes exactly
one incident, no connection is ever fetched by two workers at the same time,
and both workers do fetches.

The processes run exactly as in production (`python worker.py [scheduler]`);
they get a Redis database of their own, so a worker left running by the
browser tests cannot take their jobs. Runs on SQLite and on PostgreSQL
(TEST_DATABASE_URL)."""
from __future__ import annotations

import datetime as dt
import email.message
import subprocess
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from models import EmailConnection, FetchRun, Incident, RemoteKey, StoredMessage, db, utcnow
from tests.support.browser import ROOT, worker_env

CONNECTIONS = 200
MESSAGES_EACH = 3
INTERVAL = 15  # seconds: the shortest fetch interval the form allows
REDIS_DB = 7  # the worker processes' own Redis database (see the module docstring)
REARM_AT = (0.25, 0.67)  # fractions of the messages stored when all connections are made due again
DEADLINE = 150  # seconds; the run takes 20-60 s (an idle or a busy machine)


def _mail(user: str, i: int) -> bytes:
    m = email.message.EmailMessage()
    m["From"] = "reporter@example.com"
    m["To"] = user
    m["Subject"] = f"Suspicious {user} #{i}"
    m["Message-ID"] = f"<scale-{i}-{user}>"
    m["Date"] = "Mon, 30 Nov 2026 03:00:00 +0000"
    m.set_content(f"Please look at http://bad-{i}.example.net/{user} now.\n")
    return bytes(m)


def _redis_url(base: str, number: int) -> str:
    return f"{base}{'&' if '?' in base else '?'}db={number}"


@pytest.fixture
def scale_app(app, app_config, redis_url):
    """The app on the workers' Redis database (after `app`, which configures
    the suite's); the suite's is restored after."""
    from app import create_app

    cfg = dict(app_config, REDIS_URL=_redis_url(redis_url, REDIS_DB))
    r = redis.Redis.from_url(cfg["REDIS_URL"])
    r.flushdb()
    app = create_app(cfg)
    app.redis = r
    yield app
    r.flushdb()
    create_app(dict(app_config))


class Processes:
    """`python worker.py ...` children, stopped (SIGTERM, then SIGKILL) at the end."""

    def __init__(self, env: dict):
        self.env, self.procs = env, []

    def start(self, *args: str) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "worker.py", *args], cwd=ROOT, env=self.env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(p)
        return p

    @staticmethod
    def stop(procs) -> None:
        for p in procs:
            if p.poll() is None:
                p.terminate()  # RQ's warm shutdown: the current job finishes first
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)

    def stop_all(self) -> None:
        self.stop(self.procs)


def _overlaps(runs: list[tuple[dt.datetime, dt.datetime]]) -> list:
    runs = sorted(runs)
    return [(a, b) for a, b in zip(runs, runs[1:]) if b[0] < a[1]]


@pytest.mark.slow
def test_two_workers_and_two_schedulers_fetch_200_connections_once_each(scale_app, app_config, make_admin, dovecot):
    t0 = time.monotonic()
    # -- 200 mailboxes with a few unread messages each, and their connections
    users = [dovecot.add_user() for _ in range(CONNECTIONS)]

    def fill(user_pw):
        with dovecot.client(user_pw[0]) as c:
            for i in range(MESSAGES_EACH):
                c.append("INBOX", _mail(user_pw[0], i))
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(fill, users))
    _, _, org = make_admin()
    now = utcnow()
    with db.connection_context():
        with db.atomic():
            conns = [EmailConnection.create(
                organization=org, name=f"Reports {i}", api_name=f"Reports_{i}", protocol="imap",
                host=dovecot.host, port=dovecot.plain_port, encryption="none", email_address=user,
                password=pw, status="ok", fetch_interval=INTERVAL, next_fetch_at=now - dt.timedelta(seconds=1))
                for i, (user, pw) in enumerate(users)]
    ids = [c.id for c in conns]
    setup_s = time.monotonic() - t0
    try:
        total_runs, extra_claims, fetched_by, run_s = _run(scale_app, app_config, dovecot, org, ids, users)
    finally:
        with db.connection_context():  # leave nothing due for later tests
            EmailConnection.update(enabled=False).where(EmailConnection.id.in_(ids)).execute()
    print(f"\nscale-out: setup {setup_s:.1f}s, {run_s}, {total_runs} fetch runs for {CONNECTIONS} "
          f"connections, fetches queued by the extra schedulers {extra_claims}, fetches per worker {dict(fetched_by)}")


def _run(scale_app, app_config, dovecot, org, ids, users):
    from rq import Queue, Worker
    from rq.job import Job
    from rq.registry import StartedJobRegistry
    from rq.results import Result

    from jobs.fetch import enqueue_due, job_id

    env = worker_env(dict(app_config, REDIS_URL=scale_app.config["REDIS_URL"]))
    procs = Processes(env)
    try:
        workers = [procs.start(), procs.start()]
        schedulers = [procs.start("scheduler"), procs.start("scheduler")]

        def mine() -> dict[str, int]:
            return {w.name: w.pid for w in Worker.all(connection=scale_app.redis)}

        # Both schedulers tick at once on start and race for the same 200
        # connections. While the first round runs, everything is made due
        # again twice and two more (in-process) schedulers claim at once:
        # the situations where a connection could be fetched twice.
        def claim_twice():
            done = []

            def one():
                with db.connection_context():
                    done.append(enqueue_due())
            threads = [threading.Thread(target=one) for _ in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return done

        names: dict[str, int] = {}
        rearmed, extra_claims = 0, []
        start = time.monotonic()
        total = CONNECTIONS * MESSAGES_EACH

        def count(*where) -> int:
            with db.connection_context():
                return StoredMessage.select().where((StoredMessage.organization == org.id), *where).count()

        def wait(what: str, done) -> None:
            while not done():
                for p in procs.procs:
                    if p in workers or p in schedulers_running:
                        assert p.poll() is None, f"worker.py exited with {p.returncode}; see {app_config['LOG_FILE']}"
                names.update({n: pid for n, pid in mine().items() if pid in {w.pid for w in workers}})
                assert time.monotonic() - start < DEADLINE, f"{what}: only {count()} stored, " \
                    f"{count(StoredMessage.state == 'processed')} processed of {total}"
                time.sleep(0.25)

        def stored_all() -> bool:
            # Everything due again when a quarter and when two thirds are
            # stored: some fetches are then finished, some running, some queued.
            nonlocal rearmed
            stored = count()
            if rearmed < len(REARM_AT) and stored >= REARM_AT[rearmed] * total:
                with db.connection_context():
                    EmailConnection.update(next_fetch_at=utcnow() - dt.timedelta(seconds=1)).where(
                        EmailConnection.id.in_(ids)).execute()
                extra_claims.extend(claim_twice())
                rearmed += 1
            return rearmed == len(REARM_AT) and stored >= total

        fetch_q = Queue("fetch", connection=scale_app.redis)
        schedulers_running = list(schedulers)
        # Phase 1: the schedulers keep claiming (every connection is due
        # again 15 s after its fetch) until every message is stored.
        wait("storing", stored_all)
        stored_s = time.monotonic() - start
        # Phase 2: no more claims; the fetches already queued or running
        # finish, and processing (queued behind fetches) catches up.
        Processes.stop(schedulers)
        schedulers_running.clear()
        wait("processing", lambda: count(StoredMessage.state == "processed") >= total
             and not fetch_q.count and not StartedJobRegistry(queue=fetch_q).count)
        run_s = time.monotonic() - start
        assert len(names) == 2, f"both worker processes registered with RQ: {names}"
    finally:
        procs.stop_all()
    for p in procs.procs:
        assert p.returncode == 0, f"a worker.py process exited with {p.returncode}"

    with db.connection_context():
        # -- every message stored exactly once, one incident each
        msgs = list(StoredMessage.select().where(StoredMessage.organization == org.id))
        per_conn = defaultdict(list)
        for m in msgs:
            per_conn[m.connection_id].append(m)
        assert len(msgs) == CONNECTIONS * MESSAGES_EACH
        assert {cid: len(ms) for cid, ms in per_conn.items()} == {cid: MESSAGES_EACH for cid in ids}
        assert len({(m.connection_id, m.content_hash) for m in msgs}) == len(msgs)
        assert len({m.message_id for m in msgs}) == len(msgs)
        assert all(m.state == "processed" for m in msgs), {m.state for m in msgs}
        assert RemoteKey.select().where(RemoteKey.connection.in_(ids)).count() == len(msgs)
        incidents = list(Incident.select().where(Incident.organization == org.id))
        assert len(incidents) == len(msgs)
        assert sorted(i.number for i in incidents) == list(range(1, len(msgs) + 1))
        assert sorted(m.incident_id for m in msgs) == sorted(i.id for i in incidents)  # one each, none shared

        # -- no two fetches of one connection overlapped; nothing fetched twice
        runs = defaultdict(list)
        for r in FetchRun.select().where(FetchRun.connection.in_(ids)):
            assert r.finished_at is not None and not r.error, (r.connection_id, r.error)
            runs[r.connection_id].append(r)
        assert set(runs) == set(ids)
        for cid, rs in runs.items():
            assert not _overlaps([(r.started_at, r.finished_at) for r in rs]), f"connection {cid}: overlapping fetches"
            assert sum(r.stored for r in rs) == MESSAGES_EACH and sum(r.duplicates for r in rs) == 0, cid
        total_runs = sum(len(rs) for rs in runs.values())
    for user, _ in users[:: CONNECTIONS // 20]:  # a sample: all read on the server
        assert dovecot.unseen(user) == []

    # Connections were fetched again while other fetches ran: the case the lock is for.
    assert total_runs > CONNECTIONS and any(extra_claims), (total_runs, extra_claims)

    # -- both workers fetched: each fetch's result (RQ keeps them per job id) names its worker
    fetched_by, stored_by = defaultdict(int), defaultdict(int)
    for cid in ids:
        for res in Result.all(Job(job_id(cid), connection=scale_app.redis)):
            value = res.return_value if res.type == Result.Type.SUCCESSFUL else None
            assert isinstance(value, dict) and "error" not in value, (cid, res.type, value)
            if value.get("skipped") == "running":
                continue  # queued again as it started; the lock kept the second run out (no FetchRun)
            fetched_by[res.worker_name] += 1
            stored_by[res.worker_name] += value["stored"]
    assert set(fetched_by) == set(names), (dict(fetched_by), names)
    assert sum(fetched_by.values()) == total_runs and sum(stored_by.values()) == CONNECTIONS * MESSAGES_EACH
    assert min(stored_by.values()) >= CONNECTIONS * MESSAGES_EACH // 10, dict(stored_by)  # spread, not one doing it all
    return total_runs, extra_claims, fetched_by, f"{stored_s:.1f}s to store all, {run_s:.1f}s in all"
