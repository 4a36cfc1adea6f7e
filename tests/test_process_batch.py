"""Processing a batch of captured emails (jobs.process.run_many): the same
result as one email at a time, with a few statements for the whole batch.
Real SQLite (or TEST_DATABASE_URL), real files; rows are made directly."""
from __future__ import annotations

import email.message
import hashlib

import pytest
from peewee import IntegrityError

from ingest import process as process_module
from ingest import route
from ingest.parse import ParseError
from ingest.route import new_incident
from ingest.store import RawStore, content_hash
from models import (ALL_MODELS, MAX_PROCESS_ATTEMPTS, Attachment, ConnectionLog, EmailConnection, Incident,
                    Indicator, Organization, StoredMessage, db)
from tests.support.app_fixtures import unique


def make_raw(subject: str, *, msgid: str | None = None, in_reply_to: str = "", references: str = "",
             attachment: bytes | None = None) -> bytes:
    m = email.message.EmailMessage()
    m["From"] = "reporter@example.com"
    m["To"] = "phish@example.com"
    m["Subject"] = subject
    m["Message-ID"] = msgid or f"<{unique('m')}@example.com>"
    if in_reply_to:
        m["In-Reply-To"] = in_reply_to
    if references or in_reply_to:
        m["References"] = references or in_reply_to
    m.set_content(f"About {subject}: http://{unique('bad')}.example.net/login\n")
    if attachment is not None:
        m.add_attachment(attachment, maintype="application", subtype="octet-stream", filename="payload.bin")
    return bytes(m)


@pytest.fixture
def new_org(app):
    """Organizations deleted again afterwards, with all their mail (cascade):
    other tests count messages across the whole database."""
    made = []

    def make() -> Organization:
        with db.connection_context():
            made.append(Organization.create(name=unique("Org")))
        return made[-1]
    yield make
    with db.connection_context():
        Organization.delete().where(Organization.id.in_([o.id for o in made])).execute()


@pytest.fixture
def org(new_org):
    return new_org()


@pytest.fixture
def connection(org):
    def make(routing: str = "incident", owner=None) -> EmailConnection:
        with db.connection_context():
            return EmailConnection.create(organization=owner or org, name="Phishing reports",
                                          api_name=unique("Conn").replace("-", "_"), routing=routing)
    return make


@pytest.fixture
def capture(app):
    """capture(conn, raw, **fields) -> id of a captured (not yet processed) email."""
    store = RawStore(app.config["DATA_DIR"])

    def make(conn: EmailConnection, raw: bytes, **fields) -> int:
        rel, _ = store.put_bytes(raw, kind="raw", suffix=".eml")
        # As capture writes it: the content hash, no SHA-256 yet.
        values = dict(organization=conn.organization_id, connection=conn, connection_name=conn.name,
                      content_hash=content_hash(raw), size=len(raw), path=rel, state="captured")
        values.update(fields)
        with db.connection_context():
            return StoredMessage.create(**values).id
    return make


def run_batch(ids: list[int]) -> dict:
    from jobs import process

    return process.run_many(ids)


def messages(ids: list[int]) -> list[StoredMessage]:
    with db.connection_context():
        by_id = {m.id: m for m in StoredMessage.select().where(StoredMessage.id.in_(ids))}
    return [by_id[i] for i in ids]


def incidents(org) -> list[Incident]:
    with db.connection_context():
        return list(Incident.select().where(Incident.organization == org.id).order_by(Incident.number))


