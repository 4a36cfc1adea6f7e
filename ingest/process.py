"""Processing: a captured email is parsed, its attachments and indicators
stored, and it is routed (incident, case or Inbox).

Separate from capture so it scales with workers and can be repeated: a
message that cannot be parsed goes to quarantine with its error (shown in
the UI with Reprocess); an unexpected failure is retried at most
MAX_PROCESS_ATTEMPTS times, then quarantined, so it never blocks the rest
and is never retried forever.

Emails are processed in batches (`process_many`): parsing, indicators and
attachment files happen outside any transaction, then one short write
transaction stores the whole batch with a few multi-row statements. One
email at a time cost ~11 statements each, and composing them in peewee
took more time than parsing the email."""
from __future__ import annotations

import datetime
import hashlib
import itertools
import json
import logging
import sqlite3
from dataclasses import dataclass, field
from typing import Optional, Union

import peewee
from peewee import (BooleanField, CharField, DateTimeField, Field, ForeignKeyField, IntegerField, IntegrityError,
                    PostgresqlDatabase, SqliteDatabase, chunked)

from models import (MAX_PROCESS_ATTEMPTS, Attachment, ConnectionLog, EmailConnection, Indicator, StoredMessage, db,
                    utcnow, write_transaction)

from . import route
from .parse import ParseError, parse_bytes, read_raw
from .indicators import extract_indicators
from .store import PutGroup, RawStore

log = logging.getLogger(__name__)
MAX_TEXT = 2 * 1024 * 1024
BATCH_MAX = 100  # emails per process_many round (jobs send 50)
# Parsed text held for one write transaction: a batch of large emails is
# written in several transactions instead of holding (and sending) it all.
PENDING_CHARS = 16 * 1024 * 1024
NUMBER_RETRIES = 10  # a clash on incident numbers with a concurrent worker retries the transaction

Outcome = Union[str, Exception]


@dataclass(eq=False)
class _Work:
    """One email of a batch, from the first read to its outcome."""
    id: int
    path: str
    attempts: int  # counting this one
    organization_id: int
    captured_message_id: str
    fields: Optional[dict] = None  # parsed columns to write
    attachments: list = field(default_factory=list)
    indicators: list = field(default_factory=list)
    files: list = field(default_factory=list)  # rels of its attachment files, durable once its group commits
    quarantine: str = ""  # why it goes to quarantine
    sha256: str = ""  # of the raw bytes, once read
    failure: Optional[Exception] = None  # unexpected, to be retried

    @property
    def chars(self) -> int:
        return sum(len(v) for v in (self.fields or {}).values() if isinstance(v, str))


def process(message_id: int, store: RawStore, *, force: bool = False) -> str:
    """Returns the outcome: processed route, 'quarantined', or 'skipped'.
    An unexpected failure raises (the job's retries), as before batching."""
    outcome = process_many([message_id], store, force=force)[message_id]
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def process_many(message_ids: list[int], store: RawStore, *, force: bool = False) -> dict[int, Outcome]:
    """Process a batch: {id: outcome}, the outcome being the route
    (new-incident, threaded, inbox, kept), 'quarantined' or 'skipped', or
    the exception of an email whose processing failed unexpectedly (and
    that is not quarantined yet): the caller retries that one on its own.
    One email's failure never fails the others."""
    ids = list(dict.fromkeys(message_ids))
    outcomes: dict[int, Outcome] = {}
    for start in range(0, len(ids), BATCH_MAX):
        outcomes.update(_process_batch(ids[start:start + BATCH_MAX], store, force))
    return outcomes


