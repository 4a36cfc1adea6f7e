"""Capture: unread mail from a connector into durable storage, then marked
read. The order is what makes it lossless:

  1. fetch the raw bytes into a temporary file (streamed, hashed);
  2. fsync + atomic rename to the content address;
  3. commit StoredMessage + RemoteKey in one transaction;
  4. only then mark it read on the server.

A crash between any two steps is repaired by the next run: an unread
message whose RemoteKey exists is just marked read; one whose bytes are
already stored (same SHA-256: UIDVALIDITY changed, re-delivered, marked
unread again) gets a new RemoteKey pointing at the same StoredMessage.

For speed the steps overlap across messages, never for one message: while
the connector reads the next messages, earlier ones are written, fsync'd
and renamed in groups on other threads (`_DurableGroup`) and recorded as
each group commits; what is recorded is marked read once the server has
sent the batch."""
from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from peewee import chunked

from connectors.base import Connector, RemoteMessage
from connectors.errors import ConnectorError
from models import EmailConnection, RemoteKey, StoredMessage, db, write_transaction, utcnow

from .store import Countdown, PendingRaw, RawStore, SyncPool, content_hash, content_hasher

log = logging.getLogger(__name__)


@dataclass
class CaptureResult:
    listed: int = 0
    stored: int = 0
    duplicates: int = 0
    quarantined: int = 0
    new_message_ids: list[int] = field(default_factory=list)
    on_stored: object = field(default=lambda message_id: None, repr=False)


def capture(connector: Connector, conn: EmailConnection, store: RawStore, *, batch_size: int = 1000,
            max_batches: int = 2, keepalive=lambda: None, on_stored=lambda message_id: None) -> CaptureResult:
    """Bounded: at most batch_size × max_batches messages per run.

    Each batch is listed at once and marked read at once: fewer, larger
    batches cost fewer round trips and pauses (the listing, the last fsyncs,
    the marking). Rows are written as messages become durable, not at the
    end of a batch: `on_stored(id)` is called as soon as a message is durable
    and recorded, so processing starts at once and is never lost when the
    run fails half way. `keepalive` is called as messages arrive (it extends
    the fetch lock)."""
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
    known = {key for (key,) in _select_in(
        f"SELECT {_col(RemoteKey.key)} FROM {_table(RemoteKey)} WHERE {_col(RemoteKey.connection)} = {db.param} "
        f"AND {_col(RemoteKey.key)}", [conn.id], [r.key for r in refs])}
    durable: list[RemoteMessage] = [r for r in refs if r.key in known]
    result.duplicates += len(durable)  # stored by an earlier run that stopped before mark-read
    if durable:
        # That run may also have stopped before processing was queued.
        for (mid,) in (StoredMessage.select(StoredMessage.id).join(RemoteKey)
                       .where((RemoteKey.connection == conn) & (RemoteKey.key.in_([r.key for r in durable]))
                              & (StoredMessage.state == "captured")).tuples()):
            result.on_stored(mid)
    fresh = [r for r in refs if r.key not in known]
    recorder = _Recorder(conn, result, durable, keepalive)
    marked = 0  # durable[:marked] are marked read, or being marked by `marking`
    marking: _Background | None = None

    def note_marked(todo: list[RemoteMessage]) -> None:
        _execute_in(f"UPDATE {_table(RemoteKey)} SET {_col(RemoteKey.marked_read)} = {db.param} "
                    f"WHERE {_col(RemoteKey.connection)} = {db.param} AND {_col(RemoteKey.key)}",
                    [RemoteKey.marked_read.db_value(True), conn.id], [r.key for r in todo])

    def mark_read() -> None:
        nonlocal marked, marking
        if marking is not None:
            done, marking = marking, None
            note_marked(done.join())
        todo, marked = durable[marked:], len(durable)
        if todo:
            connector.mark_read(todo)
            note_marked(todo)

    def all_sent() -> None:
        # The server has sent the batch, so the connection is free: mark
        # read what is already recorded on another thread while this one
        # waits for the last files to become durable and records them.
        nonlocal marked, marking
        todo, marked = durable[marked:], len(durable)

        def mark() -> list[RemoteMessage]:
            connector.mark_read(todo)
            return todo
        if todo:
            marking = _Background(mark)

    try:
        try:
            _fetch_all(connector, store, fresh, recorder.add, keepalive, all_sent)
        finally:
            recorder.flush()  # also when the batch stopped half way: what is durable gets its rows
    finally:
        # Whatever is durable (and recorded) is marked read, even if the batch stopped half way.
        mark_read()