def test_batch_makes_one_incident_per_email_with_consecutive_numbers(org, connection, capture):
    conn = connection("incident")
    with db.connection_context():
        first = new_incident(org.id, "Made by hand")  # INC-1: the batch goes on from there
    ids = [capture(conn, make_raw(f"Report {i:02d}", attachment=b"MZ payload %d" % i if i % 5 == 0 else None))
           for i in range(25)]
    assert run_batch(ids) == {"new-incident": 25}
    msgs = messages(ids)
    assert all(m.state == "processed" and m.route == "new-incident" and m.error == "" and m.processed_at
               for m in msgs)
    assert all(m.attempts == 1 for m in msgs)
    made = [i for i in incidents(org) if i.id != first.id]
    assert [i.number for i in made] == list(range(2, 27))  # consecutive, in the batch's order
    by_id = {i.id: i for i in made}
    assert [by_id[m.incident_id].title for m in msgs] == [f"Report {i:02d}" for i in range(25)]
    assert all(by_id[m.incident_id].connection_id == conn.id for m in msgs)
    assert len({m.incident_id for m in msgs}) == 25
    assert msgs[3].subject == "Report 03" and msgs[3].from_addr == "reporter@example.com" and msgs[3].message_id
    with db.connection_context():
        assert Attachment.select().where(Attachment.message.in_(ids)).count() == 5
        att = Attachment.get(Attachment.message == ids[5])
        assert att.filename == "payload.bin" and att.size == len(b"MZ payload 5") and att.path
        urls = Indicator.select().where(Indicator.message.in_(ids) & (Indicator.kind == "url")).count()
    assert urls >= 25
    assert run_batch(ids) == {"skipped": 25}  # a spare run changes nothing
    assert len(incidents(org)) == 26


def test_two_organizations_in_one_batch_number_their_own_incidents(org, new_org, connection, capture):
    other = new_org()
    with db.connection_context():
        new_incident(other.id, "Theirs")
    ours, theirs = connection("incident"), connection("incident", owner=other)
    ids = [capture(ours if i % 2 else theirs, make_raw(f"Mixed {i}")) for i in range(8)]
    assert run_batch(ids) == {"new-incident": 8}
    assert [i.number for i in incidents(org)] == [1, 2, 3, 4]
    assert [i.number for i in incidents(other)] == [1, 2, 3, 4, 5]


def test_reply_later_in_same_batch_joins_case_of_earlier_email(org, connection, capture):
    conn = connection("case")
    old = capture(conn, make_raw("Older report", msgid="<old@example.com>"))
    assert run_batch([old]) == {"new-incident": 1}
    old_incident = messages([old])[0].incident_id
    ids = [
        capture(conn, make_raw("Invoice overdue", msgid="<a@example.com>")),  # new case (INC-2)
        capture(conn, make_raw("Unrelated", msgid="<b@example.com>")),  # new case (INC-3)
        capture(conn, make_raw("Re: Invoice overdue", msgid="<c@example.com>", in_reply_to="<a@example.com>")),
        capture(conn, make_raw("Following up [INC-3]")),  # tag of an incident this same batch creates
        capture(conn, make_raw("Re: Re: Invoice", references="<zzz@example.com> <c@example.com>")),  # via the reply
        capture(conn, make_raw("Re: Older report", in_reply_to="<old@example.com>")),  # a case from before
        capture(conn, make_raw("Wrong tag [INC-99]")),  # no such incident: a case of its own
    ]
    outcome = run_batch(ids)
    assert outcome == {"new-incident": 3, "threaded": 4}
    a, b, c, tagged, chained, older, wrong = messages(ids)
    numbers = {i.id: i.number for i in incidents(org)}
    assert numbers[a.incident_id] == 2 and numbers[b.incident_id] == 3 and numbers[wrong.incident_id] == 4
    assert c.incident_id == a.incident_id and chained.incident_id == a.incident_id
    assert tagged.incident_id == b.incident_id
    assert older.incident_id == old_incident
    assert [m.route for m in (a, b, c, tagged, chained, older, wrong)] == [
        "new-incident", "new-incident", "threaded", "threaded", "threaded", "threaded", "new-incident"]
    assert len(incidents(org)) == 4


def test_keep_in_inbox_and_already_routed_emails_make_no_incident(org, connection, capture):
    inbox = connection("inbox")
    with db.connection_context():
        existing = new_incident(org.id, "From an earlier attempt")
    kept = capture(connection("incident"), make_raw("Routed before"), incident=existing.id, route="new-incident")
    ids = [capture(inbox, make_raw(f"Keep {i}")) for i in range(3)] + [kept]
    assert run_batch(ids) == {"inbox": 3, "kept": 1}
    msgs = messages(ids)
    assert [m.route for m in msgs] == ["inbox", "inbox", "inbox", "new-incident"]
    assert [m.incident_id for m in msgs] == [None, None, None, existing.id]
    assert all(m.state == "processed" for m in msgs) and msgs[3].subject == "Routed before"
    assert len(incidents(org)) == 1