def _process_batch(ids: list[int], store: RawStore, force: bool) -> dict[int, Outcome]:
    outcomes: dict[int, Outcome] = dict.fromkeys(ids, "skipped")
    found = {}
    for chunk in chunked(ids, 500):
        found.update((row[0], row) for row in StoredMessage.select(
            StoredMessage.id, StoredMessage.path, StoredMessage.state, StoredMessage.attempts,
            StoredMessage.organization, StoredMessage.message_id).where(StoredMessage.id.in_(chunk)).tuples())
    work = []
    for mid in ids:
        if mid not in found:
            continue
        _, path, state, attempts, org_id, msgid = found[mid]
        if state == "processed" or (state == "quarantined" and not force):
            continue
        work.append(_Work(mid, path, attempts + 1, org_id, msgid or ""))
    if not work:
        return outcomes
    # Count the attempt first: a crash mid-way still counts towards the limit.
    for chunk in chunked([w.id for w in work], 500):
        StoredMessage.update(attempts=StoredMessage.attempts + 1).where(StoredMessage.id.in_(chunk)).execute()

    pending: list[_Work] = []
    pending_chars = 0
    # Attachment files are written as each email is prepared, and made
    # durable together just before the transaction that names them: one
    # group of concurrent fsyncs instead of an fsync wait per file.
    files = PutGroup(store, kind="att")
    try:
        for w in work:
            if w.attempts > MAX_PROCESS_ATTEMPTS and not force:
                # Earlier attempts never finished: the worker died while processing
                # (killed, out of memory). Trying again would only die again.
                w.quarantine = (f"Processing did not finish in {w.attempts - 1} attempts: the worker stopped "
                                f"while processing this email (out of memory or killed?). Check the worker's log, "
                                f"then use Reprocess.")
            else:
                _prepare(w, files, store, force)  # no transaction open: parsing may take long
            if w.failure is not None:
                outcomes[w.id] = w.failure
                continue
            pending.append(w)
            pending_chars += w.chars
            if pending_chars >= PENDING_CHARS:
                outcomes.update(_flush(_commit_files(pending, files, force, outcomes)))
                pending, pending_chars = [], 0
        if pending:
            outcomes.update(_flush(_commit_files(pending, files, force, outcomes)))
        # Files of emails that failed after storing them: kept, as put_bytes kept them.
        files.commit()
    finally:
        files.discard()  # temporary files an exception left behind
    return outcomes


def _commit_files(pending: list[_Work], files: PutGroup, force: bool, outcomes: dict) -> list[_Work]:
    """Make the attachment files put so far durable, before any row names
    them; returns the emails to write. An email whose file could not be
    made durable fails as if storing it had failed while preparing it."""
    errors = files.commit()
    if not errors:
        return pending
    keep = []
    for w in pending:
        error = next((errors[rel] for rel in w.files if rel in errors), None)
        if error is not None:
            log.error("Storing the attachments of message %s failed", w.id, exc_info=error)
            w.fields, w.attachments, w.indicators, w.files = None, [], [], []
            _failed(w, error, force)
            if w.failure is not None:
                outcomes[w.id] = w.failure
                continue
        keep.append(w)
    return keep


def _prepare(w: _Work, files: PutGroup, store: RawStore, force: bool) -> None:
    """Parse, extract, write attachment files (into `files`, not yet
    durable): fills w.fields and the rows, or w.quarantine, or w.failure."""
    try:
        raw = read_raw(store.path(w.path))
        # Capture names files by a faster hash; the SHA-256 users may look
        # up is taken here, from bytes read anyway (~1% of processing).
        w.sha256 = hashlib.sha256(raw).hexdigest()
        parsed = parse_bytes(raw)
        del raw
        fields = _parsed_fields(parsed, w.captured_message_id)
        fields["sha256"] = w.sha256
        # Inside the try: a bug in extraction counts towards MAX_PROCESS_ATTEMPTS too.
        attachments = _attachment_rows(parsed, files)
        indicators = extract_indicators(parsed)
    except ParseError as e:
        w.quarantine = f"Cannot be parsed as an email: {e}"
        return
    except Exception as e:
        log.exception("Processing message %s failed", w.id)
        _failed(w, e, force)
        return
    w.fields = fields
    w.attachments = [(w.id, a["filename"], a["content_type"], a["size"], a["sha256"], a["md5"], a["path"],
                      a["from_evidence"]) for a in attachments]
    w.files = [a["path"] for a in attachments if a["path"]]
    w.indicators = [(w.id, i.kind, str(i.value)[:2000], i.source[:255]) for i in indicators]


