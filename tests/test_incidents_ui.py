"""Incidents, Inbox and Quarantine over HTTP: what is listed, what is shown,
how email content is served (never as a page of ours), and that another
organization's rows are a 404. Rows are made directly in the database."""
from __future__ import annotations

import email.message
import json
import re

import pytest

from ingest.route import new_incident
from ingest.store import RawStore
from models import Attachment, EmailConnection, Incident, Indicator, StoredMessage, db
from tests.support.app_fixtures import unique


def make_raw(subject: str = "Invoice overdue", body: str = "Pay now at http://bad.example.net/pay\n") -> bytes:
    m = email.message.EmailMessage()
    m["From"] = "reporter@example.com"
    m["To"] = "phish@example.com"
    m["Subject"] = subject
    m["Message-ID"] = f"<{unique('m')}@example.com>"
    m.set_content(body)
    return bytes(m)


def add_connection(org, name="Phishing reports", api_name=None) -> EmailConnection:
    with db.connection_context():
        return EmailConnection.create(organization=org, name=name, api_name=api_name or unique("Conn").replace("-", "_"))


def add_incident(org, title="Invoice overdue", status="open", connection=None) -> Incident:
    with db.connection_context():
        inc = new_incident(org.id, title, connection)
        if status != "open":
            Incident.update(status=status).where(Incident.id == inc.id).execute()
            inc.status = status
        return inc


def add_message(app, org, incident=None, raw: bytes | None = None, **fields) -> StoredMessage:
    """A stored email with its raw file written where the workers keep it."""
    raw = make_raw() if raw is None else raw
    rel, sha = RawStore(app.config["DATA_DIR"]).put_bytes(raw, kind="raw", suffix=".eml")
    values = dict(organization=org, sha256=sha, size=len(raw), path=rel, state="processed", incident=incident,
                  subject="Invoice overdue", from_addr="Reporter <reporter@example.com>", to_addrs="phish@example.com",
                  text_body="Pay now", route="new-incident" if incident else "inbox", connection_name="Phishing reports")
    values.update(fields)
    with db.connection_context():
        return StoredMessage.create(**values)


def add_attachment(app, msg, data: bytes, filename: str, **fields) -> Attachment:
    rel, sha = RawStore(app.config["DATA_DIR"]).put_bytes(data, kind="att")
    with db.connection_context():
        return Attachment.create(message=msg, filename=filename, content_type=fields.pop("content_type", "text/html"),
                                 size=len(data), sha256=sha, md5="0" * 32, path=rel, **fields)


def fresh(model, row):
    with db.connection_context():
        return model.get_by_id(row.id)


@pytest.fixture
def other_org(app):
    from models import Organization

    with db.connection_context():
        return Organization.create(name=unique("Other"))


# ---- access ----

@pytest.mark.parametrize("path", ["/incidents/", "/inbox/", "/quarantine/"])
def test_pages_need_sign_in(client, path):
    resp = client.get(path)
    assert resp.status_code == 302 and "/login" in resp.headers["Location"]


def test_nav_links_for_signed_in_users(admin_client):
    html = admin_client.get("/incidents/").get_data(as_text=True)
    nav = re.search(r'<nav aria-label="Main">(.*?)</nav>', html, re.S).group(1)
    for name in ("Incidents", "Inbox", "Quarantine", "Administrator Settings"):
        assert f">{name}</a>" in nav


# ---- list ----

def test_list_newest_first_filtered_by_status_and_connection(admin_client, other_org):
    org = admin_client.org
    conn = add_connection(org, "Phishing reports")
    first = add_incident(org, "First report", connection=conn)
    second = add_incident(org, "Second report", status="closed")
    add_incident(other_org, "Not ours")
    html = admin_client.get("/incidents/").get_data(as_text=True)
    assert html.index("Second report") < html.index("First report")
    assert "Not ours" not in html
    closed = admin_client.get("/incidents/?status=closed").get_data(as_text=True)
    assert "Second report" in closed and "First report" not in closed
    by_conn = admin_client.get(f"/incidents/?connection={conn.api_name}").get_data(as_text=True)
    assert "First report" in by_conn and "Second report" not in by_conn
    assert f'<option value="{conn.api_name}" selected>' in by_conn
    unknown = admin_client.get("/incidents/?connection=Nope").get_data(as_text=True)
    assert "no connection with API Name “Nope”" in unknown and first.tag in unknown and second.tag in unknown