def test_one_broken_email_in_batch_is_quarantined_and_rest_processed(org, connection, capture):
    conn = connection("incident")
    ids = [capture(conn, make_raw("Good 1")),
           capture(conn, b"\x89PNG\r\n\x1a\n" + bytes(range(1, 256)) * 40),  # not an email at all
           capture(conn, make_raw("Good 2"))]
    assert run_batch(ids) == {"new-incident": 2, "quarantined": 1}
    good1, broken, good2 = messages(ids)
    assert good1.state == good2.state == "processed"
    assert broken.state == "quarantined" and broken.error.startswith("Cannot be parsed as an email")
    assert broken.incident_id is None and broken.attempts == 1 and broken.processed_at
    assert [i.number for i in incidents(org)] == [1, 2]
    with db.connection_context():
        logs = [entry.message for entry in ConnectionLog.select().where(ConnectionLog.connection == conn.id)]
    assert logs == [f"An email was sent to quarantine: {broken.error}"]


def test_unexpected_failure_gets_a_job_of_its_own_and_the_rest_goes_on(org, connection, capture, redis_conn):
    from services import queue

    conn = connection("incident")
    ids = [capture(conn, make_raw("Good 1")), capture(conn, make_raw("Lost")), capture(conn, make_raw("Good 2"))]
    with db.connection_context():
        lost = StoredMessage.get_by_id(ids[1])
    RawStore(runtime_data_dir()).path(lost.path).unlink()  # the file is gone: not a parse error
    assert run_batch(ids) == {"new-incident": 2, "retrying": 1}
    good1, lost, good2 = messages(ids)
    assert good1.state == good2.state == "processed"
    assert lost.state == "captured" and lost.attempts == 1  # counted; retried by its own job
    assert queue.queue("process").job_ids == [f"process-{lost.id}-n"]


def runtime_data_dir() -> str:
    from services import runtime

    return runtime.config()["DATA_DIR"]


def test_failure_at_the_last_attempt_is_quarantined(org, connection, capture, monkeypatch):
    conn = connection("incident")
    ids = [capture(conn, make_raw("Good")), capture(conn, make_raw("Explodes"), attempts=MAX_PROCESS_ATTEMPTS - 1)]
    real = process_module.extract_indicators

    def explode(parsed):
        if parsed.subject == "Explodes":
            raise ValueError("extractor bug")
        return real(parsed)

    monkeypatch.setattr(process_module, "extract_indicators", explode)
    assert run_batch(ids) == {"new-incident": 1, "quarantined": 1}
    good, bad = messages(ids)
    assert good.state == "processed"
    assert bad.state == "quarantined" and bad.attempts == MAX_PROCESS_ATTEMPTS
    assert bad.error == f"Processing failed {MAX_PROCESS_ATTEMPTS} times: ValueError: extractor bug"


def test_processing_records_the_sha256_of_each_raw_message_even_one_it_cannot_parse(org, connection, capture,
                                                                                     monkeypatch):
    conn = connection("incident")
    good, bad = make_raw("Hashed"), make_raw("Cannot be parsed")
    ids = [capture(conn, good), capture(conn, bad)]
    assert [m.sha256 for m in messages(ids)] == ["", ""]  # capture names files by their content hash only
    real = process_module.parse_bytes

    def parse(raw):
        if raw == bad:
            raise ParseError("internal_error", "made up for this test")
        return real(raw)

    monkeypatch.setattr(process_module, "parse_bytes", parse)
    assert run_batch(ids) == {"new-incident": 1, "quarantined": 1}
    assert [(m.state, m.sha256) for m in messages(ids)] == [
        ("processed", hashlib.sha256(good).hexdigest()), ("quarantined", hashlib.sha256(bad).hexdigest())]


def test_email_whose_attempts_all_died_with_the_worker_is_quarantined_unparsed(org, connection, capture,
                                                                               monkeypatch):
    # A worker killed mid-processing (out of memory, say) counted each attempt
    # but never finished; the next one must not die the same way again.
    conn = connection("incident")
    ids = [capture(conn, make_raw("Fine")), capture(conn, make_raw("Kills workers"), attempts=MAX_PROCESS_ATTEMPTS)]
    parsed = []
    real = process_module.parse_bytes
    monkeypatch.setattr(process_module, "parse_bytes", lambda raw: parsed.append(raw) or real(raw))
    assert run_batch(ids) == {"new-incident": 1, "quarantined": 1}
    fine, killer = messages(ids)
    assert fine.state == "processed" and len(parsed) == 1
    assert killer.state == "quarantined" and killer.incident_id is None
    assert killer.error.startswith(f"Processing did not finish in {MAX_PROCESS_ATTEMPTS} attempts")