def _failed(w: _Work, e: Exception, force: bool) -> None:
    """An unexpected failure: retried (w.failure) until the last attempt, then quarantined."""
    if w.attempts >= MAX_PROCESS_ATTEMPTS and not force:
        w.quarantine = f"Processing failed {w.attempts} times: {e.__class__.__name__}: {e}"
    elif force:
        w.quarantine = f"Processing failed: {e.__class__.__name__}: {e}"
    else:
        w.failure = e


def _flush(batch: list[_Work]) -> dict[int, Outcome]:
    """Write the batch in one transaction; if that fails, each email in a
    transaction of its own, so one bad row cannot fail the others."""
    try:
        return _write(batch)
    except Exception as e:
        if len(batch) == 1:
            log.exception("Storing message %s failed", batch[0].id)
            return {batch[0].id: e}
        log.exception("Storing a batch of %d emails failed; storing them one by one", len(batch))
    outcomes: dict[int, Outcome] = {}
    for w in batch:
        try:
            outcomes.update(_write([w]))
        except Exception as e:
            log.exception("Storing message %s failed", w.id)
            outcomes[w.id] = e
    return outcomes


def _write(batch: list[_Work]) -> dict[int, str]:
    for _ in range(NUMBER_RETRIES):
        try:
            return _write_once(batch)
        except IntegrityError:
            continue  # a concurrent worker took our incident numbers first: rolled back, try again
    raise RuntimeError("Could not allocate incident numbers")


def _write_once(batch: list[_Work]) -> dict[int, str]:
    outcomes: dict[int, str] = {}
    now = utcnow()
    with write_transaction():
        # The connection (and its routing) as it is now: it may have been
        # deleted meanwhile. Statements written out, as below: composing
        # this one and the DELETEs in peewee cost ~1 ms a batch.
        ids = [w.id for w in batch]
        m, c = StoredMessage, EmailConnection
        sql = (f"SELECT m.{_col(m.id)}, m.{_col(m.state)}, m.{_col(m.incident)}, m.{_col(m.connection)}, "
               f"c.{_col(c.routing)} FROM {_table(m)} AS m LEFT OUTER JOIN {_table(c)} AS c "
               f"ON m.{_col(m.connection)} = c.{_col(c.id)} WHERE m.{_col(m.id)} IN {_params(ids)} ORDER BY m.{_col(m.id)}")
        if isinstance(db.obj, PostgresqlDatabase):
            # A concurrent worker writing the same email waits for this
            # transaction, then sees it processed (SQLite's BEGIN IMMEDIATE
            # already serializes writers). NO KEY: capture's foreign-key
            # checks (RemoteKey -> message) need not wait for it.
            sql += " FOR NO KEY UPDATE OF m"
        # id: (state, incident, connection, routing); the driver's values are
        # what these fields' python_value would give (int, str, None).
        current = {row[0]: row[1:] for row in db.execute_sql(sql, ids).fetchall()}
        live = []
        for w in batch:
            if w.id not in current or current[w.id][0] == "processed":
                outcomes[w.id] = "skipped"  # another worker finished it first: never two incidents
            else:
                live.append(w)
        parsed = [w for w in live if w.fields is not None]
        quarantined = [w for w in live if w.fields is None]
        changes: dict[int, dict] = {}
        if parsed:
            pids = [w.id for w in parsed]
            # Whatever rows an earlier processing of these emails left: it starts over.
            for model in (Attachment, Indicator):
                db.execute_sql(f"DELETE FROM {_table(model)} WHERE {_col(model.message)} IN {_params(pids)}", pids)
            _insert_rows(Attachment, (Attachment.message, Attachment.filename, Attachment.content_type,
                                      Attachment.size, Attachment.sha256, Attachment.md5, Attachment.path,
                                      Attachment.from_evidence), [a for w in parsed for a in w.attachments])
            _insert_rows(Indicator, (Indicator.message, Indicator.kind, Indicator.value, Indicator.source),
                         [i for w in parsed for i in w.indicators])
            routes = route.route_many([
                route.Email(w.id, w.organization_id, current[w.id][2], current[w.id][3] or "incident",
                            w.fields["subject"], w.fields["message_id"], w.fields["in_reply_to"],
                            w.fields["references"], current[w.id][1]) for w in parsed])
            for w in parsed:
                r, incident_id = routes[w.id]
                changes[w.id] = dict(w.fields, state="processed", error="", processed_at=now)
                if r != "kept":
                    changes[w.id].update(route=r, incident=incident_id)
                outcomes[w.id] = r
        for w in quarantined:
            changes[w.id] = dict(state="quarantined", error=w.quarantine[:4000], processed_at=now)
            if w.sha256:  # read before it could not be parsed
                changes[w.id]["sha256"] = w.sha256
            outcomes[w.id] = "quarantined"
        _update_rows(StoredMessage, changes)
        logs = [dict(connection=current[w.id][2], level="warning", job_id="", created_at=now,
                     message=f"An email was sent to quarantine: {w.quarantine}")
                for w in quarantined if current[w.id][2]]
        if logs:
            ConnectionLog.insert_many(logs).execute()
    for w in quarantined:
        log.warning("Message %s quarantined: %s", w.id, w.quarantine)
    return outcomes


