"""The REST API: tokens, organization scoping, rate limit, no secrets, and
every response checked against the OpenAPI document it serves."""
from __future__ import annotations

import hashlib
import json
import re
import socket

import pytest
from jsonschema import Draft202012Validator

from tests.support.app_fixtures import unique

from views.api_spec import document

SPEC = document()
PREFIX = SPEC["servers"][0]["url"]

# Known strings planted in every secret field: none may appear in any answer.
SECRETS = {
    "password": "pw-SECRET-1a2b3c",
    "proxy_password": "proxy-SECRET-4d5e6f",
    "oauth_client_secret": "client-SECRET-7a8b9c",
    "oauth_private_key": "-----BEGIN PRIVATE KEY-----\nkey-SECRET-0d1e2f\n-----END PRIVATE KEY-----",
    "oauth_token_cache": '{"RefreshToken": {"x": {"secret": "refresh-SECRET-3a4b5c"}}}',
}
SECRET_MARKERS = ("pw-SECRET-1a2b3c", "proxy-SECRET-4d5e6f", "client-SECRET-7a8b9c", "key-SECRET-0d1e2f",
                  "refresh-SECRET-3a4b5c")


# -- the contract: OpenAPI document <-> responses ----------------------------------

def _resolve(node: dict) -> dict:
    while "$ref" in node:
        target = SPEC
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def _validator(schema: dict) -> Draft202012Validator:
    # The schema's $refs point into the document's components.
    root = {"$schema": "https://json-schema.org/draft/2020-12/schema", "components": SPEC["components"], **schema}
    return Draft202012Validator(root, format_checker=Draft202012Validator.FORMAT_CHECKER)


def _template_regex(template: str) -> re.Pattern:
    return re.compile("^" + re.sub(r"\\{[^}]+\\}", "[^/]+", re.escape(PREFIX + template)) + "$")


def operation_for(method: str, path: str) -> tuple[str, dict]:
    path = path.split("?", 1)[0]
    for template, ops in SPEC["paths"].items():
        if _template_regex(template).match(path) and method.lower() in ops:
            return template, ops[method.lower()]
    raise AssertionError(f"{method} {path} is not in the OpenAPI document")


def assert_documented(resp, method: str, path: str) -> None:
    """The status is documented for this operation and the body and headers match it."""
    template, op = operation_for(method, path)
    status = str(resp.status_code)
    assert status in op["responses"], f"{method} {template} answered undocumented {status}: {resp.data[:300]}"
    documented = _resolve(op["responses"][status])
    assert resp.mimetype == "application/json", f"{method} {path}: {resp.mimetype}"
    schema = documented["content"]["application/json"]["schema"]
    errors = sorted(_validator(schema).iter_errors(resp.get_json()), key=lambda e: list(e.path))
    assert not errors, f"{method} {path} ({status}) does not match the document:\n" + "\n".join(
        f"  at {list(e.path)}: {e.message}" for e in errors[:10])
    for header in documented.get("headers", {}):
        assert header in resp.headers, f"{method} {path} ({status}) lacks the documented header {header}"


class Api:
    """A test client that sends a bearer token and checks every answer
    against the OpenAPI document."""

    def __init__(self, client, token: str | None):
        self.client, self.token = client, token
        self.bodies: list[str] = []

    def call(self, method: str, path: str, token: str | None = "default", headers=None, **kw):
        headers = dict(headers or {})
        token = self.token if token == "default" else token
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        resp = getattr(self.client, method)(PREFIX + path, headers=headers, **kw)
        assert_documented(resp, method, PREFIX + path)
        self.bodies.append(resp.get_data(as_text=True))
        return resp

    def get(self, path, **kw):
        return self.call("get", path, **kw)

    def post(self, path, **kw):
        return self.call("post", path, **kw)


# -- fixtures -------------------------------------------------------------------------