def test_message_processed_by_another_worker_is_skipped(org, connection, capture, monkeypatch):
    conn = connection("incident")
    ids = [capture(conn, make_raw(f"Race {i}")) for i in range(3)]
    with db.connection_context():
        theirs = new_incident(org.id, "The other worker's")
    real = process_module.parse_bytes

    def parse_while_another_worker_finishes(raw):
        parsed = real(raw)
        if parsed.subject == "Race 1":  # between our first read and our write transaction
            StoredMessage.update(state="processed", incident=theirs.id, route="new-incident").where(
                StoredMessage.id == ids[1]).execute()
        return parsed

    monkeypatch.setattr(process_module, "parse_bytes", parse_while_another_worker_finishes)
    assert run_batch(ids) == {"new-incident": 2, "skipped": 1}
    msgs = messages(ids)
    assert msgs[1].incident_id == theirs.id and msgs[1].subject == ""  # untouched: never two incidents
    assert [i.number for i in incidents(org)] == [1, 2, 3]
    with db.connection_context():
        assert Indicator.select().where(Indicator.message == ids[1]).count() == 0


def test_a_failing_write_falls_back_to_one_email_at_a_time(org, connection, capture, monkeypatch, redis_conn):
    from services import queue

    conn = connection("incident")
    ids = [capture(conn, make_raw(f"Write {i}")) for i in range(4)]
    real = route.route_many

    def fails_for_one(emails):
        if any(e.id == ids[2] for e in emails):
            raise RuntimeError("a row the database refuses")
        return real(emails)

    monkeypatch.setattr(route, "route_many", fails_for_one)
    assert run_batch(ids) == {"new-incident": 3, "retrying": 1}
    msgs = messages(ids)
    assert [m.state for m in msgs] == ["processed", "processed", "captured", "processed"]
    assert all(m.attempts == 1 for m in msgs)  # the fallback does not count a second attempt
    with db.connection_context():  # the failed transaction left nothing behind
        assert Indicator.select().where(Indicator.message == ids[2]).count() == 0
    assert [i.number for i in incidents(org)] == [1, 2, 3]
    assert queue.queue("process").job_ids == [f"process-{ids[2]}-n"]


def test_incident_number_clash_retries_the_whole_transaction(org, connection, capture, monkeypatch):
    conn = connection("incident")
    ids = [capture(conn, make_raw(f"Clash {i}")) for i in range(3)]
    real, calls = route.route_many, []

    def clash_once(emails):
        calls.append(len(emails))
        result = real(emails)
        if len(calls) == 1:  # as a concurrent worker committing the same numbers first
            raise IntegrityError("UNIQUE constraint failed: incident.organization_id, incident.number")
        return result

    monkeypatch.setattr(route, "route_many", clash_once)
    assert run_batch(ids) == {"new-incident": 3}
    assert calls == [3, 3]
    assert [i.number for i in incidents(org)] == [1, 2, 3]
    assert all(m.attempts == 1 and m.state == "processed" for m in messages(ids))


def test_workers_processing_at_once_make_one_incident_each_numbered_without_gaps(org, connection, capture, app):
    """Three workers at once, with their own database connections: two
    disjoint batches (the same next incident numbers: on PostgreSQL one
    insert clashes and its transaction is retried) and one overlapping
    both (those emails are skipped by whoever comes second)."""
    import threading

    from ingest.process import process_many

    conn = connection("incident")
    ids = [capture(conn, make_raw(f"Concurrent {i}")) for i in range(30)]
    batches = [ids[0:15], ids[15:30], ids[10:20]]
    start, results, errors = threading.Barrier(len(batches)), [], []

    def worker(batch):
        try:
            start.wait(timeout=10)
            with db.connection_context():
                results.append(process_many(batch, RawStore(app.config["DATA_DIR"])))
        except Exception as e:  # reported below, not lost in the thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(b,)) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and len(results) == 3
    outcomes = [o for r in results for o in r.values()]
    assert not [o for o in outcomes if isinstance(o, Exception)], outcomes
    assert outcomes.count("new-incident") == 30 and outcomes.count("skipped") == 10
    msgs = messages(ids)
    assert all(m.state == "processed" for m in msgs)
    assert [i.number for i in incidents(org)] == list(range(1, 31))
    assert len({m.incident_id for m in msgs}) == 30