class _Background:
    """fn() on a thread of its own; join() returns its result or raises its error."""

    def __init__(self, fn):
        self._result, self._error = None, None
        self._thread = threading.Thread(target=self._run, args=(fn,), name="capture-mark-read", daemon=True)
        self._thread.start()

    def _run(self, fn) -> None:
        try:
            self._result = fn()
        except BaseException as e:
            self._error = e

    def join(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result


#: Files made durable together (one group commit; also bounds open files).
DURABLE_GROUP = 64
#: Messages whose rows are written in one transaction.
RECORD_GROUP = 100


class _Recorder:
    """Writes the rows of durable messages, RECORD_GROUP at a time; `durable`
    collects the messages recorded (those may be marked read)."""

    def __init__(self, conn, result: CaptureResult, durable: list[RemoteMessage], keepalive):
        self.conn, self.result, self.durable, self.keepalive = conn, result, durable, keepalive
        self.waiting: list[tuple[RemoteMessage, PendingRaw]] = []  # durable files whose rows are not yet written

    def add(self, items: list[tuple[RemoteMessage, PendingRaw]]) -> None:
        self.waiting += items
        if len(self.waiting) >= RECORD_GROUP:
            self.flush()

    def flush(self) -> None:
        if self.waiting:
            items, self.waiting = self.waiting, []
            _record_many(self.conn, items, self.result)
            self.durable.extend(ref for ref, _ in items)
            self.keepalive()


def _fetch_all(connector, store: RawStore, refs: list[RemoteMessage], record, keepalive,
               all_sent=lambda: None) -> None:
    """Fetch each message into a durable file; `record([(ref, committed
    PendingRaw), ...])` as they become durable, on this thread. A batch
    fetch calls `all_sent()` once the server has sent everything, before
    waiting for the last files to become durable.

    IMAP fetches many messages per command (`fetch_raw_batch`), handing
    them to a `_DurableGroup`, which writes them and makes them durable in
    groups on other threads; other protocols fetch one by one. A message
    that is gone from the server is skipped. On any other failure, what is
    already durable is still recorded before the error is raised."""
    batch = getattr(connector, "fetch_raw_batch", None)
    if batch is not None and len(refs) > 1:
        by_key = {r.key: r for r in refs}
        group = _DurableGroup(store, lambda done: record([(by_key[key], p) for key, p in done]), keepalive)
        error = None
        try:
            batch(refs, group.destination)
        except ConnectorError as e:
            if group.failed(e.__cause__):
                pass  # stopped by a failure of our own (disk full...): commit() raises it, as it is
            elif e.diagnosis.code not in ("message_not_found", "message_gone"):
                error = e  # keep what was already written completely: it is made durable and recorded
        except BaseException:
            group.discard()
            raise
        try:
            if error is None and group.ok():
                group.seal()  # the last files go to their group commit now, while all_sent() works
                all_sent()
        except BaseException as e:
            error = e
        try:
            group.commit()
        except BaseException as e:
            error = error or e
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
        record([(ref, pending)])
        keepalive()


class _DurableGroup:
    """Where a batch fetch writes its messages, and how they become durable.

    Four stages overlap, so the connector spends its time reading the
    network:

    * the connector (calling thread) hands each message's pieces to
      `destination(ref)`; they are queued, at most SPOOL_BYTES at a time
      (memory stays bounded whatever the message sizes);
    * a writer thread creates each temporary file and writes it (file
      creation and writes release the GIL);
    * complete files are fsync'd soon (SYNC_BATCH at a time) on a pool of
      threads, so the disk works while the network is read, and concurrent
      fsyncs share the device's flushes;
    * every DURABLE_GROUP complete files go to a commit thread, which waits
      for their fsyncs and renames them with one fsync per directory
      (`RawStore.commit_many`); at most IN_FLIGHT groups are in flight,
      which bounds the open files.

    Committed groups are handed to `on_durable([(key, PendingRaw), ...])` on
    the calling thread, between two messages (`progress`), in order; the
    rest by `commit()`, which waits for all of it."""

    IN_FLIGHT = 2
    #: Bytes handed to the writer thread and not yet written.
    SPOOL_BYTES = 2 * 1024 * 1024
    FSYNC_THREADS = 8
    #: Complete files fsync'd by one task: soon after they are written, with
    #: an eighth of the hand-offs between threads.
    SYNC_BATCH = 8

    def __init__(self, store: RawStore, on_durable, keepalive=lambda: None):
        self.store, self.on_durable, self.keepalive = store, on_durable, keepalive
        self.written: list = []  # (key, PendingRaw): complete, not yet in a group commit
        self._synced = Countdown()  # the early fsyncs of `written`
        self._to_sync: list[PendingRaw] = []  # complete, fsync not started yet
        self._flying: list = []  # group commits not yet finished, oldest first (writer thread)
        self._landed: list[list] = []  # committed groups not yet handed to on_durable
        self._landed_lock = threading.Lock()
        self._writer = _SerialThread("capture-write")
        self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="capture-commit")
        self._fsyncs = SyncPool(self.FSYNC_THREADS)
        self._queued = 0
        self._space = threading.Condition()
        self._error: BaseException | None = None  # the first failure: the fetch stops
        self._recording_failed = False

    def destination(self, ref: RemoteMessage) -> "_Durable":
        return _Durable(self, ref.key)

    # -- calling thread ----------------------------------------------------------

    def failed(self, exc) -> bool:
        """Is `exc` this group's own failure (not the connector's)?"""
        return exc is not None and exc is self._error

    def ok(self) -> bool:
        return self._error is None

    def seal(self) -> None:
        """No more messages: once written, the last files go to a group
        commit at once instead of waiting for `commit()`."""
        self.submit(self._commit_written)

    def check(self) -> None:
        """Raise the group's failure, if any, so the fetch stops."""
        if self._error is not None:
            raise self._error

    def submit(self, fn, *args, size: int = 0, cleanup: bool = False) -> None:
        """Run fn(*args) on the writer thread, in order. Raises the group's
        failure, if any, so the fetch stops; clean-ups still run after one."""
        if self._error is not None and not cleanup:
            raise self._error
        with self._space:
            while self._queued and self._queued + size > self.SPOOL_BYTES:
                self._space.wait()
            self._queued += size
        self._writer.put(self._run, fn, args, size, cleanup)

    def progress(self) -> None:
        """Between messages: keep the lock, record what became durable."""
        self.keepalive()
        self._hand_over()

    def _hand_over(self) -> None:
        while self._landed and not self._recording_failed:
            with self._landed_lock:
                done = self._landed.pop(0)
            try:
                self.on_durable(done)
            except BaseException as e:
                self._recording_failed = True
                self._error = self._error or e
                raise

    def commit(self) -> None:
        """Make everything written durable and hand it over; raises the first
        error after every group has finished (what committed before it is
        handed over all the same)."""
        self._writer.close()  # every file written (or failed)
        self._start_syncs()
        error = self._error
        try:
            if self.written:
                written, self.written = self.written, []
                self._commit(written, self._synced)
        except BaseException as e:
            error = error or e
        for future in self._flying:
            try:
                future.result()
            except BaseException as e:
                error = error or e
        self._flying = []
        self._shutdown()
        try:
            self._hand_over()
        except BaseException as e:
            error = error or e
        if error is not None:
            raise error

    def discard(self) -> None:
        """Give up: wait for groups in flight (their files may be durable but
        are not recorded; the next run finds them by hash), drop the rest."""
        self._error = self._error or _Cancelled()  # the writer skips what is still queued
        self._writer.close()
        written, self.written = self.written, []
        self._to_sync = []
        self._synced.wait(raise_error=False)  # no fsync still using a descriptor closed below
        for _, p in written:
            p.discard()
        _wait_all(self._flying)
        self._flying = []
        self._shutdown()

    # -- writer thread -----------------------------------------------------------

    def _run(self, fn, args, size: int, cleanup: bool) -> None:
        try:
            if self._error is None or cleanup:
                fn(*args)
        except BaseException as e:
            self._error = self._error or e
        finally:
            with self._space:
                self._queued -= size
                self._space.notify_all()

    def add(self, key: str, pending: PendingRaw) -> None:
        """A file is complete: fsync it soon, rename it with its group."""
        self.written.append((key, pending))
        self._to_sync.append(pending)
        if len(self._to_sync) >= self.SYNC_BATCH:
            self._start_syncs()
        if len(self.written) >= DURABLE_GROUP:
            self._commit_written()

    def _start_syncs(self) -> None:
        if self._to_sync:
            to_sync, self._to_sync = self._to_sync, []
            self._fsyncs.run(_sync_each, to_sync, self._synced)

    def _commit_written(self) -> None:
        self._start_syncs()
        if not self.written:
            return
        self._flying = [f for f in self._flying if not f.done() or f.exception() is not None]
        if len(self._flying) >= self.IN_FLIGHT:
            self._flying.pop(0).result()  # a failed group commit stops the fetch
        written, self.written = self.written, []
        synced, self._synced = self._synced, Countdown()
        self._flying.append(self._committer.submit(self._commit, written, synced))

    # -- commit thread (or the calling thread, for the last group) -----------------

    def _commit(self, written, synced: Countdown) -> None:
        try:
            synced.wait()
            self.store.commit_many([p for _, p in written], self._fsyncs)
        except BaseException:
            synced.wait(raise_error=False)
            for _, p in written:
                p.discard()
            raise
        with self._landed_lock:
            self._landed.append(written)

    def _shutdown(self) -> None:
        self._writer.close()
        self._committer.shutdown(wait=True)
        self._fsyncs.close()