def _free_port() -> int:
    """A port nothing listens on: connecting is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def issue(app):
    """issue(org=None) -> (token, org, user): a token of a (new) organization's
    administrator. The user cannot sign in (no password hashing: tests stay fast)."""
    from models import ApiToken, Membership, Organization, User, db

    def issue(org=None, name="tests"):
        with db.connection_context():
            org = org or Organization.create(name=unique("Org"))
            user = User.create(email=f"{unique('api')}@example.com", password_hash="!no-sign-in")
            Membership.create(user=user, organization=org, is_admin=True)
            _, token = ApiToken.issue(org, user, name)
        return token, org, user
    return issue


@pytest.fixture
def api(app, issue):
    token, org, user = issue()
    a = Api(app.test_client(), token)
    a.org, a.user = org, user
    return a


def make_connection(org, api_name=None, **kw):
    from models import EmailConnection, db

    values = dict(name="Phishing reports", api_name=api_name or unique("Phish").replace("-", "_"),
                  protocol="imap", host="127.0.0.1", port=_free_port(), encryption="none",
                  email_address="phish@example.com", source_folder="INBOX", status="ok",
                  proxy_username="proxy-user", oauth_client_id="client-id-public", **SECRETS)
    values.update(kw)
    with db.connection_context():
        return EmailConnection.create(organization=org, **values)


def make_incident(org, conn=None, title="Suspicious invoice", status="open", emails=1):
    from peewee import fn

    from models import Attachment, Incident, Indicator, StoredMessage, db

    with db.connection_context():
        number = Incident.select(fn.COALESCE(fn.MAX(Incident.number), 0)).where(Incident.organization == org).scalar()
        inc = Incident.create(organization=org, number=number + 1, title=title, status=status, connection=conn)
        for n in range(emails):
            digest = hashlib.sha256(f"{inc.id}-{n}".encode()).hexdigest()
            headers = [["Received", "from mx.evil.example by mx.example.com"], ["From", "Bad <bad@evil.example>"],
                       ["Subject", title], ["X-Internal-Routing", "not-in-the-summary"],
                       ["Authentication-Results", "mx.example.com; spf=fail"]]
            msg = StoredMessage.create(
                organization=org, connection=conn, connection_name=conn.name if conn else "", sha256=digest,
                size=1234, path=f"raw/{digest}.eml", state="processed", message_id=f"<{digest[:12]}@evil.example>",
                subject=title, from_addr="Bad <bad@evil.example>", to_addrs="phish@example.com",
                date="Mon, 1 Jan 2024 10:00:00 +0000", headers_json=json.dumps(headers), incident=inc,
                route="new-incident",
                evidence_json=json.dumps({"subject": "Invoice", "from": "x@evil.example", "date": "",
                                          "message_id": "<e@evil.example>", "to": ["victim@example.com"],
                                          "text": "body"}))
            Attachment.create(message=msg, filename="invoice.pdf.exe", content_type="application/octet-stream",
                              size=10, sha256="a" * 64, md5="b" * 32, path="att/x", from_evidence=True)
            Indicator.create(message=msg, kind="domain", value="evil.example", source="from")
            Indicator.create(message=msg, kind="url", value="http://evil.example/pay", source="body")
    return inc


def enqueue_fake(job_id: str, queue_name: str = "process"):
    """A queued job with this id that no worker in the test runs."""
    from services import queue

    return queue.queue(queue_name).enqueue("jobs.process.run", 0, job_id=job_id)


# -- the document ---------------------------------------------------------------------

def _route_operations(app) -> set[tuple[str, str]]:
    out = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint.startswith("api."):
            path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule).removeprefix(PREFIX)
            out |= {(path, m.lower()) for m in rule.methods - {"HEAD", "OPTIONS"}}
    return out


def test_every_api_route_is_documented_and_every_documented_operation_is_a_route(app):
    documented = {(path, method) for path, ops in SPEC["paths"].items() for method in ops}
    routes = _route_operations(app)
    assert routes - documented == set(), "routes missing from the OpenAPI document"
    assert documented - routes == set(), "documented operations without a route"


def test_openapi_document_is_served_and_well_formed(client):
    resp = client.get("/api/v1/openapi.json")  # no token needed
    assert resp.status_code == 200 and resp.get_json() == SPEC
    assert SPEC["openapi"].startswith("3.1")
    assert SPEC["components"]["securitySchemes"]["bearerAuth"] == {
        **SPEC["components"]["securitySchemes"]["bearerAuth"], "type": "http", "scheme": "bearer"}
    for name, schema in SPEC["components"]["schemas"].items():
        Draft202012Validator.check_schema(schema)
    op_ids = []
    for path, ops in SPEC["paths"].items():
        for method, op in ops.items():
            op_ids.append(op["operationId"])
            for status, response in op["responses"].items():
                response = _resolve(response)
                assert response["content"]["application/json"]["schema"], (path, method, status)
            secured = op.get("security", SPEC["security"]) != []
            if secured:
                assert {"401", "429"} <= set(op["responses"]), (path, method)
            for p in re.findall(r"{([^}]+)}", path):
                assert any(x["name"] == p and x["in"] == "path" for x in op.get("parameters", [])), (path, p)
    assert len(op_ids) == len(set(op_ids))


def _fill(template: str, values: dict) -> str:
    return re.sub(r"{([^}]+)}", lambda m: str(values[m.group(1)]), template)


def test_every_documented_operation_answers_as_documented(api):
    """Walks the document itself, so a newly documented operation is covered."""
    conn = make_connection(api.org)
    inc = make_incident(api.org, conn)
    values = {"api_name": conn.api_name, "number": inc.number}
    # POSTs come first in the document: a GET of /jobs/{job_id} uses the id they answered.
    ops = sorted(((t, m, op) for t, methods in SPEC["paths"].items() for m, op in methods.items()),
                 key=lambda x: x[1] != "post")
    for template, method, op in ops:
        resp = api.call(method, _fill(template, values))  # validated by Api.call
        assert resp.status_code in {int(s) for s in op["responses"] if s.startswith("2")}, (template, resp.data)
        values.setdefault("job_id", (resp.get_json() or {}).get("job_id"))


# -- authentication -----------------------------------------------------------------------

def _secured_calls(conn_name="Anything"):
    return [("get", "/connections"), ("get", f"/connections/{conn_name}"), ("post", f"/connections/{conn_name}/test"),
            ("post", f"/connections/{conn_name}/fetch"), ("get", "/jobs/fetch-1"), ("get", "/incidents"),
            ("get", "/incidents/1"), ("get", "/health")]


@pytest.mark.parametrize("method,path", _secured_calls())
def test_request_without_token_gets_401_json(api, method, path):
    resp = api.call(method, path, token=None)
    assert resp.status_code == 401
    error = resp.get_json()["error"]
    assert error["code"] == "missing_token" and "Authorization: Bearer" in error["message"]
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("header", ["Basic dXNlcjpwYXNz", "Bearer", "Token intake_abc", "bearer  "])
def test_malformed_authorization_is_missing_token(api, header):
    resp = api.get("/connections", token=None, headers={"Authorization": header})
    assert resp.status_code == 401 and resp.get_json()["error"]["code"] == "missing_token"


@pytest.mark.parametrize("token", ["intake_not-a-real-token", "not-even-the-prefix", "intake_" + "x" * 300])
def test_unknown_token_gets_401_invalid_token(api, token):
    resp = api.get("/connections", token=token)
    assert resp.status_code == 401
    assert resp.get_json()["error"]["code"] == "invalid_token"


def test_bearer_scheme_is_case_insensitive(api):
    resp = api.get("/connections", token=None, headers={"Authorization": f"bearer {api.token}"})
    assert resp.status_code == 200


def test_revoked_token_gets_401(api):
    from models import ApiToken, db

    assert api.get("/connections").status_code == 200
    with db.connection_context():
        ApiToken.get(ApiToken.organization == api.org).revoke()
    resp = api.get("/connections")
    assert resp.status_code == 401 and resp.get_json()["error"]["code"] == "invalid_token"


def test_token_stops_working_when_its_creator_is_no_longer_an_admin(api):
    from models import Membership, User, db

    with db.connection_context():
        Membership.update(is_admin=False).where(Membership.user == api.user).execute()
    assert api.get("/connections").status_code == 401
    with db.connection_context():
        Membership.update(is_admin=True).where(Membership.user == api.user).execute()
        User.update(is_active=False).where(User.id == api.user.id).execute()
    assert api.get("/connections").status_code == 401


def test_only_the_hash_of_a_token_is_stored(api):
    from models import ApiToken, db

    with db.connection_context():
        row = ApiToken.get(ApiToken.organization == api.org)
        raw = db.execute_sql("SELECT * FROM api_token WHERE id = ?".replace("?", db.param), (row.id,)).fetchone()
    assert not any(api.token in str(v) for v in raw)
    assert row.token_hash == hashlib.sha256(api.token.encode()).hexdigest()
    assert api.token.startswith(row.prefix) and len(row.prefix) < 20 and api.token.startswith("intake_")


def test_use_is_recorded_on_the_token(api):
    from models import ApiToken, db

    api.get("/connections")
    with db.connection_context():
        assert ApiToken.get(ApiToken.organization == api.org).last_used_at is not None


def test_session_cookie_grants_nothing_and_api_needs_no_csrf(app, admin_client, issue):
    """A signed-in browser gets 401; a token works without any CSRF token."""
    conn = make_connection(admin_client.org)
    resp = admin_client.client.post(f"/api/v1/connections/{conn.api_name}/fetch")
    assert resp.status_code == 401 and resp.get_json()["error"]["code"] == "missing_token"
    token, _, _ = issue(admin_client.org)
    resp = Api(app.test_client(), token).post(f"/connections/{conn.api_name}/fetch")
    assert resp.status_code == 202


def test_unknown_api_address_and_wrong_method_answer_json(api):
    resp = api.client.get("/api/v1/no-such-thing", headers={"Authorization": f"Bearer {api.token}"})
    assert resp.status_code == 404 and resp.get_json()["error"]["code"] == "not_found"
    resp = api.client.delete("/api/v1/connections", headers={"Authorization": f"Bearer {api.token}"})
    assert resp.status_code == 405 and resp.get_json()["error"]["code"] == "method_not_allowed"
    assert "GET" in resp.headers["Allow"]
    resp = api.client.get("/api/v1/incidents/not-a-number", headers={"Authorization": f"Bearer {api.token}"})
    assert resp.status_code == 404 and resp.is_json


# -- rate limit -------------------------------------------------------------------------

def test_rate_limit_answers_429_with_retry_after(app, api, issue):
    app.config["API_RATE_LIMIT"] = 3
    for n in range(3):
        resp = api.get("/connections")
        assert resp.status_code == 200
        assert resp.headers["X-RateLimit-Remaining"] == str(2 - n)
    resp = api.get("/connections")
    assert resp.status_code == 429
    assert resp.get_json()["error"]["code"] == "rate_limited"
    assert 1 <= int(resp.headers["Retry-After"]) <= 60
    other, _, _ = issue(api.org)  # the limit is per token
    assert api.get("/connections", token=other).status_code == 200


# -- connections ----------------------------------------------------------------------------

def test_list_and_get_connections_without_secrets(api):
    conn = make_connection(api.org, proxy_enabled=True, proxy_host="proxy.example.com", proxy_port=3128)
    data = api.get("/connections").get_json()
    [item] = [c for c in data["connections"] if c["api_name"] == conn.api_name]
    assert item["has_password"] and item["has_oauth_client_secret"] and item["has_oauth_private_key"]
    assert item["has_oauth_grant"] and item["proxy"]["has_password"]
    assert item["proxy"] == {"enabled": True, "protocol": "http", "host": "proxy.example.com", "port": 3128,
                             "username": "proxy-user", "has_password": True}
    assert item["status"] == "ok" and item["created_at"].endswith("Z")
    detail = api.get(f"/connections/{conn.api_name}").get_json()
    assert detail == item
    for body in api.bodies:
        for marker in SECRET_MARKERS:
            assert marker not in body


def test_connection_without_secrets_says_so(api):
    conn = make_connection(api.org, password="", proxy_password="", oauth_client_secret="", oauth_private_key="",
                           oauth_token_cache="")
    item = api.get(f"/connections/{conn.api_name}").get_json()
    assert not any(item[k] for k in ("has_password", "has_oauth_client_secret", "has_oauth_private_key",
                                     "has_oauth_grant")) and not item["proxy"]["has_password"]


def test_unknown_connection_is_404(api):
    for method, path in (("get", "/connections/Nope"), ("post", "/connections/Nope/test"),
                         ("post", "/connections/Nope/fetch")):
        resp = api.call(method, path)
        assert resp.status_code == 404 and resp.get_json()["error"]["code"] == "not_found"


def test_test_endpoint_runs_a_test_and_reports_the_diagnosis(api, run_jobs):
    conn = make_connection(api.org)
    resp = api.post(f"/connections/{conn.api_name}/test")
    assert resp.status_code == 202
    job_id = resp.get_json()["job_id"]
    assert job_id.startswith("test-") and resp.get_json()["status_url"] == f"/api/v1/jobs/{job_id}"
    queued = api.get(f"/jobs/{job_id}").get_json()
    assert queued["kind"] == "test" and queued["status"] == "queued" and queued["result"] is None
    run_jobs()
    done = api.get(f"/jobs/{job_id}").get_json()
    assert done["status"] == "finished"
    assert done["result"]["ok"] is False
    assert done["result"]["diagnosis"]["code"] == "connection_refused"
    for body in api.bodies:
        for marker in SECRET_MARKERS:
            assert marker not in body


def test_successful_test_job_stays_visible_after_its_draft_is_gone(api, issue):
    """Test and Save deletes the draft on success; the job is then found by
    the connection in its result, and only by that connection's organization."""
    from rq.results import Result

    conn = make_connection(api.org)
    job = enqueue_fake("test-00000000-0000-4000-8000-000000000001", "default")
    job.set_status("finished")
    Result.create(job, Result.Type.SUCCESSFUL, ttl=600, return_value={
        "ok": True, "connection_id": conn.id, "api_name": conn.api_name, "folder": "INBOX", "unread": 3,
        "message": "Test succeeded", "password": SECRETS["password"]})
    data = api.get(f"/jobs/{job.id}").get_json()
    assert data["result"] == {"ok": True, "api_name": conn.api_name, "folder": "INBOX", "unread": 3,
                              "message": "Test succeeded"}
    other, _, _ = issue()
    assert api.get(f"/jobs/{job.id}", token=other).status_code == 404