def test_single_email_processing_raises_for_its_job_retries(org, connection, capture, app):
    from ingest.process import process

    conn = connection("incident")
    mid = capture(conn, make_raw("Alone"))
    with db.connection_context():
        lost = StoredMessage.get_by_id(mid)
        RawStore(app.config["DATA_DIR"]).path(lost.path).unlink()
        with pytest.raises(FileNotFoundError):
            process(mid, RawStore(app.config["DATA_DIR"]))
        assert StoredMessage.get_by_id(mid).attempts == 1
        assert process(10 ** 9, RawStore(app.config["DATA_DIR"])) == "skipped"  # gone


@pytest.mark.parametrize("routing", ["incident", "case"])
def test_batch_uses_constant_statements(org, connection, capture, monkeypatch, routing):
    """A batch costs the same few statements whatever its size (the old
    path ran ~11 per email)."""
    conn = connection(routing)
    with db.connection_context():
        first = new_incident(org.id, "Case to reply to")
    seen: list[str] = []
    real_cursor, real_begin = db.obj.cursor, db.obj.begin

    class CountingCursor:
        """Counts at the driver: execute_sql's statements and executemany's
        (on SQLite the UPDATE is one executemany: one compiled statement run
        for each row, in-process)."""

        def __init__(self, cursor):
            self._cursor = cursor

        def execute(self, sql, params=()):
            if not sql.upper().startswith("BEGIN"):  # counted by begin(), on PostgreSQL too
                seen.append(sql)
            return self._cursor.execute(sql, params)

        def executemany(self, sql, rows):
            seen.append(sql)
            return self._cursor.executemany(sql, rows)

        def __getattr__(self, name):
            return getattr(self._cursor, name)

        def __iter__(self):
            return iter(self._cursor)

    def cursor(*args, **kwargs):
        return CountingCursor(real_cursor(*args, **kwargs))

    def begin(*args, **kwargs):
        seen.append("BEGIN")
        return real_begin(*args, **kwargs)

    def statements(n: int) -> list[str]:
        ids = [capture(conn, make_raw(f"Count {n} {i}" + (f" [{first.tag}]" if i % 3 == 0 else ""),
                                      attachment=b"x%d" % i if i % 4 == 0 else None)) for i in range(n)]
        seen.clear()
        monkeypatch.setattr(db.obj, "cursor", cursor)
        monkeypatch.setattr(db.obj, "begin", begin)
        try:
            outcome = run_batch(ids)
        finally:
            monkeypatch.undo()
        assert sum(outcome.values()) == n and set(outcome) <= {"new-incident", "threaded"}
        return [s.split(None, 1)[0].upper() for s in seen]

    small, large = statements(5), statements(25)
    assert len(large) == len(small), (small, large)
    assert len(large) <= 16, large
    assert large.count("BEGIN") == 1  # one write transaction for the batch


# -- The statements written out by hand give what peewee would have written.

def _sample_values():
    import datetime as dt
    import decimal
    import enum

    class Text(str):
        pass

    class Level(enum.IntEnum):
        HIGH = 3

    return [None, "", "text", Text("a str subclass"), "2024-05-01 10:11:12", "12", 0, 7, 2 ** 70, True, False,
            1.5, decimal.Decimal("2.5"), b"bytes", Level.HIGH, dt.datetime(2024, 5, 1, 10, 11, 12, 13),
            dt.date(2024, 5, 1)]


def test_db_value_shortcut_skips_only_values_db_value_returns_unchanged(app):
    """For every field of every model and values of many types: a value the
    fast path passes by is one f.db_value returns as it is (the same
    object), and fields that convert (EncryptedField...) get no fast path."""
    from models import EncryptedField, Organization

    values = _sample_values() + [Organization(id=3)]
    skipped = 0
    for model in ALL_MODELS:
        for f in model._meta.sorted_fields:
            keep = process_module._unchanged_types(f)
            if isinstance(f, EncryptedField):
                assert keep == frozenset(), f
            for v in values:
                if type(v) in keep:
                    skipped += 1
                    assert f.db_value(v) is v, (f, v)
    assert skipped > 100  # the shortcut does apply (str, int, bool, datetime, None...)


