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

from .store import RawStore

log = logging.getLogger(__name__)


@dataclass
class CaptureResult:
    listed: int = 0
    stored: int = 0
    duplicates: int = 0
    quarantined: int = 0
    new_message_ids: list[int] = field(default_factory=list)


def capture(connector: Connector, conn: EmailConnection, store: RawStore, *, batch_size: int = 100,
            max_batches: int = 20) -> CaptureResult:
    """Bounded: at most batch_size × max_batches messages per run."""
    result = CaptureResult()
    for _ in range(max_batches):
        refs = connector.list_unread(batch_size)
        if not refs:
            break
        result.listed += len(refs)
        _capture_batch(connector, conn, store, refs, result)
        if len(refs) < batch_size:
            break
    return result


def _capture_batch(connector, conn, store, refs: list[RemoteMessage], result: CaptureResult) -> None:
    known = {k.key: k for k in RemoteKey.select().where(
        (RemoteKey.connection == conn) & (RemoteKey.key.in_([r.key for r in refs])))}
    durable: list[RemoteMessage] = []
    try:
        for ref in refs:
            if ref.key in known:
                result.duplicates += 1  # stored by an earlier run that stopped before mark-read
                durable.append(ref)
                continue
            try:
                if _capture_one(connector, conn, store, ref, result):
                    durable.append(ref)
            except ConnectorError as e:
                if e.diagnosis.code not in ("message_not_found", "message_gone"):
                    raise
                log.info("%s: message %s vanished before it could be fetched", conn.api_name, ref.key)
    finally:
        # Whatever is durable is marked read, even if the batch stopped half way.
        if durable:
            connector.mark_read(durable)
            RemoteKey.update(marked_read=True).where(
                (RemoteKey.connection == conn) & (RemoteKey.key.in_([r.key for r in durable]))).execute()


def _capture_one(connector, conn, store: RawStore, ref: RemoteMessage, result: CaptureResult) -> bool:
    pending = store.begin()
    try:
        connector.fetch_raw(ref, pending.writer)
        rel = pending.commit()
    except BaseException:
        pending.discard()
        raise
    too_large = pending.size > conn.max_message_size
    with db.atomic():
        msg = (StoredMessage.select().where((StoredMessage.connection == conn)
                                            & (StoredMessage.sha256 == pending.sha256)).first())
        if msg is None:
            msg = StoredMessage.create(
                organization=conn.organization_id, connection=conn, connection_name=conn.name,
                sha256=pending.sha256, size=pending.size, path=rel, received_at=ref.received or "",
                message_id=ref.message_id[:998],
                state="quarantined" if too_large else "captured",
                error=(f"Too large to process: {pending.size / 1048576:.1f} MB is over this connection's "
                       f"limit of {conn.max_message_size / 1048576:.0f} MB. The email is stored; raise the "
                       "limit and press Reprocess.") if too_large else "")
            result.stored += 1
            if too_large:
                result.quarantined += 1
            else:
                result.new_message_ids.append(msg.id)
        else:
            result.duplicates += 1
        RemoteKey.create(connection=conn, key=ref.key, message=msg, created_at=utcnow())
    return True
