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

from connectors.base import Connector, RemoteMessage
from connectors.errors import ConnectorError
from models import EmailConnection, RemoteKey, StoredMessage, db, utcnow

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
    try:
        for ref, pending in _fetch_all(connector, store, fresh):
            _record(conn, ref, pending, result)
            durable.append(ref)
            keepalive()
    finally:
        # Whatever is durable is marked read, even if the batch stopped half way.
        if durable:
            connector.mark_read(durable)
            RemoteKey.update(marked_read=True).where(
                (RemoteKey.connection == conn) & (RemoteKey.key.in_([r.key for r in durable]))).execute()


def _fetch_all(connector, store: RawStore, refs: list[RemoteMessage]):
    """Yield (ref, committed PendingRaw) for each message fetched.

    IMAP can fetch many small messages in one round trip
    (`fetch_raw_batch`); other protocols fetch one by one. Either way each
    message is streamed to its own file and made durable before it is
    yielded."""
    batch = getattr(connector, "fetch_raw_batch", None)
    if batch is not None and len(refs) > 1:
        done: dict[str, PendingRaw] = {}

        def dest(ref):
            return _Durable(store, done, ref.key)

        try:
            batch(refs, dest)
        except ConnectorError as e:
            if e.diagnosis.code not in ("message_not_found", "message_gone"):
                # Keep what was already made durable: it will be marked read.
                yield from ((r, done[r.key]) for r in refs if r.key in done)
                raise
        yield from ((r, done[r.key]) for r in refs if r.key in done)
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


class _Durable:
    """The file a batch fetch writes one message into; durable on close."""

    def __init__(self, store: RawStore, done: dict, key: str):
        self.pending, self.done, self.key = store.begin(), done, key

    def __enter__(self):
        return self.pending.writer

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.pending.commit()
            self.done[self.key] = self.pending
        else:
            self.pending.discard()
        return False


def _record(conn, ref: RemoteMessage, pending: PendingRaw, result: CaptureResult) -> None:
    too_large = pending.size > conn.max_message_size
    new_id = None
    with db.atomic():
        msg = (StoredMessage.select().where((StoredMessage.connection == conn)
                                            & (StoredMessage.sha256 == pending.sha256)).first())
        if msg is None:
            msg = StoredMessage.create(
                organization=conn.organization_id, connection=conn, connection_name=conn.name,
                sha256=pending.sha256, size=pending.size, path=pending.rel, received_at=ref.received or "",
                message_id=(ref.message_id or "")[:998],
                state="quarantined" if too_large else "captured",
                error=(f"Too large to process: {pending.size / 1048576:.1f} MB is over this connection's "
                       f"limit of {conn.max_message_size / 1048576:.0f} MB. The email is stored; raise the "
                       "limit and press Reprocess.") if too_large else "")
            result.stored += 1
            if too_large:
                result.quarantined += 1
            else:
                result.new_message_ids.append(msg.id)
                new_id = msg.id
        else:
            result.duplicates += 1  # same bytes under a new key: UIDVALIDITY changed, re-delivered...
        RemoteKey.create(connection=conn, key=ref.key, message=msg, created_at=utcnow())
    if new_id is not None:
        result.on_stored(new_id)  # after commit: the processing job must find the row