@pytest.mark.parametrize("model", [Attachment, Indicator, Incident, StoredMessage])
def test_db_rows_gives_what_db_value_gives(app, model):
    """Values of every type through every field of the models processing
    writes, each column mixing types: _db_rows gives what db_value gives one
    value at a time (same values, same types)."""
    from models import Organization

    fields = model._meta.sorted_fields
    values = _sample_values() + [Organization(id=3)]
    for shift in range(len(values)):
        rows = [tuple(values[(shift + i + j) % len(values)] for i in range(len(fields))) for j in range(5)]
        expected = [tuple(f.db_value(v) for f, v in zip(fields, row)) for row in rows]
        got = process_module._db_rows(fields, rows)
        assert got == expected
        assert [[type(v) for v in row] for row in got] == [[type(v) for v in row] for row in expected]


def test_db_rows_leaves_rows_as_processing_makes_them():
    rows = [(1, "invoice.pdf", "application/pdf", 5, "c" * 64, "d" * 32, "att/x", True)] * 3
    fields = (Attachment.message, Attachment.filename, Attachment.content_type, Attachment.size, Attachment.sha256,
              Attachment.md5, Attachment.path, Attachment.from_evidence)
    assert process_module._db_rows(fields, rows) is rows  # nothing to convert: not even copied


def _twin_messages(conn, capture, n: int) -> list[int]:
    return [capture(conn, make_raw(f"Twin {i}")) for i in range(n)]


def _stored(model, where_column: str, ids: list[int], columns: list[str]) -> dict[int, tuple]:
    """{id: the columns as the database holds them}, read without peewee's
    python_value (which would turn "2024-05-02" and "2024-05-02 00:00:00"
    into the same datetime)."""
    q = db.quote[0] + "{}" + db.quote[1]
    sql = (f"SELECT {q.format(where_column)}, {', '.join(q.format(c) for c in columns)} "
           f"FROM {q.format(model._meta.table_name)} WHERE {q.format(where_column)} IN "
           f"({', '.join([db.param] * len(ids))}) ORDER BY {q.format('id')}")
    out: dict[int, list] = {}
    for row in db.execute_sql(sql, ids).fetchall():
        out.setdefault(row[0], []).append(tuple(bytes(v) if isinstance(v, memoryview) else v for v in row[1:]))
    return out


@pytest.mark.parametrize("update", ["_update_each", "_update_case"])
def test_update_rows_write_what_peewee_update_writes(org, connection, capture, update):
    """Rows setting different columns, values db_value converts (a date-only
    str for a datetime, bytes for a text column, a float for an integer, an
    Incident for its id) and values it keeps: the database holds the same as
    after peewee's own UPDATE of a twin row."""
    import datetime as dt

    conn = connection("incident")
    with db.connection_context():
        inc = new_incident(org.id, "For the update")
    changes = [
        dict(subject="Subject 1", text_body="x" * 5000, state="processed", error="",
             processed_at=dt.datetime(2024, 5, 1, 1, 2, 3), route="new-incident", incident=inc.id),
        dict(subject="Subject 2", evidence_json='{"a": 1}', state="processed", error="", processed_at="2024-05-02"),
        dict(state="quarantined", error="Cannot be parsed", processed_at=dt.datetime(2024, 5, 3)),
        dict(route=b"bytes", attempts=1.7, subject="Twin", incident=inc, date=""),
        dict(state="quarantined", error="Another", processed_at=dt.datetime(2024, 5, 4), incident=None),
    ]
    ours, theirs = _twin_messages(conn, capture, len(changes)), _twin_messages(conn, capture, len(changes))
    columns = [f.column_name for f in StoredMessage._meta.sorted_fields  # all but what capture made differ
               if f.name not in ("id", "content_hash", "size", "path", "message_id", "captured_at")]
    with db.connection_context():
        with db.atomic():
            getattr(process_module, update)(StoredMessage, dict(zip(ours, changes)))
            for mid, values in zip(theirs, changes):
                StoredMessage.update(**values).where(StoredMessage.id == mid).execute()
        stored = _stored(StoredMessage, "id", ours + theirs, columns)
    assert [stored[a] for a in ours] == [stored[b] for b in theirs]
    route, attempts, incident = (columns.index(c) for c in ("route", "attempts", "incident_id"))
    assert stored[ours[3]][0][route] == "bytes" and stored[ours[3]][0][attempts] == 1
    assert stored[ours[3]][0][incident] == inc.id


