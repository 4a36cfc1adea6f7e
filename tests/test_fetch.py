"""Fetching a real Dovecot mailbox into incidents: nothing lost, nothing twice."""
from __future__ import annotations

import datetime as dt
import email.message
import hashlib

import pytest

from models import EmailConnection, FetchRun, Incident, RemoteKey, StoredMessage, db, utcnow


def make_mail(i: int, subject: str | None = None, *, msgid: str | None = None, in_reply_to: str = "",
              body: str = "", sender: str = "reporter@example.com") -> bytes:
    m = email.message.EmailMessage()
    m["From"] = sender
    m["To"] = "phish@example.com"
    m["Subject"] = subject or f"Suspicious message {i}"
    m["Message-ID"] = msgid or f"<msg-{i}-{hashlib.md5(str(i).encode()).hexdigest()[:8]}@example.com>"
    m["Date"] = "Mon, 30 Nov 2026 03:00:00 +0000"
    if in_reply_to:
        m["In-Reply-To"] = in_reply_to
        m["References"] = in_reply_to
    m.set_content(body or f"Please look at http://bad-{i}.example.net/login now.\n")
    return bytes(m)


@pytest.fixture
def imap_connection(app, make_admin, dovecot):
    """A saved, tested IMAP connection to a fresh Dovecot user (plain IMAP)."""
    def make(routing: str = "incident", **over):
        email_addr, password = dovecot.add_user()
        _, _, org = make_admin()
        with db.connection_context():
            fields = dict(organization=org, name="Phishing reports", api_name="Phishing", protocol="imap",
                          host=dovecot.host, port=dovecot.plain_port, encryption="none", email_address=email_addr,
                          password=password, status="ok", next_fetch_at=utcnow(), routing=routing)
            fields.update(over)
            conn = EmailConnection.create(**fields)
        conn.user = email_addr
        return conn
    return make


def fetch_and_process(conn, run_jobs) -> dict:
    from jobs import fetch

    result = fetch.fetch(conn.id)
    run_jobs()
    return result


def counts(conn):
    with db.connection_context():
        return (StoredMessage.select().where(StoredMessage.connection == conn.id).count(),
                Incident.select().where(Incident.organization == conn.organization_id).count())


def append_many(dovecot, user, raws):
    with dovecot.client(user) as c:
        for raw in raws:
            c.append("INBOX", raw)


@pytest.mark.slow
def test_1000_messages_become_1000_incidents_and_a_second_run_adds_nothing(imap_connection, dovecot, run_jobs):
    conn = imap_connection()
    append_many(dovecot, conn.user, [make_mail(i) for i in range(1000)])
    result = fetch_and_process(conn, run_jobs)
    assert result["stored"] == 1000
    assert counts(conn) == (1000, 1000)
    assert dovecot.unseen(conn.user) == []
    with db.connection_context():
        assert StoredMessage.select().where((StoredMessage.connection == conn.id)
                                            & (StoredMessage.state != "processed")).count() == 0
        fresh = EmailConnection.get_by_id(conn.id)
        assert fresh.messages_total == 1000 and fresh.status == "ok" and fresh.last_fetch_at
    again = fetch_and_process(conn, run_jobs)
    assert again["listed"] == 0 and counts(conn) == (1000, 1000)


def test_crash_before_mark_read_is_repaired_without_duplicates(imap_connection, dovecot, run_jobs, monkeypatch):
    from connectors.imap import ImapConnector

    conn = imap_connection()
    append_many(dovecot, conn.user, [make_mail(i) for i in range(5)])

    def crash(self, messages):
        raise RuntimeError("worker killed before mark read")
    monkeypatch.setattr(ImapConnector, "mark_read", crash)
    from jobs import fetch
    fetch.fetch(conn.id)
    assert len(dovecot.unseen(conn.user)) == 5  # stored but still unread on the server
    monkeypatch.undo()
    again = fetch_and_process(conn, run_jobs)
    assert again["stored"] == 0 and again["duplicates"] == 5
    assert counts(conn) == (5, 5)
    assert dovecot.unseen(conn.user) == []


def test_same_message_under_a_new_uid_is_not_stored_twice(imap_connection, dovecot, run_jobs):
    conn = imap_connection()
    raw = make_mail(1)
    append_many(dovecot, conn.user, [raw])
    fetch_and_process(conn, run_jobs)
    append_many(dovecot, conn.user, [raw])  # re-delivered: new UID, same bytes
    again = fetch_and_process(conn, run_jobs)
    assert again["duplicates"] == 1 and counts(conn) == (1, 1)
    with db.connection_context():
        assert RemoteKey.select().where(RemoteKey.connection == conn.id).count() == 2