def test_list_is_paged(admin_client):
    for i in range(53):
        add_incident(admin_client.org, f"Report {i:02d}")
    page1 = admin_client.get("/incidents/?status=open").get_data(as_text=True)
    assert page1.count('<tr id="incident-') == 50 and "Page 1 of 2 (53 in all)" in page1
    assert 'href="/incidents/?status=open&amp;page=2"' in page1
    page2 = admin_client.get("/incidents/?status=open&page=2").get_data(as_text=True)
    assert page2.count('<tr id="incident-') == 3 and "Report 00" in page2


# ---- the case view ----

def test_detail_shows_email_evidence_attachments_indicators_and_sandboxed_frame(app, admin_client):
    inc = add_incident(admin_client.org, "Invoice overdue")
    evidence = {"subject": "Your mailbox is full", "from": "IT Desk <it@evil.example>", "date": "Mon, 1 Dec 2026",
                "message_id": "<phish@evil.example>", "to": ["victim@example.com"], "text": "Click to keep your mail"}
    msg = add_message(app, admin_client.org, inc, html_body="<p>Hello</p>", evidence_json=json.dumps(evidence),
                      text_body="See the attached <script>alert(1)</script>",
                      headers_json=json.dumps([["Received", "from mx.example.com"], ["X-Spam", "yes"]]))
    att = add_attachment(app, msg, b"<html>x</html>", "invoice.html", from_evidence=True)
    with db.connection_context():
        for kind, value in [("url", "http://evil.example/login"), ("domain", "evil.example"), ("ip", "203.0.113.9"),
                            ("url", "https://evil.example/b")]:
            Indicator.create(message=msg, kind=kind, value=value, source="body")
    html = admin_client.get(f"/incidents/{inc.number}").get_data(as_text=True)
    assert f"{inc.tag}: Invoice overdue" in html
    assert "Reported email: Your mailbox is full" in html and "IT Desk &lt;it@evil.example&gt;" in html
    assert "Click to keep your mail" in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>alert(1)" not in html
    frame = re.search(r"<iframe[^>]*>", html).group(0)
    assert re.search(r"\ssandbox[\s>]", frame) and "allow-" not in frame
    assert f'src="/incidents/messages/{msg.id}/body.html"' in frame
    assert f'href="/incidents/attachments/{att.id}" download>Download invoice.html</a>' in html
    assert "In the reported email" in html
    assert re.search(r"URLs \(2\).*http://evil.example/login.*Domains \(1\).*IP addresses \(1\)", html, re.S)
    assert 'href="http://evil.example' not in html  # indicators are text, never links
    assert "<th scope=\"row\">X-Spam</th><td>yes</td>" in html
    assert "Show remote images" not in html  # none to show
    assert f'href="/incidents/messages/{msg.id}/raw" download>Download raw email (.eml)</a>' in html


def test_close_and_reopen_with_htmx(admin_client):
    inc = add_incident(admin_client.org)
    resp = admin_client.post(f"/incidents/{inc.number}/status", data={"status": "closed"})
    html = resp.get_data(as_text=True)
    assert resp.status_code == 200 and "<html" not in html and "Reopen incident" in html
    assert fresh(Incident, inc).status == "closed"
    admin_client.post(f"/incidents/{inc.number}/status", data={"status": "open"})
    assert fresh(Incident, inc).status == "open"
    assert admin_client.post(f"/incidents/{inc.number}/status", data={"status": "deleted"}).status_code == 400


# ---- email content served safely ----