def test_insert_rows_in_pieces_write_what_insert_many_writes(org, connection, capture):
    """More rows than one statement takes on SQLite (SQLITE_INSERT_ROWS),
    values db_value converts among them (bytes for text, a float for an
    integer, an int for a boolean): the database holds the same rows, in the
    same order, as after peewee's insert_many."""
    conn = connection("incident")
    ours, theirs = _twin_messages(conn, capture, 2), _twin_messages(conn, capture, 2)
    n = 2 * process_module.SQLITE_INSERT_ROWS + 5
    rows = [("url" if i % 3 else b"domain", f"http://{i}.example.net/", f"body {i}" if i % 7 else "") for i in range(n)]
    attachments = [(f"f{i}.bin", "application/octet-stream", i if i % 2 else i + 0.5, "a" * 64, "b" * 32, f"att/{i}",
                    bool(i % 3) if i % 5 else i % 3) for i in range(n)]
    i_fields = (Indicator.message, Indicator.kind, Indicator.value, Indicator.source)
    a_fields = (Attachment.message, Attachment.filename, Attachment.content_type, Attachment.size, Attachment.sha256,
                Attachment.md5, Attachment.path, Attachment.from_evidence)
    with db.connection_context():
        with db.atomic():
            process_module._insert_rows(Indicator, i_fields, [(ours[0], *r) for r in rows])
            Indicator.insert_many([dict(zip([f.name for f in i_fields], (theirs[0], *r))) for r in rows]).execute()
            process_module._insert_rows(Attachment, a_fields, [(ours[1], *r) for r in attachments])
            Attachment.insert_many([dict(zip([f.name for f in a_fields], (theirs[1], *r))) for r in attachments]).execute()
        indicators = _stored(Indicator, "message_id", [ours[0], theirs[0]], [f.column_name for f in i_fields[1:]])
        stored_attachments = _stored(Attachment, "message_id", [ours[1], theirs[1]],
                                     [f.column_name for f in a_fields[1:]])
    assert indicators[ours[0]] == indicators[theirs[0]] and len(indicators[ours[0]]) == n
    assert indicators[ours[0]][0][0] == "domain"
    assert stored_attachments[ours[1]] == stored_attachments[theirs[1]] and len(stored_attachments[ours[1]]) == n
    assert stored_attachments[ours[1]][0][2] == 0 and stored_attachments[ours[1]][5][6] == 1  # from 0.5 and 2


def test_reprocessing_replaces_the_rows_of_the_earlier_processing(org, connection, capture, app):
    """A forced reprocess starts over: the rows an earlier processing left
    are replaced, not doubled."""
    from ingest.process import process

    conn = connection("inbox")
    mid = capture(conn, make_raw("Twice", attachment=b"MZ twice"))
    store = RawStore(app.config["DATA_DIR"])
    with db.connection_context():
        assert process(mid, store) == "inbox"
        first = (Attachment.select().where(Attachment.message == mid).count(),
                 Indicator.select().where(Indicator.message == mid).count())
        StoredMessage.update(state="quarantined").where(StoredMessage.id == mid).execute()
        assert process(mid, store, force=True) == "inbox"
        again = (Attachment.select().where(Attachment.message == mid).count(),
                 Indicator.select().where(Indicator.message == mid).count())
    assert first == again and first[0] == 1 and first[1] > 0


# -- Attachment files: durable as a group, before the rows that name them.

