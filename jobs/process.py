"""The processing job: parse, store, route one captured email."""
from __future__ import annotations

from ingest.process import process as process_message
from ingest.store import RawStore
from models import db
from services import queue, runtime


def run(message_id: int, force: bool = False) -> str:
    with db.connection_context():
        return process_message(message_id, RawStore(runtime.config()["DATA_DIR"]), force=force)


def enqueue(message_id: int, force: bool = False):
    from rq import Retry

    # Retries cover crashes and passing errors; process() itself quarantines
    # after MAX_PROCESS_ATTEMPTS, so nothing is retried forever.
    return queue.queue("process").enqueue(run, message_id, force, job_id=f"process-{message_id}-{'r' if force else 'n'}",
                                          job_timeout=600, result_ttl=600, failure_ttl=7 * 24 * 3600,
                                          retry=Retry(max=2, interval=[5, 30]))


def enqueue_stale(older_than_seconds: int = 300, now=None) -> int:
    """Re-queue captured emails nobody is processing (their job was lost
    with a killed worker). Processing is idempotent, so a spare run is harmless."""
    import datetime as dt

    from models import StoredMessage, utcnow

    cutoff = (now or utcnow()) - dt.timedelta(seconds=older_than_seconds)
    ids = [m.id for m in StoredMessage.select(StoredMessage.id).where(
        (StoredMessage.state == "captured") & (StoredMessage.captured_at < cutoff)).limit(1000)]
    for mid in ids:
        enqueue(mid)
    return len(ids)