def test_fetch_endpoint_queues_once_then_409_with_the_job_id(api, run_jobs):
    conn = make_connection(api.org)
    resp = api.post(f"/connections/{conn.api_name}/fetch")
    assert resp.status_code == 202
    job_id = resp.get_json()["job_id"]
    assert job_id == f"fetch-{conn.id}"
    again = api.post(f"/connections/{conn.api_name}/fetch")
    assert again.status_code == 409
    assert again.get_json()["error"] == {**again.get_json()["error"], "code": "fetch_in_progress", "job_id": job_id}
    assert api.get(f"/jobs/{job_id}").get_json()["status"] == "queued"
    run_jobs()
    done = api.get(f"/jobs/{job_id}").get_json()
    assert done["kind"] == "fetch" and done["status"] == "finished"
    assert done["result"]["error"]["code"] == "connection_refused"
    assert done["ended_at"].endswith("Z")


@pytest.mark.parametrize("fields,code", [
    ({"status": "never"}, "not_tested"),
    ({"status": "paused"}, "connection_paused"),
    ({"status": "grant"}, "grant_required"),
    ({"enabled": False}, "connection_disabled"),
])
def test_fetch_is_refused_for_a_connection_that_must_not_be_fetched(api, fields, code):
    conn = make_connection(api.org, **fields)
    resp = api.post(f"/connections/{conn.api_name}/fetch")
    assert resp.status_code == 409 and resp.get_json()["error"]["code"] == code


