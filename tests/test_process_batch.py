"""Processing a batch of captured emails (jobs.process.run_many): the same
result as one email at a time, with a few statements for the whole batch.
Real SQLite (or TEST_DATABASE_URL), real files; rows are made directly."""
from __future__ import annotations

import email.message

import pytest
from peewee import IntegrityError

from ingest import process as process_module
from ingest import route
from ingest.route import new_incident
from ingest.store import RawStore
from models import (MAX_PROCESS_ATTEMPTS, Attachment, ConnectionLog, EmailConnection, Incident, Indicator,
                    Organization, StoredMessage, db)
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
        rel, sha = store.put_bytes(raw, kind="raw", suffix=".eml")
        values = dict(organization=conn.organization_id, connection=conn, connection_name=conn.name, sha256=sha,
                      size=len(raw), path=rel, state="captured")
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


def test_email_whose_attempts_all_died_with_the_worker_is_quarantined_unparsed(org, connection, capture,
                                                                               monkeypatch):
    # A worker killed mid-processing (out of memory, say) counted each attempt
    # but never finished; the next one must not die the same way again.
    conn = connection("incident")
    ids = [capture(conn, make_raw("Fine")), capture(conn, make_raw("Kills workers"), attempts=MAX_PROCESS_ATTEMPTS)]
    parsed_paths = []
    real = process_module.parse_file
    monkeypatch.setattr(process_module, "parse_file", lambda path: parsed_paths.append(path) or real(path))
    assert run_batch(ids) == {"new-incident": 1, "quarantined": 1}
    fine, killer = messages(ids)
    assert fine.state == "processed" and len(parsed_paths) == 1
    assert killer.state == "quarantined" and killer.incident_id is None
    assert killer.error.startswith(f"Processing did not finish in {MAX_PROCESS_ATTEMPTS} attempts")


def test_message_processed_by_another_worker_is_skipped(org, connection, capture, monkeypatch):
    conn = connection("incident")
    ids = [capture(conn, make_raw(f"Race {i}")) for i in range(3)]
    with db.connection_context():
        theirs = new_incident(org.id, "The other worker's")
    real = process_module.parse_file

    def parse_while_another_worker_finishes(path):
        parsed = real(path)
        if parsed.subject == "Race 1":  # between our first read and our write transaction
            StoredMessage.update(state="processed", incident=theirs.id, route="new-incident").where(
                StoredMessage.id == ids[1]).execute()
        return parsed

    monkeypatch.setattr(process_module, "parse_file", parse_while_another_worker_finishes)
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
    real_execute, real_begin = db.obj.execute_sql, db.obj.begin

    def execute_sql(sql, params=None):
        seen.append(sql)
        return real_execute(sql, params)

    def begin(*args, **kwargs):
        seen.append("BEGIN")
        return real_begin(*args, **kwargs)

    def statements(n: int) -> list[str]:
        ids = [capture(conn, make_raw(f"Count {n} {i}" + (f" [{first.tag}]" if i % 3 == 0 else ""),
                                      attachment=b"x%d" % i if i % 4 == 0 else None)) for i in range(n)]
        seen.clear()
        monkeypatch.setattr(db.obj, "execute_sql", execute_sql)
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