def test_html_frame_is_sanitized_and_locked_down(app, admin_client):
    msg = add_message(app, admin_client.org, html_body='<p>Hi</p><script>alert(1)</script><img src="https://t.example/p.gif">')
    resp = admin_client.get(f"/incidents/messages/{msg.id}/body.html")
    body = resp.get_data(as_text=True)
    csp = resp.headers["Content-Security-Policy"]
    assert csp.startswith("sandbox; default-src 'none'; style-src 'unsafe-inline'; img-src data:;")
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.mimetype == "text/html"
    assert "<p>Hi</p>" in body and "<script" not in body and ' src="https://t.example' not in body
    remote = admin_client.get(f"/incidents/messages/{msg.id}/body.html?remote=1")
    assert "img-src data: https:;" in remote.headers["Content-Security-Policy"]
    assert "https://t.example/p.gif" in remote.get_data(as_text=True)


def test_attachment_is_a_download_with_a_safe_name(app, admin_client):
    msg = add_message(app, admin_client.org)
    att = add_attachment(app, msg, b"<script>alert(1)</script>", '..\\..\\evil"\u202egpj.html')
    resp = admin_client.get(f"/incidents/attachments/{att.id}")
    assert resp.data == b"<script>alert(1)</script>"
    assert resp.mimetype == "application/octet-stream"
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    disposition = resp.headers["Content-Disposition"]
    assert disposition.startswith("attachment;") and "evil__gpj.html" in disposition
    assert "\\" not in disposition and ".." not in disposition
    inc = add_incident(admin_client.org)
    with db.connection_context():
        StoredMessage.update(incident=inc.id).where(StoredMessage.id == msg.id).execute()
    html = admin_client.get(f"/incidents/{inc.number}").get_data(as_text=True)
    assert "Download evil__gpj.html</a>" in html
    assert "Named in the email: <code>..\\..\\evil&#34;\\u202egpj.html</code>" in html


def test_raw_download_and_missing_file_message(app, admin_client):
    raw = make_raw("Raw one")
    msg = add_message(app, admin_client.org, raw=raw)
    resp = admin_client.get(f"/incidents/messages/{msg.id}/raw")
    assert resp.data == raw and resp.mimetype == "message/rfc822"
    assert resp.headers["Content-Disposition"] == f"attachment; filename=message-{msg.id}.eml"
    gone = add_message(app, admin_client.org, path="raw/00/00/missing.eml")
    resp = admin_client.get(f"/incidents/messages/{gone.id}/raw")
    assert resp.status_code == 404 and "DATA_DIR/raw/00/00/missing.eml" in resp.get_data(as_text=True)


def test_another_organizations_rows_are_not_found(app, admin_client, other_org):
    theirs = add_incident(other_org, "Their case")
    msg = add_message(app, other_org, theirs, html_body="<p>x</p>")
    att = add_attachment(app, msg, b"data", "a.txt")
    inbox_msg = add_message(app, other_org)
    quarantined = add_message(app, other_org, state="quarantined", error="bad")
    with db.connection_context():  # a number only the other organization has
        assert not Incident.select().where((Incident.organization == admin_client.org)
                                           & (Incident.number == theirs.number)).exists()
    for path in (f"/incidents/{theirs.number}", f"/incidents/messages/{msg.id}/body.html",
                 f"/incidents/messages/{msg.id}/raw", f"/incidents/attachments/{att.id}",
                 f"/inbox/{inbox_msg.id}", f"/quarantine/{quarantined.id}/row"):
        assert admin_client.get(path).status_code == 404, path
    for path in (f"/incidents/{theirs.number}/status", f"/inbox/{inbox_msg.id}/create-incident",
                 f"/inbox/{inbox_msg.id}/add-to-case", f"/quarantine/{quarantined.id}/reprocess"):
        assert admin_client.post(path, data={"status": "closed", "case": "1"}).status_code == 404, path
    assert fresh(StoredMessage, inbox_msg).incident_id is None