# -- jobs ---------------------------------------------------------------------------------------

def test_process_job_of_own_email_is_visible(api):
    inc = make_incident(api.org)
    from models import StoredMessage, db

    with db.connection_context():
        msg = StoredMessage.get(StoredMessage.incident == inc.id)
    enqueue_fake(f"process-{msg.id}-n")
    data = api.get(f"/jobs/process-{msg.id}-n").get_json()
    assert data["kind"] == "process" and data["status"] == "queued" and data["step"] is None


@pytest.mark.parametrize("job_id", ["whatever", "fetch-abc", "test-not-a-uuid", "test-00000000-0000-4000-8000-00000000dead",
                                    "process-1", "fetch-999999999"])
def test_unknown_or_malformed_job_id_is_404(api, job_id):
    resp = api.get(f"/jobs/{job_id}")
    assert resp.status_code == 404 and resp.get_json()["error"]["code"] == "not_found"


def test_expired_job_of_own_connection_is_404(api):
    conn = make_connection(api.org)
    assert api.get(f"/jobs/fetch-{conn.id}").status_code == 404


# -- incidents ------------------------------------------------------------------------------------

def test_incidents_are_paged_newest_first(api):
    conn = make_connection(api.org)
    made = [make_incident(api.org, conn, title=f"Incident {n}", emails=n % 2) for n in range(5)]
    first = api.get("/incidents?per_page=2").get_json()
    assert (first["page"], first["per_page"], first["total"], first["pages"]) == (1, 2, 5, 3)
    assert [i["number"] for i in first["incidents"]] == [made[4].number, made[3].number]
    assert first["incidents"][0]["tag"] == f"INC-{made[4].number}"
    assert first["incidents"][0]["connection"] == conn.api_name
    assert [i["email_count"] for i in first["incidents"]] == [0, 1]
    last = api.get("/incidents?per_page=2&page=3").get_json()
    assert [i["number"] for i in last["incidents"]] == [made[0].number]
    beyond = api.get("/incidents?per_page=2&page=9").get_json()
    assert beyond["incidents"] == [] and beyond["total"] == 5