def test_reply_threads_into_its_case_and_subject_tag_threads(imap_connection, dovecot, run_jobs):
    conn = imap_connection(routing="case")
    append_many(dovecot, conn.user, [make_mail(1, "Invoice overdue", msgid="<first@example.com>")])
    fetch_and_process(conn, run_jobs)
    with db.connection_context():
        inc = Incident.get(Incident.organization == conn.organization_id)
    append_many(dovecot, conn.user, [
        make_mail(2, "Re: Invoice overdue", in_reply_to="<first@example.com>"),
        make_mail(3, f"More info [{inc.tag}]"),
        make_mail(4, "Unrelated"),
    ])
    fetch_and_process(conn, run_jobs)
    with db.connection_context():
        assert Incident.select().where(Incident.organization == conn.organization_id).count() == 2
        emails = {m.subject: m.incident_id for m in StoredMessage.select().where(StoredMessage.connection == conn.id)}
    assert emails["Re: Invoice overdue"] == inc.id
    assert emails[f"More info [{inc.tag}]"] == inc.id
    assert emails["Unrelated"] != inc.id


def test_keep_in_inbox_creates_no_incident(imap_connection, dovecot, run_jobs):
    conn = imap_connection(routing="inbox")
    append_many(dovecot, conn.user, [make_mail(1)])
    fetch_and_process(conn, run_jobs)
    assert counts(conn) == (1, 0)


def test_forwarded_as_attachment_exposes_inner_sender_urls_and_hashes(imap_connection, dovecot, run_jobs):
    from models import Attachment, Indicator

    inner = email.message.EmailMessage()
    inner["From"] = "CEO <ceo@evil-payroll.example>"
    inner["To"] = "victim@example.com"
    inner["Subject"] = "Urgent wire transfer"
    inner["Message-ID"] = "<phish@evil-payroll.example>"
    inner.set_content("Pay now at https://evil-payroll.example/pay?id=1\n")
    inner.add_attachment(b"MZ\x90\x00fake-exe", maintype="application", subtype="octet-stream",
                         filename="invoice.exe")
    report = email.message.EmailMessage()
    report["From"] = "employee@example.com"
    report["To"] = "phish@example.com"
    report["Subject"] = "FW: Urgent wire transfer"
    report["Message-ID"] = "<report@example.com>"
    report.set_content("This looks like phishing.\n")
    report.add_attachment(inner)
    conn = imap_connection()
    append_many(dovecot, conn.user, [bytes(report)])
    fetch_and_process(conn, run_jobs)
    with db.connection_context():
        msg = StoredMessage.get(StoredMessage.connection == conn.id)
        assert msg.state == "processed", msg.error
        assert "ceo@evil-payroll.example" in msg.evidence_json
        values = {(i.kind, i.value) for i in Indicator.select().where(Indicator.message == msg)}
        hashes = {a.sha256 for a in Attachment.select().where(Attachment.message == msg)}
    exe_sha = hashlib.sha256(b"MZ\x90\x00fake-exe").hexdigest()
    assert ("email", "ceo@evil-payroll.example") in values
    assert any(k == "url" and "evil-payroll.example/pay" in v for k, v in values)
    assert ("sha256", exe_sha) in values and exe_sha in hashes


