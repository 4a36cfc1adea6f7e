"""The processing jobs: parse, store, route captured emails."""
from __future__ import annotations

import logging

from ingest.process import process as process_message
from ingest.process import process_many
from ingest.store import RawStore
from models import db
from services import queue, runtime

log = logging.getLogger(__name__)

# Emails per processing job. Each job costs a fork, RQ's bookkeeping (about
# 15 ms) and a database connection; 50 emails (~0.2 s of work) amortise
# that, and are still few enough that both workers share the tail of a fetch.
BATCH = 50


def run(message_id: int, force: bool = False) -> str:
    with db.connection_context():
        return process_message(message_id, RawStore(runtime.config()["DATA_DIR"]), force=force)


def run_many(message_ids: list[int]) -> dict:
    """Process a batch in one job: RQ forks once per job, which costs more
    than processing a typical email, and the batch is written with a few
    statements in one transaction. A message whose processing raises is
    given its own job (with RQ's retries); the rest of the batch goes on."""
    outcomes: dict[str, int] = {}
    store = RawStore(runtime.config()["DATA_DIR"])
    with db.connection_context():
        try:
            results = process_many(message_ids, store)
        except Exception as e:  # the batch could not even be read: each email on its own, as one at a time
            log.exception("Processing a batch of %d emails failed; each gets a job of its own", len(message_ids))
            results = dict.fromkeys(message_ids, e)
        for mid, outcome in results.items():
            if isinstance(outcome, Exception):
                log.error("Processing message %s failed; it gets a job of its own", mid, exc_info=outcome)
                enqueue(mid)
                outcome = "retrying"
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    return outcomes


class Batcher:
    """Collects ids as capture stores them and queues them in batches, so
    processing starts while capture goes on. `flush()` queues the rest."""

    def __init__(self, size: int = BATCH):
        self.size, self.ids = size, []

    def add(self, message_id: int) -> None:
        self.ids.append(message_id)
        if len(self.ids) >= self.size:
            self.flush()

    def flush(self) -> None:
        if self.ids:
            ids, self.ids = self.ids, []
            queue.queue("process").enqueue(run_many, ids, job_timeout=1800, result_ttl=600,
                                           failure_ttl=7 * 24 * 3600,
                                           description=f"Process {len(ids)} emails")


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