def test_incidents_filter_by_connection_and_status(api):
    a, b = make_connection(api.org), make_connection(api.org)
    from_a = make_incident(api.org, a)
    make_incident(api.org, b)
    closed = make_incident(api.org, b, status="closed")
    by_conn = api.get(f"/incidents?connection={a.api_name}").get_json()
    assert [i["number"] for i in by_conn["incidents"]] == [from_a.number]
    by_status = api.get("/incidents?status=closed").get_json()
    assert [i["number"] for i in by_status["incidents"]] == [closed.number]
    both = api.get(f"/incidents?status=open&connection={b.api_name}").get_json()
    assert both["total"] == 1


@pytest.mark.parametrize("query,word", [
    ("per_page=101", "per_page"), ("per_page=0", "per_page"), ("page=0", "page"), ("page=two", "page"),
    ("status=pending", "status"), ("connection=NoSuchConnection", "connection"),
])
def test_invalid_incident_query_is_400(api, query, word):
    resp = api.get(f"/incidents?{query}")
    assert resp.status_code == 400
    error = resp.get_json()["error"]
    assert error["code"] == "invalid_parameter" and word in error["message"]


def test_incident_detail_has_emails_attachments_and_indicators(api):
    conn = make_connection(api.org)
    inc = make_incident(api.org, conn, emails=2)
    data = api.get(f"/incidents/{inc.number}").get_json()
    assert data["number"] == inc.number and data["email_count"] == 2 and len(data["emails"]) == 2
    email = data["emails"][0]
    assert email["subject"] == "Suspicious invoice" and email["from"] == "Bad <bad@evil.example>"
    assert email["message_id"].endswith("@evil.example>") and email["date"].startswith("Mon, 1 Jan 2024")
    assert email["attachments"] == [{"filename": "invoice.pdf.exe", "content_type": "application/octet-stream",
                                     "size": 10, "sha256": "a" * 64, "md5": "b" * 32, "from_evidence": True}]
    assert {(i["kind"], i["value"]) for i in email["indicators"]} == {("domain", "evil.example"),
                                                                      ("url", "http://evil.example/pay")}
    names = [h["name"] for h in email["headers"]]
    assert names == ["Received", "From", "Subject", "Authentication-Results"]  # X-Internal-Routing left out
    assert email["evidence"] == {"subject": "Invoice", "from": "x@evil.example", "date": "",
                                 "message_id": "<e@evil.example>", "to": ["victim@example.com"]}