# ---- Inbox ----

def test_inbox_lists_only_unrouted_processed_mail_of_the_org(app, admin_client, other_org):
    org = admin_client.org
    waiting = add_message(app, org, subject="Waiting one")
    add_message(app, org, add_incident(org), subject="Routed one")
    add_message(app, org, subject="Broken one", state="quarantined")
    add_message(app, other_org, subject="Their one")
    html = admin_client.get("/inbox/").get_data(as_text=True)
    assert "Waiting one" in html
    for hidden in ("Routed one", "Broken one", "Their one"):
        assert hidden not in html
    assert f'<label for="case-{waiting.id}">Case number</label>' in html
    assert "Create incident</button>" in html and "Add to case</button>" in html


def test_create_incident_from_inbox(app, admin_client):
    msg = add_message(app, admin_client.org, subject="Make me a case")
    html = admin_client.post(f"/inbox/{msg.id}/create-incident").get_data(as_text=True)
    inc = fresh(StoredMessage, msg).incident
    assert inc.title == "Make me a case" and inc.created_by.email == admin_client.email
    assert f">{inc.tag}</a>" in html and "Created" in html and "<html" not in html
    assert "Make me a case" not in admin_client.get("/inbox/").get_data(as_text=True)


@pytest.mark.parametrize("typed", ["INC-{n}", "{n}", " inc-{n} ", "[INC-{n}]"])
def test_add_to_case_accepts_tag_or_number(app, admin_client, typed):
    inc = add_incident(admin_client.org, "Existing case")
    msg = add_message(app, admin_client.org)
    html = admin_client.post(f"/inbox/{msg.id}/add-to-case", data={"case": typed.format(n=inc.number)}).get_data(as_text=True)
    assert fresh(StoredMessage, msg).incident_id == inc.id
    assert f'Added to <a href="/incidents/{inc.number}">{inc.tag}</a>' in html


@pytest.mark.parametrize("typed, message", [
    ("", "Enter a case number, like INC-42 or 42."),
    ("case forty", "“case forty” is not a case number. Enter it like INC-42 or 42."),
    ("INC-999999", "There is no case INC-999999 in this organization."),
])
def test_add_to_case_errors_beside_the_field(app, admin_client, typed, message):
    msg = add_message(app, admin_client.org)
    resp = admin_client.post(f"/inbox/{msg.id}/add-to-case", data={"case": typed})
    html = resp.get_data(as_text=True)
    assert resp.status_code == 200  # htmx swaps 2xx only
    assert re.search(rf'id="err-case-{msg.id}">([^<]*)<', html).group(1) == message
    assert 'aria-invalid="true"' in html and fresh(StoredMessage, msg).incident_id is None


def test_add_to_case_of_another_org_is_refused(app, admin_client, other_org):
    theirs = add_incident(other_org)  # INC-1 there; our fresh organization has no INC-1
    msg = add_message(app, admin_client.org)
    html = admin_client.post(f"/inbox/{msg.id}/add-to-case", data={"case": theirs.tag}).get_data(as_text=True)
    assert f"There is no case {theirs.tag} in this organization." in html
    assert fresh(StoredMessage, msg).incident_id is None


# ---- Quarantine ----

def test_quarantine_lists_error_connection_size_attempts(app, admin_client, other_org):
    msg = add_message(app, admin_client.org, state="quarantined", attempts=3, subject="",
                      error="Cannot be parsed as an email: no headers", connection_name="Phishing reports")
    add_message(app, other_org, state="quarantined", error="Their error")
    html = admin_client.get("/quarantine/").get_data(as_text=True)
    row = re.search(rf'<tr id="quarantine-{msg.id}".*?</tr>', html, re.S).group(0)
    assert "Cannot be parsed as an email: no headers" in row and "Phishing reports" in row
    assert "<td>3</td>" in row and "Bytes</td>" in row and "Reprocess</button>" in row
    assert f'href="/incidents/messages/{msg.id}/raw"' in row
    assert "Their error" not in html