# -- Multi-row statements written out directly. Peewee composing the same
# statements from its query tree cost ~10 µs per value, more than the
# database executing them; here values only go through each field's
# db_value, as peewee would pass them to the driver, and even that only
# where it would change them (`_unchanged_types`).

def _quote(name: str) -> str:
    return db.quote[0] + name + db.quote[1]


def _table(model) -> str:
    return _quote(model._meta.table_name)


def _col(f) -> str:
    return _quote(f.column_name)


def _params(values) -> str:
    """(?, ?, ...) for an IN list of `values`."""
    return "(" + ", ".join([db.param] * len(values)) + ")"


def _max_params() -> int:
    """Bound variables per statement: 999 on SQLite before 3.32 (or as
    compiled), 65535 on PostgreSQL; capped so a statement stays moderate."""
    limit = 65535
    if isinstance(db.obj, SqliteDatabase):
        try:
            limit = db.connection().getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        except (AttributeError, sqlite3.Error):
            limit = 999
    return min(limit, 10000)


# What peewee's adapt() methods return unchanged, by method: a value of
# exactly one of these types comes out of Field.db_value (`value if value is
# None else self.adapt(value)`) as it went in. Exact types, not isinstance:
# int(True) is 1, a str subclass is another object for str().
_ADAPT_KEEPS = {
    CharField.adapt: frozenset({str}),  # _StringField.adapt, TextField's too: str() of anything else
    IntegerField.adapt: frozenset({int}),  # int(): a bool or a "12" would change
    BooleanField.adapt: frozenset({bool}),  # bool()
    DateTimeField.adapt: frozenset({datetime.datetime}),  # parses a str; the driver adapts the datetime
}
_NOTHING = frozenset()
_NONE = frozenset({type(None)})  # Field.db_value passes None by


def _unchanged_types(f) -> frozenset:
    """The value types whose f.db_value(v) is v itself, so the rows of a
    batch (~100,000 values, ~1 µs a db_value call) need not go through it.

    Read off the methods f's class actually has rather than its name: a
    field that converts (EncryptedField, JSON, UUID, FixedCharField...), or
    a peewee whose methods differ, gets nothing and every value converted."""
    cls = type(f)
    if "db_value" in vars(f) or "adapt" in vars(f):
        return _NOTHING  # patched on this one field
    if cls.db_value is ForeignKeyField.db_value:
        # Model instances become their key; anything else is the related
        # field's db_value, and none of the types above is a model.
        return _unchanged_types(f.rel_field)
    if cls.db_value is not Field.db_value:
        return _NOTHING
    return _ADAPT_KEEPS.get(cls.adapt, _NOTHING) | _NONE