def test_unknown_incident_is_404(api):
    assert api.get("/incidents/999999").status_code == 404


# -- organizations --------------------------------------------------------------------------------

def test_a_token_sees_nothing_of_another_organization(app, api, issue, run_jobs):
    their_org = issue()[1]
    theirs = make_connection(their_org, api_name="Theirs")
    their_token = Api(app.test_client(), issue(their_org)[0])
    their_incident = make_incident(their_org, theirs, title="Their secret incident")
    test_job = their_token.post(f"/connections/{theirs.api_name}/test").get_json()["job_id"]
    fetch_job = their_token.post(f"/connections/{theirs.api_name}/fetch").get_json()["job_id"]
    from models import StoredMessage, db
    with db.connection_context():
        their_msg = StoredMessage.get(StoredMessage.incident == their_incident.id)
    enqueue_fake(f"process-{their_msg.id}-n")
    mine = make_incident(api.org, title="Mine")  # same number space starts at 1 in each organization

    assert [c["api_name"] for c in api.get("/connections").get_json()["connections"]] == []
    for method, path in (("get", "/connections/Theirs"), ("post", "/connections/Theirs/test"),
                         ("post", "/connections/Theirs/fetch"), ("get", f"/jobs/{test_job}"),
                         ("get", f"/jobs/{fetch_job}"), ("get", f"/jobs/process-{their_msg.id}-n")):
        assert api.call(method, path).status_code == 404, path
    listed = api.get("/incidents").get_json()
    assert [i["title"] for i in listed["incidents"]] == ["Mine"]
    assert api.get("/incidents?connection=Theirs").status_code == 400
    if mine.number != their_incident.number:
        assert api.get(f"/incidents/{their_incident.number}").status_code == 404
    assert api.get(f"/incidents/{mine.number}").get_json()["title"] == "Mine"
    run_jobs()  # finished (and the test's draft gone or not) changes nothing
    assert api.get(f"/jobs/{test_job}").status_code == 404
    assert api.get(f"/jobs/{fetch_job}").status_code == 404
    assert their_token.get(f"/jobs/{test_job}").status_code == 200
    assert "Their secret incident" not in "".join(api.bodies)