def _att_files(app) -> list:
    from pathlib import Path

    root = Path(app.config["DATA_DIR"]) / "att"
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def test_attachment_files_are_durable_before_the_transaction_that_names_them(org, connection, capture, app,
                                                                            monkeypatch):
    from ingest import store as store_module

    conn = connection("incident")
    payloads = [unique("payload").encode() * 50 for _ in range(4)]
    ids = [capture(conn, make_raw(f"Attached {i}", attachment=payloads[i % 4])) for i in range(6)]  # two repeat
    events = []
    real_sync, real_dir, real_write = store_module._sync_path, store_module._fsync_dir, process_module._write_once

    def sync(path):
        events.append(("sync", path))
        return real_sync(path)

    def sync_dir(path):
        events.append(("dir", path))
        return real_dir(path)

    def write_once(batch):
        store = RawStore(app.config["DATA_DIR"])
        for w in batch:  # in place, complete, when the transaction that names them starts
            for a in w.attachments:
                assert store.path(a[6]).read_bytes() in payloads
        events.append(("write", len(batch)))
        return real_write(batch)

    monkeypatch.setattr(store_module, "_sync_path", sync)
    monkeypatch.setattr(store_module, "_fsync_dir", sync_dir)
    monkeypatch.setattr(process_module, "_write_once", write_once)
    assert run_batch(ids) == {"new-incident": 6}
    kinds = [e[0] for e in events]
    assert kinds.index("write") == len(kinds) - 1  # every fsync first
    assert kinds.count("sync") == 4  # each distinct file once, though two emails repeat one
    synced_dirs = {e[1] for e in events if e[0] == "dir"}
    with db.connection_context():
        rows = list(Attachment.select().where(Attachment.message.in_(ids)).order_by(Attachment.message))
    store = RawStore(app.config["DATA_DIR"])
    assert len(rows) == 6 and len({r.path for r in rows}) == 4
    for r in rows:
        assert r.path == f"att/{r.sha256[:2]}/{r.sha256}.bin"  # as put_bytes names it
        assert str(store.path(r.path).parent) in synced_dirs
    assert not [p for p in _att_files(app) if p.name.endswith(".part")]


def test_attachment_file_that_cannot_be_made_durable_fails_only_its_email(org, connection, capture, app,
                                                                         monkeypatch, redis_conn):
    import errno
    import hashlib

    from ingest import store as store_module
    from services import queue

    conn = connection("incident")
    bad = unique("cannot be synced").encode()
    ids = [capture(conn, make_raw("Fine 1", attachment=b"fine one")), capture(conn, make_raw("Bad", attachment=bad)),
           capture(conn, make_raw("Fine 2", attachment=b"fine two"))]
    bad_sha = hashlib.sha256(bad).hexdigest()
    real_sync = store_module._sync_path

    def sync(path):
        if f".{bad_sha[:16]}." in path:
            raise OSError(errno.EIO, "Input/output error")
        return real_sync(path)

    monkeypatch.setattr(store_module, "_sync_path", sync)
    assert run_batch(ids) == {"new-incident": 2, "retrying": 1}
    fine1, lost, fine2 = messages(ids)
    assert fine1.state == fine2.state == "processed"
    assert lost.state == "captured" and lost.attempts == 1 and lost.incident_id is None
    assert queue.queue("process").job_ids == [f"process-{lost.id}-n"]
    with db.connection_context():
        assert Attachment.select().where(Attachment.message == lost.id).count() == 0
        assert Attachment.select().where(Attachment.message.in_([fine1.id, fine2.id])).count() == 2
    assert not [p for p in _att_files(app) if bad_sha[:16] in p.name]  # neither in place nor a temporary file


def test_put_group_stores_as_put_bytes_only_once_committed(app, tmp_path):
    from ingest.store import PutGroup

    store = RawStore(tmp_path / "data")
    group = PutGroup(store, kind="att")
    rel = group.put(b"first")
    assert group.put(b"first") == rel  # the same bytes once
    assert not store.path(rel).exists()  # not in place before commit
    other = group.put(b"second", sha="f" * 64)  # the caller's hash names it, as put_bytes
    assert group.commit() == {}
    assert store.path(rel).read_bytes() == b"first" and store.path(other).read_bytes() == b"second"
    assert (rel, other) == (store.put_bytes(b"first", kind="att")[0], "att/ff/" + "f" * 64 + ".bin")
    again = PutGroup(store, kind="att")
    assert again.put(b"first") == rel and again.commit() == {}  # stored before: nothing written
    left = PutGroup(store, kind="att")
    left.put(b"never committed")
    left.discard()
    assert sorted(p.name for p in (tmp_path / "data" / "att").rglob("*") if p.is_file()) == sorted(
        [rel.rsplit("/", 1)[1], other.rsplit("/", 1)[1]])
