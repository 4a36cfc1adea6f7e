"""Fetching a connection: scheduled, on demand, and as a dry run.

Never two fetches of one connection at once: the scheduler claims a due
connection with a compare-and-set on next_fetch_at, the job id is unique
per connection, and the job itself holds a Redis lock (which also covers
workers on other hosts)."""
from __future__ import annotations

import datetime as dt
import logging
import tempfile

from rq import get_current_job
from rq.exceptions import NoSuchJobError
from rq.job import Job

from connectors.errors import AUTH_CODES, ConnectorError, Diagnosis
from ingest.capture import capture
from ingest.store import RawStore
from models import EmailConnection, FetchRun, db, utcnow
from services import queue, runtime

from .connect import open_session

log = logging.getLogger(__name__)
FETCH_JOB_TIMEOUT = 30 * 60
PAUSE_AFTER_AUTH_FAILURES = 3
MAX_BACKOFF_SECONDS = 3600


def job_id(connection_id: int) -> str:
    return f"fetch-{connection_id}"


def lock_key(connection_id: int) -> str:
    return f"intake:fetch-lock:{connection_id}"


def _lock_seconds() -> int:
    # Short, and extended while the fetch makes progress: a worker killed
    # mid-fetch blocks its connection for at most this long.
    return int(runtime.config().get("FETCH_LOCK_SECONDS", 120))


def enqueue(connection_id: int) -> Job | None:
    """Queue a fetch unless one is already queued or running."""
    q = queue.queue("fetch")
    jid = job_id(connection_id)
    try:
        existing = Job.fetch(jid, connection=queue.connection())
        status = getattr(existing.get_status(refresh=True), "value", existing.get_status())
        if status in ("queued", "deferred", "scheduled"):
            return None
        if status == "started" and queue.connection().exists(lock_key(connection_id)):
            return None  # running now
        existing.delete()  # finished, failed, or orphaned by a killed worker (its lock expired)
    except NoSuchJobError:
        pass
    return q.enqueue(fetch, connection_id, job_id=jid, job_timeout=FETCH_JOB_TIMEOUT, result_ttl=600,
                     failure_ttl=24 * 3600, description=f"Fetch connection {connection_id}")


def due(now: dt.datetime):
    """Enabled, working connections whose next fetch has come."""
    return (EmailConnection.select(EmailConnection.id, EmailConnection.fetch_interval, EmailConnection.next_fetch_at)
            .where(EmailConnection.enabled & (EmailConnection.status.not_in(["paused", "never", "grant"]))
                   & (EmailConnection.next_fetch_at <= now)))


def enqueue_due(now: dt.datetime | None = None) -> int:
    """Claim and queue every due connection."""
    now = now or utcnow()
    n = 0
    for c in list(due(now)):  # read all first: SQLite cannot write while this read is open
        # Compare-and-set: of several schedulers, exactly one moves the time on.
        claimed = (EmailConnection.update(next_fetch_at=now + dt.timedelta(seconds=max(c.fetch_interval, 15)))
                   .where((EmailConnection.id == c.id) & (EmailConnection.next_fetch_at == c.next_fetch_at))
                   .execute())
        if claimed and enqueue(c.id) is not None:
            n += 1
    return n


def fetch(connection_id: int, enqueue_processing: bool = True) -> dict:
    with db.connection_context():
        conn = EmailConnection.get_or_none(EmailConnection.id == connection_id)
        if conn is None:
            return {"skipped": "deleted"}
        lock = queue.connection().lock(lock_key(connection_id), timeout=_lock_seconds(), blocking=False)
        if not lock.acquire(blocking=False):
            log.info("Fetch of %s skipped: another fetch is running", conn.api_name)
            return {"skipped": "running"}
        try:
            return _fetch_locked(conn, enqueue_processing, keepalive=_keepalive(lock))
        finally:
            try:
                lock.release()
            except Exception:  # expired: nothing to release
                pass