# -- health --------------------------------------------------------------------------------------

def test_health_reports_the_service_and_the_organizations_connections(api):
    make_connection(api.org)
    make_connection(api.org, status="failing", enabled=False)
    data = api.get("/health").get_json()
    assert data["status"] == "ok" and data["database"] == "ok" and data["redis"] == "ok"
    assert data["connections"] == {"total": 2, "by_status": {"ok": 1, "failing": 1}, "disabled": 1}


# -- no secrets anywhere --------------------------------------------------------------------------

def test_no_secret_appears_in_any_api_response(api, run_jobs):
    conn = make_connection(api.org, protocol="imap", proxy_enabled=True, proxy_host="proxy.example.com",
                           proxy_port=3128)
    inc = make_incident(api.org, conn)
    test_job = api.post(f"/connections/{conn.api_name}/test").get_json()["job_id"]
    fetch_job = api.post(f"/connections/{conn.api_name}/fetch").get_json()["job_id"]
    run_jobs()
    for path in ("/connections", f"/connections/{conn.api_name}", f"/jobs/{test_job}", f"/jobs/{fetch_job}",
                 "/incidents", f"/incidents/{inc.number}", "/health", "/openapi.json"):
        api.get(path)
    assert len(api.bodies) == 10
    everything = "\n".join(api.bodies)
    for marker in SECRET_MARKERS:
        assert marker not in everything


# -- the admin page --------------------------------------------------------------------------------

def test_settings_has_an_api_tokens_tile(admin_client):
    html = admin_client.get("/settings/").get_data(as_text=True)
    assert 'href="/settings/api-tokens/"' in html and "API tokens" in html


def test_admin_creates_a_token_shown_once_and_it_works(app, admin_client):
    page = admin_client.get("/settings/api-tokens/").get_data(as_text=True)
    assert '<label for="token-name">Name</label>' in page and ">Create token</button>" in page
    resp = admin_client.post("/settings/api-tokens/", data={"name": "SOAR playbook"})
    html = resp.get_data(as_text=True)
    assert resp.status_code == 200 and "<html" not in html  # the htmx partial
    token = re.search(r'id="new-token" value="(intake_[^"]+)"', html).group(1)
    assert '<label for="new-token">Your new API token</label>' in html and "shown only this once" in html
    assert "SOAR playbook" in html and token[:15] in html
    assert Api(app.test_client(), token).get("/connections").status_code == 200
    again = admin_client.get("/settings/api-tokens/").get_data(as_text=True)
    assert token not in again and token[:15] in again  # only the prefix, from now on


def test_creating_a_token_without_a_name_shows_the_error_beside_the_field(admin_client):
    resp = admin_client.post("/settings/api-tokens/", data={"name": "  "})
    html = resp.get_data(as_text=True)
    assert resp.status_code == 200
    assert re.search(r'id="err-token-name">Enter a name', html) and 'aria-invalid="true"' in html
    assert 'id="new-token"' not in html


def test_form_post_without_htmx_renders_the_whole_page(admin_client):
    resp = admin_client.post("/settings/api-tokens/", data={"name": "No JS"}, htmx=False)
    html = resp.get_data(as_text=True)
    assert resp.status_code == 200 and "<html" in html and 'id="new-token"' in html


