"""Intake's scheduler process: a heartbeat for /healthz, and every tick the
due work is enqueued (fetches of connections whose next_fetch_at has come,
expired drafts cleaned). State lives in the database, so a restart loses
nothing; several schedulers may run, since enqueueing is idempotent."""
from __future__ import annotations

import logging
import signal
import time

from models import ConnectionDraft, db, utcnow
from services import queue

log = logging.getLogger(__name__)
TICK_SECONDS = 5
DRAFT_MAX_AGE_SECONDS = 24 * 3600
_stop = False


def _handle_stop(*_):
    global _stop
    _stop = True


def tick(now: float | None = None) -> dict:
    """One round of scheduling; returns what it did (for tests and logs)."""
    now = now or time.time()
    r = queue.connection()
    r.set(queue.SCHEDULER_HEARTBEAT_KEY, now, ex=120)
    done = {"fetches": 0, "drafts_removed": 0, "requeued": 0}
    with db.connection_context():
        done["fetches"] = _enqueue_due_fetches()
        # Housekeeping about once a minute is plenty.
        if int(now) % 60 < TICK_SECONDS:
            from jobs.process import enqueue_stale

            done["requeued"] = enqueue_stale()
            done["drafts_removed"] = _remove_old_drafts()
    return done


def _enqueue_due_fetches() -> int:
    from jobs.fetch import enqueue_due

    return enqueue_due()


def _remove_old_drafts() -> int:
    import datetime as dt

    cutoff = utcnow() - dt.timedelta(seconds=DRAFT_MAX_AGE_SECONDS)
    return ConnectionDraft.delete().where(ConnectionDraft.created_at < cutoff).execute()


def run_forever() -> None:
    signal.signal(signal.SIGTERM, _handle_stop)
    signal.signal(signal.SIGINT, _handle_stop)
    log.info("Scheduler started (tick every %ss)", TICK_SECONDS)
    while not _stop:
        try:
            did = tick()
            if did["fetches"]:
                log.info("Enqueued %d fetches", did["fetches"])
        except Exception:  # keep scheduling through a passing Redis/DB hiccup
            log.exception("Scheduler tick failed; retrying")
        for _ in range(TICK_SECONDS * 10):
            if _stop:
                break
            time.sleep(0.1)
    log.info("Scheduler stopped")