def _reprocess(admin_client, msg):
    from rq.job import Job

    from services import queue

    html = admin_client.post(f"/quarantine/{msg.id}/reprocess").get_data(as_text=True)
    assert "Queued for reprocessing" in html
    job_id = re.search(r'hx-get="/quarantine/\d+/row\?job=([^"]+)"', html).group(1)
    job = Job.fetch(job_id, connection=queue.connection())
    assert job.func_name == "jobs.process.run" and job.args[0] == msg.id and job.args[1] is True
    return job_id


def test_reprocess_a_valid_email_ends_processed(app, admin_client, run_jobs):
    msg = add_message(app, admin_client.org, raw=make_raw("Fixed now"), state="quarantined", attempts=3,
                      error="Processing failed 3 times: a bug since fixed", subject="", route="")
    job_id = _reprocess(admin_client, msg)
    run_jobs()
    done = fresh(StoredMessage, msg)
    assert done.state == "processed" and done.error == "" and done.incident.title == "Fixed now"
    row = admin_client.get(f"/quarantine/{msg.id}/row?job={job_id}").get_data(as_text=True)
    assert f'Processed: now in <a href="/incidents/{done.incident.number}">{done.incident.tag}</a>' in row
    assert "hx-get" not in row  # polling stops


def test_reprocess_a_broken_email_comes_back_with_its_error(app, admin_client, run_jobs):
    msg = add_message(app, admin_client.org, state="quarantined", attempts=1, error="old error",
                      path="raw/00/00/gone.eml")
    job_id = _reprocess(admin_client, msg)
    run_jobs()
    again = fresh(StoredMessage, msg)
    assert again.state == "quarantined" and again.attempts == 2 and again.error and again.error != "old error"
    row = admin_client.get(f"/quarantine/{msg.id}/row?job={job_id}").get_data(as_text=True)
    assert "Reprocessed: still in quarantine." in row and "Reprocess</button>" in row


def test_row_ignores_a_job_id_of_something_else(app, admin_client):
    msg = add_message(app, admin_client.org, state="quarantined", error="e")
    row = admin_client.get(f"/quarantine/{msg.id}/row?job=fetch-1").get_data(as_text=True)
    assert "Reprocess</button>" in row and "hx-get" not in row


# ---- CLI ----

@pytest.fixture
def cli(app):
    import commands_mail

    if "incidents" not in app.cli.commands:  # until app.py registers it
        commands_mail.register(app)
    return app.test_cli_runner()


def test_cli_lists_incidents_as_json_with_filters(cli, admin_client):
    org = admin_client.org
    conn = add_connection(org)
    a = add_incident(org, "From the mailbox", connection=conn)
    b = add_incident(org, "Closed one", status="closed")
    out = cli.invoke(args=["incidents", "list", "--json", "--org", org.name])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.output)
    assert [r["tag"] for r in rows] == [b.tag, a.tag]
    assert rows[1]["connection"] == conn.api_name and rows[1]["status"] == "open" and rows[1]["emails"] == 0
    out = cli.invoke(args=["incidents", "list", "--json", "--org", org.name, "--status", "open",
                           "--connection", conn.api_name])
    assert [r["title"] for r in json.loads(out.output)] == ["From the mailbox"]
    text = cli.invoke(args=["incidents", "list", "--org", org.name]).output
    assert a.tag in text and "Closed one" in text


def test_cli_explains_what_is_missing(cli, admin_client, other_org):
    out = cli.invoke(args=["incidents", "list"])
    assert out.exit_code != 0 and "choose one with --org NAME" in out.output
    out = cli.invoke(args=["incidents", "list", "--org", "No such org"])
    assert "No organization named 'No such org'" in out.output
    out = cli.invoke(args=["incidents", "list", "--org", admin_client.org.name, "--connection", "Nope"])
    assert f"No connection with API Name 'Nope' in {admin_client.org.name}" in out.output