def test_admin_revokes_a_token(app, admin_client):
    from models import ApiToken, db

    html = admin_client.post("/settings/api-tokens/", data={"name": "To revoke"}).get_data(as_text=True)
    token = re.search(r'value="(intake_[^"]+)"', html).group(1)
    with db.connection_context():
        row = ApiToken.get(ApiToken.prefix == token[:15])
    assert 'aria-label="Revoke token To revoke">Revoke</button>' in html
    html = admin_client.post(f"/settings/api-tokens/{row.id}/revoke").get_data(as_text=True)
    assert "was revoked" in html and "Revoked" in html
    assert Api(app.test_client(), token).get("/connections").status_code == 401


def test_admin_cannot_revoke_another_organizations_token(admin_client, issue):
    from models import ApiToken, db

    token, _, _ = issue()
    with db.connection_context():
        row = ApiToken.get(ApiToken.prefix == token[:15])
    assert admin_client.post(f"/settings/api-tokens/{row.id}/revoke").status_code == 404
    with db.connection_context():
        assert ApiToken.get_by_id(row.id).revoked_at is None


def test_non_admin_cannot_open_api_tokens(app, make_admin):
    from tests.support.app_fixtures import login

    email, password, _ = make_admin(admin=False)
    c = app.test_client()
    login(c, email, password)
    assert c.get("/settings/api-tokens/").status_code == 403


# -- command line ------------------------------------------------------------------------------------

def test_cli_creates_a_token_printed_once_and_revokes_it(app, runner, make_admin):
    email, _, org = make_admin()
    result = runner.invoke(args=["api-token", "create", "--email", email, "--name", "Nightly export"])
    assert result.exit_code == 0, result.output
    token = re.search(r"(intake_\S+)", result.output).group(1)
    assert "not shown again" in result.output and org.name in result.output
    client = Api(app.test_client(), token)
    assert client.get("/connections").status_code == 200
    result = runner.invoke(args=["api-token", "revoke", "--prefix", token[:15]])
    assert result.exit_code == 0, result.output
    assert f"Revoked API token {token[:15]}" in result.output
    assert client.get("/connections").status_code == 401
    result = runner.invoke(args=["api-token", "revoke", "--prefix", token[:15]])
    assert result.exit_code != 0 and "No active API token" in result.output


def test_cli_revokes_by_the_whole_token(app, runner, issue):
    token, _, _ = issue()
    result = runner.invoke(args=["api-token", "revoke", "--prefix", token])
    assert result.exit_code == 0, result.output
    assert Api(app.test_client(), token).get("/connections").status_code == 401


def test_cli_needs_org_when_the_user_administers_several(runner, make_admin):
    from models import Membership, User, db

    email, _, org_a = make_admin()
    _, _, org_b = make_admin()
    with db.connection_context():
        Membership.create(user=User.get(User.email == email), organization=org_b, is_admin=True)
    result = runner.invoke(args=["api-token", "create", "--email", email])
    assert result.exit_code != 0 and "--org" in result.output
    result = runner.invoke(args=["api-token", "create", "--email", email, "--org", org_b.name])
    assert result.exit_code == 0 and org_b.name in result.output


@pytest.mark.parametrize("admin", [False, None])
def test_cli_refuses_non_admins_and_unknown_users(runner, make_admin, admin):
    email = make_admin(admin=False)[0] if admin is False else "nobody@example.com"
    result = runner.invoke(args=["api-token", "create", "--email", email])
    assert result.exit_code != 0 and "intake_" not in result.output


def test_an_unexpected_error_answers_json_500_and_is_logged(app, api, monkeypatch, caplog):
    import views.api

    def boom(_conn):
        raise RuntimeError("kaboom")

    app.config["PROPAGATE_EXCEPTIONS"] = False
    make_connection(api.org)
    monkeypatch.setattr(views.api, "connection_json", boom)
    resp = api.client.get("/api/v1/connections", headers={"Authorization": f"Bearer {api.token}"})
    assert resp.status_code == 500
    assert resp.get_json()["error"]["code"] == "internal_error" and "kaboom" not in resp.get_data(as_text=True)
    assert "kaboom" in caplog.text
