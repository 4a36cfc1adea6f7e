"""Capture: unread mail from a connector into durable storage, then marked
read. The order is what makes it lossless:

  1. fetch the raw bytes into a temporary file (streamed, hashed);
  2. fsync + atomic rename to the content address;
  3. commit StoredMessage + RemoteKey in one transaction;
  4. only then mark it read on the server.

A crash between any two steps is repaired by the next run: an unread
message whose RemoteKey exists is just marked read; one whose bytes are
already stored (same SHA-256: UIDVALIDITY changed, re-delivered, marked
unread again) gets a new RemoteKey pointing at the same StoredMessage."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from peewee import chunked

from connectors.base import Connector, RemoteMessage
from connectors.errors import ConnectorError
from models import EmailConnection, RemoteKey, StoredMessage, db, write_transaction, utcnow

from .store import PendingRaw, RawStore

log = logging.getLogger(__name__)


@dataclass
class CaptureResult:
    listed: int = 0
    stored: int = 0
    duplicates: int = 0
    quarantined: int = 0
    new_message_ids: list[int] = field(default_factory=list)
    on_stored: object = field(default=lambda message_id: None, repr=False)


def capture(connector: Connector, conn: EmailConnection, store: RawStore, *, batch_size: int = 100,
            max_batches: int = 20, keepalive=lambda: None, on_stored=lambda message_id: None) -> CaptureResult:
    """Bounded: at most batch_size × max_batches messages per run.

    `keepalive` is called as messages are stored (it extends the fetch
    lock); `on_stored(id)` as soon as a message is durable and needs
    processing, so processing starts at once and is never lost when the
    run fails half way."""
    result = CaptureResult()
    result.on_stored = on_stored
    for _ in range(max_batches):
        refs = connector.list_unread(batch_size)
        if not refs:
            break
        result.listed += len(refs)
        _capture_batch(connector, conn, store, refs, result, keepalive)
        if len(refs) < batch_size:
            break
    return result


def _capture_batch(connector, conn, store, refs: list[RemoteMessage], result: CaptureResult, keepalive) -> None:
    known = {k.key for k in RemoteKey.select(RemoteKey.key).where(
        (RemoteKey.connection == conn) & (RemoteKey.key.in_([r.key for r in refs])))}
    durable: list[RemoteMessage] = [r for r in refs if r.key in known]
    result.duplicates += len(durable)  # stored by an earlier run that stopped before mark-read
    if durable:
        # That run may also have stopped before processing was queued.
        for (mid,) in (StoredMessage.select(StoredMessage.id).join(RemoteKey)
                       .where((RemoteKey.connection == conn) & (RemoteKey.key.in_([r.key for r in durable]))
                              & (StoredMessage.state == "captured")).tuples()):
            result.on_stored(mid)
    fresh = [r for r in refs if r.key not in known]
    stored: list[tuple[RemoteMessage, PendingRaw]] = []  # durable files whose rows are not yet written
    try:
        try:
            for ref, pending in _fetch_all(connector, store, fresh):
                stored.append((ref, pending))
                if len(stored) >= RECORD_GROUP:
                    _record_many(conn, stored, result)
                    durable.extend(ref for ref, _ in stored)
                    stored = []
                keepalive()
        finally:
            # Also when the batch stopped half way: what is durable gets its rows.
            if stored:
                _record_many(conn, stored, result)
                durable.extend(ref for ref, _ in stored)
                keepalive()
    finally:
        # Whatever is durable is marked read, even if the batch stopped half way.
        if durable:
            connector.mark_read(durable)
            RemoteKey.update(marked_read=True).where(
                (RemoteKey.connection == conn) & (RemoteKey.key.in_([r.key for r in durable]))).execute()


#: Files made durable together (one group commit; also bounds open files).
DURABLE_GROUP = 64
#: Messages whose rows are written in one transaction.
RECORD_GROUP = 100


def _fetch_all(connector, store: RawStore, refs: list[RemoteMessage]):
    """Yield (ref, committed PendingRaw) for each message fetched.

    IMAP can fetch many small messages in one round trip
    (`fetch_raw_batch`); other protocols fetch one by one. Either way each
    message is streamed to its own file and made durable before it is
    yielded. Batch fetches make their files durable in groups
    (`RawStore.commit_many`): one fsync wait per group instead of two per
    message, with the same guarantee for each file."""
    batch = getattr(connector, "fetch_raw_batch", None)
    if batch is not None and len(refs) > 1:
        group = _DurableGroup(store)
        error = None
        try:
            batch(refs, lambda ref: _Durable(group, ref.key))
        except ConnectorError as e:
            if e.diagnosis.code not in ("message_not_found", "message_gone"):
                error = e  # keep what was already written completely: it is made durable and marked read
        except BaseException:
            group.discard()
            raise
        group.commit()
        done = group.done
        yield from ((r, done[r.key]) for r in refs if r.key in done)
        if error is not None:
            raise error
        return
    for ref in refs:
        pending = store.begin()
        try:
            connector.fetch_raw(ref, pending.writer)
            pending.commit()
        except ConnectorError as e:
            pending.discard()
            if e.diagnosis.code in ("message_not_found", "message_gone"):
                log.info("Message %s vanished before it could be fetched", ref.key)
                continue
            raise
        except BaseException:
            pending.discard()
            raise
        yield ref, pending


class _DurableGroup:
    """Completely written files waiting to be made durable.

    Every DURABLE_GROUP files are handed to a background thread for a group
    commit while the connector goes on fetching (network and disk overlap);
    at most two groups are in flight, which bounds the open files.
    `commit()` waits for all of it; `done` then holds every durable file."""

    IN_FLIGHT = 2

    def __init__(self, store: RawStore):
        self.store = store
        self.written: list[tuple[str, PendingRaw]] = []
        self.done: dict[str, PendingRaw] = {}
        self._pool = None
        self._flying: list = []  # (written, future), oldest first

    def add(self, key: str, pending: PendingRaw) -> None:
        self.written.append((key, pending))
        if len(self.written) >= DURABLE_GROUP:
            if len(self._flying) >= self.IN_FLIGHT:
                self._land(self._flying.pop(0))
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="capture-commit")
            written, self.written = self.written, []
            self._flying.append((written, self._pool.submit(self._commit, written)))

    def _commit(self, written) -> None:
        try:
            self.store.commit_many([p for _, p in written])
        except BaseException:
            for _, p in written:
                p.discard()
            raise

    def _land(self, flight) -> None:
        written, future = flight
        future.result()  # raises the group's error
        self.done.update(written)

    def commit(self) -> None:
        """Make everything written durable; raises the first error after
        every group has finished (what did commit is in `done`)."""
        error = None
        try:
            if self.written:
                written, self.written = self.written, []
                self._commit(written)
                self.done.update(written)
        except BaseException as e:
            error = e
        for flight in self._flying:
            try:
                self._land(flight)
            except BaseException as e:
                error = error or e
        self._flying = []
        self._shutdown()
        if error is not None:
            raise error

    def discard(self) -> None:
        """Give up: wait for groups in flight (their files may be durable but
        are not recorded; the next run finds them by hash), drop the rest."""
        written, self.written = self.written, []
        for _, p in written:
            p.discard()
        for _, future in self._flying:
            try:
                future.result()
            except BaseException:
                pass
        self._flying = []
        self._shutdown()

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


class _Durable:
    """The file a batch fetch writes one message into; handed to the group
    when complete (durable at the group's commit), discarded on error."""

    def __init__(self, group: _DurableGroup, key: str):
        self.group, self.key = group, key
        self.pending = group.store.begin()

    def __enter__(self):
        return self.pending.writer

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.group.add(self.key, self.pending)
        else:
            self.pending.discard()
        return False


def _too_large_error(size: int, limit: int) -> str:
    return (f"Too large to process: {size / 1048576:.1f} MB is over this connection's limit of "
            f"{limit / 1048576:.0f} MB. The email is stored; raise the limit and press Reprocess.")


def _record_many(conn, items: list[tuple[RemoteMessage, PendingRaw]], result: CaptureResult) -> None:
    """StoredMessage + RemoteKey rows for durable files, in one transaction
    with a few multi-row statements (one row at a time cost more than the
    fetch itself). Bytes already stored for this connection (same SHA-256:
    re-delivered, UIDVALIDITY changed) only get a new RemoteKey."""
    new_ids: list[int] = []
    with write_transaction():
        shas = list({p.sha256 for _, p in items})
        ids = _ids_by_sha(conn, shas)
        rows: dict[str, dict] = {}
        for ref, pending in items:
            sha = pending.sha256
            if sha in ids or sha in rows:
                result.duplicates += 1  # same bytes under a new key: UIDVALIDITY changed, re-delivered...
                continue
            too_large = pending.size > conn.max_message_size
            rows[sha] = dict(
                organization=conn.organization_id, connection=conn.id, connection_name=conn.name,
                sha256=sha, size=pending.size, path=pending.rel, received_at=ref.received or "",
                message_id=(ref.message_id or "")[:998], state="quarantined" if too_large else "captured",
                error=_too_large_error(pending.size, conn.max_message_size) if too_large else "",
                captured_at=utcnow())
        if rows:
            # 25 rows of ~30 columns: under the 999 variables older SQLite allows.
            for chunk in chunked(list(rows.values()), 25):
                StoredMessage.insert_many(chunk).execute()
            ids = _ids_by_sha(conn, shas)
            for row in rows.values():
                result.stored += 1
                if row["state"] == "quarantined":
                    result.quarantined += 1
                else:
                    new_ids.append(ids[row["sha256"]])
        now = utcnow()
        keys = [dict(connection=conn.id, key=ref.key, message=ids[pending.sha256], created_at=now)
                for ref, pending in items]
        for chunk in chunked(keys, 100):
            RemoteKey.insert_many(chunk).execute()
    new_ids.sort()  # fetch order: rows were inserted oldest first
    result.new_message_ids.extend(new_ids)
    for mid in new_ids:
        result.on_stored(mid)  # after commit: the processing job must find the row


def _ids_by_sha(conn, shas: list[str]) -> dict[str, int]:
    ids: dict[str, int] = {}
    for chunk in chunked(shas, 500):
        ids.update((sha, mid) for mid, sha in StoredMessage.select(StoredMessage.id, StoredMessage.sha256).where(
            (StoredMessage.connection == conn) & (StoredMessage.sha256.in_(chunk))).tuples())
    return ids