def test_50_mb_message_is_stored_intact(imap_connection, dovecot, run_jobs, app):
    from ingest.store import RawStore

    body = ("x" * 76 + "\n") * (50 * 1024 * 1024 // 77)  # 50 MB (its peak memory is measured in bench/)
    raw = make_mail(1, body=body)
    conn = imap_connection()
    append_many(dovecot, conn.user, [raw])
    fetch_and_process(conn, run_jobs)
    with db.connection_context():
        msg = StoredMessage.get(StoredMessage.connection == conn.id)
    stored = RawStore(app.config["DATA_DIR"]).path(msg.path).read_bytes()
    # Dovecot may normalise line endings to CRLF: compare what the server holds.
    with dovecot.client(conn.user) as c:
        c.select_folder("INBOX")
        uid = c.search(["ALL"])[0]
        server_copy = c.fetch([uid], ["BODY.PEEK[]"])[uid][b"BODY[]"]
    assert hashlib.sha256(stored).hexdigest() == hashlib.sha256(server_copy).hexdigest() == msg.sha256


def test_too_large_goes_to_quarantine_and_the_run_goes_on(imap_connection, dovecot, run_jobs):
    conn = imap_connection(max_message_size=50_000)
    append_many(dovecot, conn.user, [make_mail(1, body="y" * 80_000), make_mail(2)])
    result = fetch_and_process(conn, run_jobs)
    assert result["stored"] == 2 and result["quarantined"] == 1
    with db.connection_context():
        states = sorted(m.state for m in StoredMessage.select().where(StoredMessage.connection == conn.id))
    assert states == ["processed", "quarantined"]
    assert dovecot.unseen(conn.user) == []


def test_repeated_auth_failures_pause_the_connection(imap_connection, run_jobs):
    from jobs import fetch

    conn = imap_connection()
    with db.connection_context():
        EmailConnection.update(password="wrong").where(EmailConnection.id == conn.id).execute()
    for _ in range(3):
        fetch.fetch(conn.id)
    with db.connection_context():
        fresh = EmailConnection.get_by_id(conn.id)
    assert fresh.status == "paused" and "paused" in fresh.last_error
    with db.connection_context():  # not scheduled while paused
        assert conn.id not in {c.id for c in fetch.due(utcnow() + dt.timedelta(days=1))}


def test_transient_failure_backs_off(imap_connection):
    from jobs import fetch

    conn = imap_connection(port=1)
    before = utcnow()
    fetch.fetch(conn.id)
    with db.connection_context():
        fresh = EmailConnection.get_by_id(conn.id)
        assert fresh.status == "failing" and fresh.last_error_code == "connection_refused"
        assert fresh.next_fetch_at >= before + dt.timedelta(seconds=fresh.fetch_interval * 2)
        assert FetchRun.get(FetchRun.connection == conn.id).error


def test_scheduler_claims_each_due_connection_once(imap_connection, redis_conn):
    from jobs import fetch

    from services import queue

    conn = imap_connection()
    now = utcnow()
    with db.connection_context():
        assert fetch.enqueue_due(now) >= 1
        assert conn.id not in {c.id for c in fetch.due(now)}  # claimed: a second scheduler gets nothing
    assert f"fetch-{conn.id}" in queue.queue("fetch").job_ids
    assert fetch.enqueue(conn.id) is None  # already queued: not twice


def test_lock_prevents_two_concurrent_fetches(imap_connection, redis_conn):
    from jobs import fetch

    conn = imap_connection()
    lock = redis_conn.lock(f"intake:fetch-lock:{conn.id}", timeout=30)
    assert lock.acquire(blocking=False)
    try:
        assert fetch.fetch(conn.id) == {"skipped": "running"}
    finally:
        lock.release()


def test_cli_connections_list_and_fetch(imap_connection, dovecot, runner):
    conn = imap_connection()
    append_many(dovecot, conn.user, [make_mail(i) for i in range(3)])
    org_name = conn.organization.name
    result = runner.invoke(args=["connections", "list", "--org", org_name])
    assert result.exit_code == 0 and "Phishing" in result.output and str(conn.password) not in result.output
    result = runner.invoke(args=["connections", "fetch", "Phishing", "--org", org_name])
    assert result.exit_code == 0, result.output
    assert "stored: 3" in result.output and "new-incident: 3" in result.output
    result = runner.invoke(args=["connections", "test", "Phishing", "--org", org_name])
    assert result.exit_code == 0 and "OK: INBOX opened, 0 unread." in result.output


def test_exchange_connection_fetches_through_the_same_path(app, make_admin, ews_server, run_jobs):
    from jobs import fetch

    acct = ews_server.new_account("phish")
    ids = [ews_server.put(acct.address, make_mail(i)) for i in range(3)]
    _, _, org = make_admin()
    with db.connection_context():
        conn = EmailConnection.create(
            organization=org, name="Exchange reports", api_name="Exchange", protocol="exchange",
            endpoint=ews_server.url, email_address=acct.address, password=acct.password,
            trusted_cert_pem=ews_server.cert.cert_pem.decode(), status="ok", next_fetch_at=utcnow())
    result = fetch.fetch(conn.id)
    assert result["stored"] == 3, result
    run_jobs()
    assert counts(conn) == (3, 3)
    assert all(ews_server.is_read(i) for i in ids)
    assert fetch.fetch(conn.id)["listed"] == 0


def test_same_bytes_twice_in_one_batch_are_stored_once_and_no_temporary_file_is_left(imap_connection, dovecot, app):
    from pathlib import Path

    from jobs import fetch

    conn = imap_connection()
    raws = [make_mail(i, body=f"unique to this test {i}\n" * 50) for i in range(6)]
    append_many(dovecot, conn.user, raws[:3] + [raws[1]] + raws[3:])  # re-delivered within the batch
    data = Path(app.config["DATA_DIR"])
    before = {p for p in data.rglob("*") if p.is_file()}
    result = fetch.fetch(conn.id, enqueue_processing=False)
    assert (result["stored"], result["duplicates"]) == (6, 1)
    with db.connection_context():
        assert RemoteKey.select().where(RemoteKey.connection == conn.id).count() == 7
        paths = [m.path for m in StoredMessage.select().where(StoredMessage.connection == conn.id)]
    added = sorted(str(p.relative_to(data)) for p in data.rglob("*") if p.is_file() and p not in before)
    assert added == sorted(paths), "only the content-addressed files: no temporary file left anywhere"
    assert dovecot.unseen(conn.user) == []


def test_each_message_is_stored_one_shard_deep_under_its_blake3_content_hash(imap_connection, dovecot, app):
    """raw/ab/<hash>.eml: 256 shards, made once, rather than a directory for
    nearly every message of a young store (raw/ab/cd/). The hash is BLAKE3,
    capture's to compute; the SHA-256 is processing's."""
    from blake3 import blake3

    from jobs import fetch
    from ingest.store import RawStore

    conn = imap_connection()
    append_many(dovecot, conn.user, [make_mail(i) for i in range(5)])
    assert fetch.fetch(conn.id, enqueue_processing=False)["stored"] == 5
    store = RawStore(app.config["DATA_DIR"])
    with db.connection_context():
        rows = list(StoredMessage.select().where(StoredMessage.connection == conn.id))
    assert len(rows) == 5
    for m in rows:
        digest = blake3(store.path(m.path).read_bytes()).hexdigest()
        assert (m.content_hash, m.path, m.sha256) == (digest, f"raw/{digest[:2]}/{digest}.eml", "")


def test_a_file_that_cannot_be_written_stops_the_run_without_marking_it_read(imap_connection, dovecot, monkeypatch):
    """A failure on the writer thread (disk full) reaches the run: what was
    made durable before it is recorded and marked read, the rest stays unread
    and is fetched by the next run, once."""
    from ingest.store import RawStore
    from jobs import fetch

    conn = imap_connection()
    append_many(dovecot, conn.user, [make_mail(i) for i in range(200)])
    real, calls = RawStore.begin_whole, []

    def disk_full(self, data, sha=None):
        calls.append(1)
        if len(calls) == 150:
            raise OSError(28, "No space left on device")
        return real(self, data, sha)
    monkeypatch.setattr(RawStore, "begin_whole", disk_full)
    result = fetch.fetch(conn.id, enqueue_processing=False)
    assert "No space left on device" in result["error"]["message"]
    with db.connection_context():
        keys = {k.key: k.marked_read for k in RemoteKey.select().where(RemoteKey.connection == conn.id)}
    unseen = dovecot.unseen(conn.user)
    assert 0 < len(unseen) < 200
    # Marked read only if recorded (and so durable): every message is either read and stored, or unread.
    assert len(keys) == 200 - len(unseen) and all(keys.values())
    monkeypatch.undo()
    again = fetch.fetch(conn.id, enqueue_processing=False)
    assert again["stored"] == len(unseen) and dovecot.unseen(conn.user) == []
    with db.connection_context():
        assert StoredMessage.select().where(StoredMessage.connection == conn.id).count() == 200


def test_capture_writes_the_same_rows_as_peewee(app, make_admin):
    """Capture writes its rows with SQL of its own (for speed): the same
    columns, defaults and conversions as peewee's insert_many."""
    from ingest.capture import _insert_many

    _, _, org = make_admin()
    now = utcnow()
    with db.connection_context():
        conn = EmailConnection.create(organization=org, name="Rows", api_name="Rows", protocol="imap")
        row = dict(organization=org.id, connection=conn.id, connection_name="Rows", size=123, path="raw/x",
                   received_at="2026-11-30T03:00:00+00:00", message_id="<m@example.com>", state="captured",
                   error="", captured_at=now)
        StoredMessage.insert_many([dict(row, sha256="a" * 64)]).execute()
        _insert_many(StoredMessage, [dict(row, sha256="b" * 64)])
        ours, peewees = (StoredMessage.get(StoredMessage.sha256 == sha).__data__ for sha in ("b" * 64, "a" * 64))
        RemoteKey.insert_many([dict(connection=conn.id, key="7:1", message=peewees["id"], created_at=now)]).execute()
        _insert_many(RemoteKey, [dict(connection=conn.id, key="7:2", message=ours["id"], created_at=now)])
        keys = {k.key: k.__data__ for k in RemoteKey.select().where(RemoteKey.connection == conn.id)}
    ignore = {"id", "sha256", "key", "message"}
    assert {k: v for k, v in ours.items() if k not in ignore} == {k: v for k, v in peewees.items() if k not in ignore}
    assert ({k: v for k, v in keys["7:2"].items() if k not in ignore}
            == {k: v for k, v in keys["7:1"].items() if k not in ignore})