def _db_rows(fields, rows: list[tuple]) -> list[tuple]:
    """`rows` (tuples, one value per field) with every value as
    field.db_value(value) gives it: columns whose values are all of types it
    keeps are left as they are (checked in C: set(map(type, ...))), only the
    others go through db_value."""
    if not rows:
        return rows
    columns = list(zip(*rows))
    converted = False
    for i, f in enumerate(fields):
        if not set(map(type, columns[i])) <= _unchanged_types(f):
            columns[i] = tuple(map(f.db_value, columns[i]))
            converted = True
    return list(zip(*columns)) if converted else rows


#: Rows per multi-row INSERT on SQLite. The driver keeps compiled statements
#: by their text, and compiling a VALUES list of a batch's ~1,300 indicators
#: cost about as much as running it: pieces of one size are compiled once
#: and run again (only the last, shorter one is compiled apart).
SQLITE_INSERT_ROWS = 128


def _insert_rows(model, fields: tuple, rows: list[tuple]) -> None:
    """INSERT INTO t (columns) VALUES (...), (...): on PostgreSQL as few
    statements as the parameter limit allows (each is a round trip), on
    SQLite pieces of SQLITE_INSERT_ROWS."""
    if not rows:
        return
    head = f"INSERT INTO {_table(model)} ({', '.join(_col(f) for f in fields)}) VALUES "
    one = "(" + ", ".join([db.param] * len(fields)) + ")"
    per = max(1, _max_params() // len(fields))
    if isinstance(db.obj, SqliteDatabase):
        per = min(per, SQLITE_INSERT_ROWS)
    rows = _db_rows(fields, rows)
    for start in range(0, len(rows), per):
        chunk = rows[start:start + per]
        db.execute_sql(head + ", ".join([one] * len(chunk)), list(itertools.chain.from_iterable(chunk)))


def _update_rows(model, changes: dict[int, dict]) -> None:
    """Per-row updates: {id: {field name: value}}; a row's other columns keep their values."""
    if not changes:
        return
    if isinstance(db.obj, SqliteDatabase):
        _update_each(model, changes)
    else:
        _update_case(model, changes)


def _update_each(model, changes: dict[int, dict]) -> None:
    """UPDATE t SET a = ?, b = ? WHERE id = ?: one statement for each set
    of columns the rows set, run for each of those rows (executemany:
    compiled once, then run in-process, no round trips on SQLite). The one
    CASE statement of `_update_case` cost SQLite ~10x the CPU for a batch of
    50 (each row evaluates every column's CASE, each over the whole batch)."""
    meta = model._meta
    pk = meta.primary_key
    groups: dict[tuple, list] = {}  # the columns set: rows (values..., id)
    for mid, values in changes.items():
        groups.setdefault(tuple(values), []).append((*values.values(), mid))
    for names, rows in groups.items():
        fields = [meta.fields[name] for name in names] + [pk]
        sets = ", ".join(f"{_col(f)} = {db.param}" for f in fields[:-1])
        sql = f"UPDATE {_table(model)} SET {sets} WHERE {_col(pk)} = {db.param}"
        if peewee.logger.isEnabledFor(logging.DEBUG):  # as execute_sql logs
            peewee.logger.debug((sql, rows))
        with peewee.__exception_wrapper__:  # as execute_sql: peewee's IntegrityError... for the driver's
            db.cursor().executemany(sql, _db_rows(fields, rows))


def _update_case(model, changes: dict[int, dict]) -> None:
    """Per-row updates in one statement: UPDATE t SET c = CASE id WHEN ?
    THEN ? ... ELSE c END, ... WHERE id IN (...). A row that does not set
    a column keeps its value (ELSE c), and ELSE c also gives the CASE the
    column's type on PostgreSQL (a NULL-only CASE would be text). For a
    database over the network: one round trip, not one per row."""
    pk = model._meta.primary_key
    pk_col, p = _quote(pk.column_name), db.param
    budget = _max_params()
    items = list(changes.items())
    while items:
        size, n = 0, 0
        while n < len(items) and (n == 0 or size + 2 * len(items[n][1]) + 1 <= budget):
            size += 2 * len(items[n][1]) + 1
            n += 1
        chunk, items = items[:n], items[n:]
        columns: dict = {}  # field name: [id, value, id, value...]
        for mid, values in chunk:
            for name, value in values.items():
                columns.setdefault(name, []).extend((mid, value))
        sets, params = [], []
        for name, pairs in columns.items():
            f = model._meta.fields[name]
            keep = _unchanged_types(f)
            pairs[1::2] = [v if type(v) in keep else f.db_value(v) for v in pairs[1::2]]
            col = _quote(f.column_name)
            sets.append(f"{col} = CASE {pk_col} {' '.join([f'WHEN {p} THEN {p}'] * (len(pairs) // 2))} ELSE {col} END")
            params.extend(pairs)
        ids = [mid for mid, _ in chunk]
        params.extend(ids)
        db.execute_sql(f"UPDATE {_quote(model._meta.table_name)} SET {', '.join(sets)} "
                       f"WHERE {pk_col} IN ({', '.join([p] * len(ids))})", params)


def _parsed_fields(p, captured_message_id: str) -> dict:
    """The message's columns from the parsed email."""
    fields = {
        "subject": (p.subject or "")[:10000],
        "from_addr": format_address(p.from_)[:998],
        "to_addrs": ", ".join(format_address(a) for a in (p.to or []))[:10000],
        "date": (p.date or "")[:64],
        "message_id": (p.message_id or captured_message_id or "")[:998],
        "in_reply_to": (p.in_reply_to or "")[:998],
        "references": " ".join(p.references or [])[:10000],
        "text_body": (p.text or "")[:MAX_TEXT],
        "html_body": (p.html or "")[:MAX_TEXT],
        "headers_json": json.dumps([[str(k), str(v)[:4000]] for k, v in (p.headers or [])][:500]),
        "defects": "\n".join(str(d) for d in (p.defects or []))[:10000],
    }
    ev = p.evidence
    if ev is not None and ev is not p:  # otherwise evidence_json stays as it is
        fields["evidence_json"] = json.dumps({
            "subject": ev.subject, "from": format_address(ev.from_), "date": ev.date, "message_id": ev.message_id,
            "to": [format_address(a) for a in (ev.to or [])], "text": (ev.text or "")[:200000],
        })
    return fields


def format_address(a) -> str:
    """ParsedEmail addresses may be (name, address) pairs or objects."""
    if a is None:
        return ""
    if isinstance(a, str):
        return a
    if isinstance(a, (tuple, list)):
        name, addr = (list(a) + ["", ""])[:2]
        return f"{name} <{addr}>" if name and addr else (addr or name or "")
    name, addr = getattr(a, "name", "") or getattr(a, "display", ""), getattr(a, "address", "") or getattr(a, "addr", "")
    return f"{name} <{addr}>" if name and addr else (addr or name or str(a))


def _attachment_rows(parsed, files: PutGroup) -> list[dict]:
    rows = []
    ev = parsed.evidence if parsed.evidence is not parsed else None
    seen = set()
    for source, from_evidence in ((parsed, False), (ev, True)):
        if source is None:
            continue
        for att in source.attachments or []:
            data = getattr(att, "data", None)
            if data is not None:
                rel = files.put(data, sha=att.sha256)  # the rel put_bytes(data, kind="att") gives
            else:
                rel = ""
            key = (att.sha256, from_evidence)
            if key in seen:
                continue
            seen.add(key)
            rows.append({"filename": (att.filename or "")[:255], "content_type": (att.content_type or "")[:255],
                         "size": att.size, "sha256": att.sha256, "md5": att.md5, "path": rel,
                         "from_evidence": from_evidence})
    return rows