class _SerialThread:
    """One thread running fn(*args) in the order put: the writer. Lighter
    than a ThreadPoolExecutor (no Future per call: a thousand messages)."""

    def __init__(self, name: str):
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def put(self, fn, *args) -> None:
        self._tasks.put((fn, args))

    def close(self) -> None:
        """Wait until everything put is done; idempotent."""
        if self._thread.is_alive():
            self._tasks.put(None)
            self._thread.join()

    def _work(self) -> None:
        while (task := self._tasks.get()) is not None:
            fn, args = task
            fn(*args)  # _DurableGroup._run: never raises


def _sync_each(pendings) -> None:
    for p in pendings:
        p.sync()


def _wait_all(futures) -> None:
    for f in futures:
        f.exception()  # waits; the error itself is reported elsewhere


class _Cancelled(Exception):
    """The batch was given up; queued writes are skipped."""


class _Durable:
    """The file a batch fetch writes one message into. The connector's calls
    hash the message and queue work for the group's writer thread: create
    the temporary file, write it, then hand the complete file to a group
    commit (durable when that commits), or discard it on error.

    The first piece is held back until the next call: if the message ends
    there (most do: the connector's pieces are up to 1 MiB), it is stored
    whole (`RawStore.begin_whole`: hashed first, its temporary file next to
    its final name); only a message of several pieces is streamed through
    tmp/."""

    def __init__(self, group: _DurableGroup, key: str):
        self.group, self.key = group, key
        self.pending: PendingRaw | None = None
        self._held = None  # the first piece, until we know whether more follow
        self._hash = None  # of a streamed message, computed here (see __exit__)

    def __enter__(self):
        return self

    def write(self, data) -> int:
        # bytes from the socket: never changed later, so queued without a copy
        if self._hash is not None:
            self._hash.update(data)
            self.group.submit(self._write, data, size=len(data))
            self.group.keepalive()  # a large message may take long
        elif self._held is None:
            self.group.check()
            self._held = data
        else:
            held, self._held = self._held, None
            self._hash = content_hasher()
            self._hash.update(held)
            self._hash.update(data)
            self.group.submit(self._open)
            self.group.submit(self._write, held, size=len(held))
            self.group.submit(self._write, data, size=len(data))
        return len(data)

    def __exit__(self, exc_type, exc, tb):
        held, self._held = self._held, None
        if exc_type is not None:
            self.group.submit(self._discard, cleanup=True)
            return False
        # Hashed on this thread rather than the writer's, which has the file
        # system to do: measured faster (hashing releases the GIL).
        try:
            if self._hash is not None:
                self.group.submit(self._complete, self._hash.hexdigest())
            else:
                held = held or b""
                self.group.submit(self._whole, held, content_hash(held), size=len(held))
        except BaseException:  # the group failed meanwhile
            self.group.submit(self._discard, cleanup=True)  # what the writer made of it so far
            raise
        self.group.progress()
        return False

    # On the writer thread, in the order queued:

    def _whole(self, data, digest: str) -> None:
        self.group.add(self.key, self.group.store.begin_whole(data, digest))

    def _open(self) -> None:
        self.pending = self.group.store.begin(hashed_by_caller=True)

    def _write(self, data) -> None:
        try:
            self.pending.writer.write(data)
        except BaseException:
            self._discard()
            raise

    def _complete(self, digest: str) -> None:
        pending, self.pending = self.pending, None
        pending.finish(digest)
        self.group.add(self.key, pending)

    def _discard(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.discard()


def _too_large_error(size: int, limit: int) -> str:
    return (f"Too large to process: {size / 1048576:.1f} MB is over this connection's limit of "
            f"{limit / 1048576:.0f} MB. The email is stored; raise the limit and press Reprocess.")


def _record_many(conn, items: list[tuple[RemoteMessage, PendingRaw]], result: CaptureResult) -> None:
    """StoredMessage + RemoteKey rows for durable files, in one transaction
    with a few multi-row statements (one row at a time cost more than the
    fetch itself). Bytes already stored for this connection (same content
    hash: re-delivered, UIDVALIDITY changed) only get a new RemoteKey. The
    SHA-256 is left for processing to fill in (see ingest/store.py)."""
    new_ids: list[int] = []
    with write_transaction():
        digests = list({p.digest for _, p in items})
        ids = _ids_by_digest(conn, digests)
        rows: dict[str, dict] = {}
        for ref, pending in items:
            digest = pending.digest
            if digest in ids or digest in rows:
                result.duplicates += 1  # same bytes under a new key: UIDVALIDITY changed, re-delivered...
                continue
            too_large = pending.size > conn.max_message_size
            rows[digest] = dict(
                organization=conn.organization_id, connection=conn.id, connection_name=conn.name,
                content_hash=digest, size=pending.size, path=pending.rel, received_at=ref.received or "",
                message_id=(ref.message_id or "")[:998], state="quarantined" if too_large else "captured",
                error=_too_large_error(pending.size, conn.max_message_size) if too_large else "",
                captured_at=utcnow())
        if rows:
            _insert_many(StoredMessage, list(rows.values()))
            ids = _ids_by_digest(conn, digests)
            for row in rows.values():
                result.stored += 1
                if row["state"] == "quarantined":
                    result.quarantined += 1
                else:
                    new_ids.append(ids[row["content_hash"]])
        now = utcnow()
        _insert_many(RemoteKey, [dict(connection=conn.id, key=ref.key, message=ids[pending.digest], created_at=now)
                                 for ref, pending in items])
    new_ids.sort()  # fetch order: rows were inserted oldest first
    result.new_message_ids.extend(new_ids)
    for mid in new_ids:
        result.on_stored(mid)  # after commit: the processing job must find the row


def _ids_by_digest(conn, digests: list[str]) -> dict[str, int]:
    return {digest: mid for mid, digest in _select_in(
        f"SELECT {_col(StoredMessage.id)}, {_col(StoredMessage.content_hash)} FROM {_table(StoredMessage)} "
        f"WHERE {_col(StoredMessage.connection)} = {db.param} AND {_col(StoredMessage.content_hash)}",
        [conn.id], digests)}


# The statements of a batch are written here rather than built with peewee:
# peewee makes and renders a node for every value (each key of an IN list,
# each column of each inserted row), which for a few hundred messages cost
# more than fetching them. They are plain, portable SQL (SQLite, PostgreSQL).

def _table(model) -> str:
    q = db.quote
    return f"{q[0]}{model._meta.table_name}{q[1]}"


def _col(field) -> str:
    q = db.quote
    return f"{q[0]}{field.column_name}{q[1]}"


#: Values per IN list: under the 999 variables per statement older SQLite allows.
_IN_CHUNK = 500


def _select_in(sql: str, params: list, values: list):
    """Rows of `sql ... IN (values)`: `sql` ends with the column compared,
    `params` are its other parameters, in order."""
    rows = []
    for chunk in chunked(values, _IN_CHUNK):
        rows += db.execute_sql(f"{sql} IN ({', '.join([db.param] * len(chunk))})", params + chunk).fetchall()
    return rows


def _execute_in(sql: str, params: list, values: list) -> None:
    for chunk in chunked(values, _IN_CHUNK):
        db.execute_sql(f"{sql} IN ({', '.join([db.param] * len(chunk))})", params + chunk)


def _insert_many(model, rows: list[dict]) -> None:
    """`model.insert_many(rows).execute()`: the same rows and values. Fields
    missing from a row get their defaults, as with peewee; every value goes
    through its field's `db_value`, as with peewee."""
    meta = model._meta
    fields = [f for f in meta.sorted_fields if f is not meta.primary_key]
    position = {f.name: i for i, f in enumerate(fields)}
    # Each row starts as the constant defaults, converted once; only what the
    # row sets, and defaults computed per row (utcnow...), are converted per row.
    template = [None if callable(f.default) else f.db_value(f.default) for f in fields]
    computed = [(f.name, i, f) for i, f in enumerate(fields) if callable(f.default)]
    columns = ", ".join(_col(f) for f in fields)
    one = "(" + ", ".join([db.param] * len(fields)) + ")"
    per_statement = max(1, 999 // len(fields))  # variables, as above
    for chunk in chunked(rows, per_statement):
        params = []
        for row in chunk:
            values = template.copy()
            for name, value in row.items():
                i = position[name]
                values[i] = fields[i].db_value(value)
            for name, i, f in computed:
                if name not in row:
                    values[i] = f.db_value(f.default())
            params += values
        db.execute_sql(f"INSERT INTO {_table(model)} ({columns}) VALUES " + ", ".join([one] * len(chunk)), params)