def _keepalive(lock):
    """Extend the lock at most every few seconds while capture progresses
    (called for every message and every piece of a large one: cheap)."""
    import time

    every = max(1, _lock_seconds() // 4)
    last = [time.monotonic()]

    def beat() -> None:
        now = time.monotonic()
        if now - last[0] >= every:
            lock.reacquire()
            last[0] = now
    return beat


def _fetch_locked(conn: EmailConnection, enqueue_processing: bool = True, keepalive=lambda: None) -> dict:
    run = FetchRun.create(connection=conn)
    store = RawStore(runtime.config()["DATA_DIR"])
    from . import process

    batcher = process.Batcher()
    on_stored = batcher.add if enqueue_processing else (lambda message_id: None)
    try:
        session = open_session(conn.stored_values(), lambda step: None)
        with session.connector as c:
            result = capture(c, conn, store, keepalive=keepalive, on_stored=on_stored)
        cache = session.new_token_cache()
        if cache is not None:
            conn.oauth_token_cache = cache
            conn.oauth_last_refresh_at = utcnow()
        conn.oauth_token_expires_at = session.token_expires_at() or conn.oauth_token_expires_at
    except ConnectorError as e:
        return _failed(conn, run, e.diagnosis)
    except Exception as e:
        log.exception("Unexpected error fetching %s", conn.api_name)
        return _failed(conn, run, Diagnosis("unexpected", f"Unexpected error: {e.__class__.__name__}: {e}",
                                            "See the log file."))
    finally:
        batcher.flush()  # what was stored before a failure is processed too
    now = utcnow()
    run.listed, run.stored, run.duplicates, run.quarantined = (result.listed, result.stored, result.duplicates,
                                                               result.quarantined)
    run.finished_at = now
    run.save()
    EmailConnection.update(
        last_fetch_at=now, next_fetch_at=now + dt.timedelta(seconds=conn.fetch_interval),
        messages_total=EmailConnection.messages_total + result.stored, messages_last_run=result.stored,
        consecutive_failures=0, last_error="", last_error_code="", status="ok",
        oauth_token_cache=conn.oauth_token_cache, oauth_last_refresh_at=conn.oauth_last_refresh_at,
        oauth_token_expires_at=conn.oauth_token_expires_at,
    ).where(EmailConnection.id == conn.id).execute()
    if result.stored or result.quarantined:
        conn.log("info", f"Fetched {result.stored} new email(s)"
                 + (f", {result.quarantined} sent to quarantine" if result.quarantined else "")
                 + (f", {result.duplicates} already stored" if result.duplicates else "") + ".", _job_id())
    return {"listed": result.listed, "stored": result.stored, "duplicates": result.duplicates,
            "quarantined": result.quarantined, "new_message_ids": result.new_message_ids}


def _failed(conn: EmailConnection, run: FetchRun, d: Diagnosis) -> dict:
    failures = conn.consecutive_failures + 1
    now = utcnow()
    status, wait = "failing", min(conn.fetch_interval * (2 ** min(failures, 10)), MAX_BACKOFF_SECONDS)
    if d.retry_after:
        wait = max(wait, d.retry_after)
    notice = ""
    if d.code == "grant_expired":
        status, notice = "grant", " Fetching is paused until someone presses Grant Access again."
    elif d.code in AUTH_CODES and failures >= PAUSE_AFTER_AUTH_FAILURES:
        status = "paused"
        notice = (f" Fetching is paused after {failures} failed sign-ins so the account is not locked out. "
                  "Fix the credentials and press Test and Save Connection, or Enable.")
    EmailConnection.update(
        status=status, consecutive_failures=failures, last_error=(d.message + notice)[:2000],
        last_error_code=d.code, last_fetch_at=now, next_fetch_at=now + dt.timedelta(seconds=wait),
    ).where(EmailConnection.id == conn.id).execute()
    run.error, run.finished_at = d.message, now
    run.save()
    conn.log("error", f"Fetch failed: {d.message} {d.hint}{notice}".strip(), _job_id())
    log.warning("Fetch of %s failed [%s]: %s", conn.api_name, d.code, d.message)
    return {"error": d.to_dict()}


def dry_run(connection_id: int, limit: int = 10) -> list[dict]:
    """The next `limit` unread messages and what would happen to each;
    nothing is stored and nothing is marked read."""
    from ingest.parse import ParseError, parse_file
    from ingest.process import format_address
    from ingest.route import preview_route

    with db.connection_context():
        conn = EmailConnection.get_by_id(connection_id)
        session = open_session(conn.stored_values(), lambda step: None)
        out = []
        with session.connector as c:
            for ref in c.list_unread(limit):
                with tempfile.NamedTemporaryFile(suffix=".eml") as tmp:
                    c.fetch_raw(ref, tmp)
                    tmp.flush()
                    size = tmp.tell()
                    item = {"key": ref.key, "size": size}
                    if size > conn.max_message_size:
                        item.update(subject="", sender="", action="quarantine: too large")
                    else:
                        try:
                            parsed = parse_file(tmp.name)
                            item.update(subject=parsed.subject, sender=format_address(parsed.from_),
                                        action=preview_route(conn, parsed))
                        except ParseError as e:
                            item.update(subject="", sender="", action=f"quarantine: {e}")
                    out.append(item)
        return out


def _job_id() -> str:
    job = get_current_job()
    return job.id if job else ""
