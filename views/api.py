"""The REST API (JSON) under /api/v1, documented by views/api_spec.py.

Bearer tokens only (`Authorization: Bearer intake_…`): the session cookie
never counts here, so the blueprint is exempt from CSRF. Every query is
scoped to the token's organization (`g.org`), requests are limited per
token, errors are `{"error": {"code", "message"}}`, and no secret is ever
written out: connections show `has_password`-style booleans instead."""
from __future__ import annotations

import datetime as dt
import json
import logging
import math
import re
import time

import redis
from flask import Blueprint, current_app, g, jsonify, request, url_for
from peewee import JOIN, fn
from rq.exceptions import NoSuchJobError
from rq.job import Job
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound

from extensions import csrf
from jobs import connection_test
from jobs import fetch as fetch_jobs
from models import (ApiToken, Attachment, ConnectionDraft, EmailConnection, Incident, Indicator,
                    StoredMessage)
from services import queue

from . import api_spec

bp = Blueprint("api", __name__, url_prefix="/api/v1")
csrf.exempt(bp)
log = logging.getLogger(__name__)

PUBLIC_ENDPOINTS = {"api.openapi"}
DEFAULT_RATE_LIMIT = 120  # requests per token per window; app.config API_RATE_LIMIT (0 turns it off)
DEFAULT_RATE_WINDOW = 60  # seconds; app.config API_RATE_WINDOW
MAX_PER_PAGE = 100
SUMMARY_HEADERS = frozenset(h.lower() for h in (
    "Received", "Return-Path", "Authentication-Results", "ARC-Authentication-Results", "Received-SPF",
    "DKIM-Signature", "From", "Sender", "Reply-To", "To", "Cc", "Subject", "Date", "Message-ID",
    "In-Reply-To", "References", "X-Originating-IP", "X-Mailer", "User-Agent"))
JOB_ID = re.compile(r"(?:test-(?P<draft>[0-9a-f-]{36})|fetch-(?P<conn>\d{1,18})|process-(?P<msg>\d{1,18})-[nr])")


class ApiError(Exception):
    """Raised by views; answered as {"error": {...}} with `status`."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None, **extra):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers, self.extra = headers or {}, extra


def error_response(status: int, code: str, message: str, headers: dict | None = None, **extra):
    resp = jsonify({"error": {"code": code, "message": message, **extra}})
    resp.status_code = status
    resp.headers.update(headers or {})
    return resp


@bp.errorhandler(ApiError)
def _api_error(e: ApiError):
    return error_response(e.status, e.code, e.message, e.headers, **e.extra)


def _http_error(e: HTTPException):
    if e.code == 500:
        log.exception("API error on %s %s", request.method, request.path,
                      exc_info=getattr(e, "original_exception", None) or e)
        return error_response(500, "internal_error", "Something went wrong. The error was written to the log file.")
    code = {400: "bad_request", 404: "not_found", 405: "method_not_allowed",
            413: "too_large"}.get(e.code, "http_error")
    resp = error_response(e.code, code, e.description or e.name)
    if isinstance(e, MethodNotAllowed) and e.valid_methods:
        resp.headers["Allow"] = ", ".join(e.valid_methods)
    return resp


# Code-specific handlers: the app's HTML error pages are registered per code
# and would otherwise win over a generic HTTPException handler here.
for _code in (400, 404, 405, 413, 500):
    bp.register_error_handler(_code, _http_error)


@bp.before_app_request
def _unknown_api_route():
    """A URL under /api/v1 that matches no route still gets a JSON answer
    (routing errors are raised after before_request functions run)."""
    e = request.routing_exception
    if isinstance(e, (NotFound, MethodNotAllowed)) and (request.path + "/").startswith(bp.url_prefix + "/"):
        if isinstance(e, MethodNotAllowed):
            return _http_error(e)
        return error_response(404, "not_found", "There is no API endpoint at this address. "
                                                "See /api/v1/openapi.json.")
    return None


@bp.before_request
def _authenticate():
    """Bearer token -> g.api_token and g.org; then the rate limit."""
    g.user = g.membership = g.org = None  # a signed-in browser session grants nothing here
    if request.endpoint in PUBLIC_ENDPOINTS:
        return
    scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "missing_token", 'Send an API token in the header "Authorization: Bearer <token>". '
                       "Administrators create tokens under Administrator Settings > API tokens.",
                       {"WWW-Authenticate": 'Bearer realm="Intake API"'})
    api_token = ApiToken.authenticate(token.strip())
    if api_token is None:
        log.info("API request with an invalid token from %s", request.remote_addr)
        raise ApiError(401, "invalid_token", "This API token is not valid: it is unknown or revoked, or the "
                       "administrator who created it no longer administers the organization.",
                       {"WWW-Authenticate": 'Bearer realm="Intake API", error="invalid_token"'})
    g.api_token, g.org = api_token, api_token.organization
    _rate_limit(api_token)
    api_token.touch()


def _rate_limit(api_token: ApiToken) -> None:
    """Fixed window per token in Redis. Without Redis the API still answers
    (health must), so the limit is skipped and the failure logged."""
    limit = int(current_app.config.get("API_RATE_LIMIT", DEFAULT_RATE_LIMIT))
    window = int(current_app.config.get("API_RATE_WINDOW", DEFAULT_RATE_WINDOW))
    if limit <= 0:
        return
    now = time.time()
    slot = int(now // window)
    key = f"intake:api-rate:{api_token.id}:{slot}"
    try:
        pipe = queue.connection().pipeline()
        pipe.set(key, 0, ex=window * 2, nx=True)
        pipe.incr(key)
        _, count = pipe.execute()
    except redis.RedisError as e:
        log.warning("API rate limit skipped: Redis error %s", e.__class__.__name__)
        return
    reset = max(1, math.ceil((slot + 1) * window - now))
    g.rate_limit = (limit, max(0, limit - count), reset)
    if count > limit:
        raise ApiError(429, "rate_limited", f"Too many requests: a token may make {limit} requests every "
                       f"{window} seconds. Try again in {reset} seconds.", {"Retry-After": str(reset)})


@bp.after_request
def _api_headers(resp):
    resp.headers["Cache-Control"] = "no-store"
    rate = g.get("rate_limit")
    if rate:
        resp.headers["X-RateLimit-Limit"], resp.headers["X-RateLimit-Remaining"] = str(rate[0]), str(rate[1])
        resp.headers["X-RateLimit-Reset"] = str(rate[2])
    return resp


# -- lookups, always within the token's organization ----------------------------

def get_connection_or_404(api_name: str) -> EmailConnection:
    conn = EmailConnection.get_or_none((EmailConnection.organization == g.org)
                                       & (EmailConnection.api_name == api_name))
    if conn is None:
        raise ApiError(404, "not_found", f"There is no connection with the API Name {api_name!r}.")
    return conn


def get_incident_or_404(number: int) -> Incident:
    inc = (Incident.select(Incident, EmailConnection).join(EmailConnection, JOIN.LEFT_OUTER)
           .where((Incident.organization == g.org) & (Incident.number == number)).first())
    if inc is None:
        raise ApiError(404, "not_found", f"There is no incident INC-{number}.")
    return inc


# -- representations ----------------------------------------------------------------

def iso(value) -> str | None:
    """UTC timestamps as ISO 8601 with Z (the database keeps naive UTC)."""
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
        return value.isoformat(timespec="seconds") + "Z"
    return value.isoformat()


def connection_json(c: EmailConnection) -> dict:
    """An explicit list of fields: a new column never shows up by accident."""
    return {
        "api_name": c.api_name, "name": c.name, "description": c.description,
        "protocol": c.protocol, "protocol_label": c.protocol_label,
        "email_address": c.email_address, "source_folder": c.source_folder,
        "host": c.host, "port": c.port, "encryption": c.encryption, "imap_auth": c.imap_auth,
        "endpoint": c.endpoint, "graph_endpoint": c.graph_endpoint,
        "oauth_client_id": c.oauth_client_id, "oauth_tenant_id": c.oauth_tenant_id,
        "oauth_client_auth": c.oauth_client_auth, "oauth_access": c.oauth_access,
        "oauth_authority_host": c.oauth_authority_host,
        "oauth_secret_expires": iso(c.oauth_secret_expires),
        "oauth_account_username": c.oauth_account_username,
        "oauth_token_expires_at": iso(c.oauth_token_expires_at),
        "has_password": bool(c.password), "has_oauth_client_secret": bool(c.oauth_client_secret),
        "has_oauth_private_key": bool(c.oauth_private_key), "has_oauth_grant": bool(c.oauth_token_cache),
        "has_trusted_certificate": bool(c.trusted_cert_pem.strip()),
        "proxy": {"enabled": c.proxy_enabled, "protocol": c.proxy_protocol, "host": c.proxy_host,
                  "port": c.proxy_port, "username": c.proxy_username, "has_password": bool(c.proxy_password)},
        "enabled": c.enabled, "fetch_interval": c.fetch_interval, "routing": c.routing,
        "max_message_size": c.max_message_size,
        "status": c.status, "status_label": c.status_label,
        "last_test_at": iso(c.last_test_at), "last_fetch_at": iso(c.last_fetch_at),
        "next_fetch_at": iso(c.next_fetch_at),
        "last_error": c.last_error, "last_error_code": c.last_error_code,
        "consecutive_failures": c.consecutive_failures,
        "messages_total": c.messages_total, "messages_last_run": c.messages_last_run,
        "created_at": iso(c.created_at), "updated_at": iso(c.updated_at),
    }


def incident_json(inc: Incident, email_count: int) -> dict:
    return {"number": inc.number, "tag": inc.tag, "title": inc.title, "status": inc.status,
            "connection": inc.connection.api_name if inc.connection_id else None,
            "email_count": email_count, "created_at": iso(inc.created_at), "updated_at": iso(inc.updated_at)}


def _headers_summary(headers_json: str) -> list[dict]:
    try:
        pairs = json.loads(headers_json or "[]")
    except ValueError:
        return []
    return [{"name": str(k), "value": str(v)[:4000]} for k, v in pairs
            if str(k).lower() in SUMMARY_HEADERS][:200]


def _evidence(evidence_json: str) -> dict | None:
    try:
        ev = json.loads(evidence_json) if evidence_json else None
    except ValueError:
        return None
    if not isinstance(ev, dict):
        return None
    return {"subject": ev.get("subject"), "from": ev.get("from"), "date": ev.get("date"),
            "message_id": ev.get("message_id"), "to": [str(a) for a in ev.get("to") or []]}


def email_json(m: StoredMessage, attachments: list, indicators: list) -> dict:
    return {
        "id": m.id, "message_id": m.message_id, "subject": m.subject, "from": m.from_addr, "to": m.to_addrs,
        "date": m.date, "received_at": m.received_at, "captured_at": iso(m.captured_at),
        "processed_at": iso(m.processed_at), "state": m.state, "route": m.route, "size": m.size,
        "sha256": m.sha256 or None, "connection": m.connection_name,
        "headers": _headers_summary(m.headers_json), "evidence": _evidence(m.evidence_json),
        "attachments": [{"filename": a.filename, "content_type": a.content_type, "size": a.size,
                         "sha256": a.sha256, "md5": a.md5, "from_evidence": a.from_evidence} for a in attachments],
        "indicators": [{"kind": i.kind, "value": i.value, "source": i.source} for i in indicators],
    }


# -- connections -----------------------------------------------------------------------

@bp.get("/connections")
def connections():
    """Every connection of the token's organization, by name."""
    rows = EmailConnection.select().where(EmailConnection.organization == g.org).order_by(EmailConnection.name)
    return jsonify({"connections": [connection_json(c) for c in rows]})


@bp.get("/connections/<api_name>")
def connection(api_name):
    """One connection, secrets as booleans."""
    return jsonify(connection_json(get_connection_or_404(api_name)))


def _accepted(job_id: str):
    return jsonify({"job_id": job_id, "status_url": url_for("api.job", job_id=job_id)}), 202


@bp.post("/connections/<api_name>/test")
def test_connection(api_name):
    """Re-test the saved settings, as Test and Save Connection does."""
    conn = get_connection_or_404(api_name)
    draft = ConnectionDraft.make(g.org, conn.stored_values(), connection=conn, user=g.api_token.created_by_id)
    job = connection_test.enqueue(draft)
    log.info("API token %s (%s) started a test of connection %s", g.api_token.prefix, g.org.name, conn.api_name)
    return _accepted(job.id)


FETCH_REFUSED = {
    "never": ("not_tested", "This connection was never tested successfully. Test it first."),
    "paused": ("connection_paused", "Fetching is paused after failed sign-ins so the account is not locked out. "
                                    "Fix the credentials and test the connection first."),
    "grant": ("grant_required", "Access to the mailbox has expired. Press Grant Access again in the web app."),
}


@bp.post("/connections/<api_name>/fetch")
def fetch_connection(api_name):
    """Queue a fetch now; 409 when one is already queued or running."""
    conn = get_connection_or_404(api_name)
    if conn.status in FETCH_REFUSED:
        code, message = FETCH_REFUSED[conn.status]
        raise ApiError(409, code, message)
    if not conn.enabled:
        raise ApiError(409, "connection_disabled", "Fetching is disabled for this connection. Enable it first.")
    job = fetch_jobs.enqueue(conn.id)
    if job is None:
        raise ApiError(409, "fetch_in_progress", "A fetch of this connection is already queued or running.",
                       job_id=fetch_jobs.job_id(conn.id))
    log.info("API token %s (%s) queued a fetch of connection %s", g.api_token.prefix, g.org.name, conn.api_name)
    return _accepted(job.id)


# -- jobs ----------------------------------------------------------------------------------

def _job_kind_visible(job_id: str) -> str | None:
    """'test' | 'fetch' | 'process' when the job belongs to the token's
    organization, else None. A successful test deletes its draft, so its
    result's connection_id is checked instead."""
    m = JOB_ID.fullmatch(job_id)
    if m is None:
        return None
    if m["draft"]:
        if ConnectionDraft.select().where((ConnectionDraft.id == m["draft"])
                                          & (ConnectionDraft.organization == g.org)).exists():
            return "test"
        if ConnectionDraft.get_or_none(ConnectionDraft.id == m["draft"]) is not None:
            return None  # another organization's draft
        result = connection_test.status(m["draft"]).get("result") or {}
        owner = result.get("connection_id") if isinstance(result, dict) else None
        if owner and EmailConnection.select().where((EmailConnection.id == owner)
                                                    & (EmailConnection.organization == g.org)).exists():
            return "test"
        return None
    if m["conn"]:
        return "fetch" if EmailConnection.select().where((EmailConnection.id == int(m["conn"]))
                                                         & (EmailConnection.organization == g.org)).exists() else None
    return "process" if StoredMessage.select().where((StoredMessage.id == int(m["msg"]))
                                                     & (StoredMessage.organization == g.org)).exists() else None


_RESULT_FIELDS = {
    "test": ("ok", "api_name", "folder", "unread", "message", "diagnosis"),
    "fetch": ("listed", "stored", "duplicates", "quarantined", "skipped", "error"),
}


def _clean_result(kind: str, result):
    """Only documented fields of a job's return value."""
    if result is None:
        return None
    if kind == "process":
        return str(result)
    if not isinstance(result, dict):
        return None
    return {k: result[k] for k in _RESULT_FIELDS[kind] if k in result}


@bp.get("/jobs/<job_id>")
def job(job_id):
    """State and result of a job of this organization."""
    kind = _job_kind_visible(job_id)
    not_found = ApiError(404, "not_found", f"There is no job {job_id!r} in this organization (finished jobs "
                                           "are kept for a limited time).")
    if kind is None:
        raise not_found
    try:
        rq_job = Job.fetch(job_id, connection=queue.connection())
    except NoSuchJobError:
        raise not_found from None
    state = rq_job.get_status(refresh=True)
    state = getattr(state, "value", state)
    out = {"id": job_id, "kind": kind, "status": state, "step": None,
           "enqueued_at": iso(rq_job.enqueued_at), "started_at": iso(rq_job.started_at),
           "ended_at": iso(rq_job.ended_at), "result": None, "error": None}
    if kind == "test":
        status = connection_test.status(job_id.removeprefix("test-"))
        out["step"] = status.get("step")
        out["result"] = _clean_result(kind, status.get("result"))
    elif state == "finished":
        out["result"] = _clean_result(kind, rq_job.return_value())
    elif state in ("failed", "stopped", "canceled"):
        out["error"] = "The job stopped before it could finish (the worker crashed or it timed out). See the log file."
    return jsonify(out)


# -- incidents ---------------------------------------------------------------------------

def _int_arg(name: str, default: int, low: int, high: int | None = None) -> int:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f"{low} or more"
        raise ApiError(400, "invalid_parameter", f"{name} must be a whole number {bounds}.")
    return value


@bp.get("/incidents")
def incidents():
    """Incidents, newest first, paged; filter by connection and status."""
    page = _int_arg("page", 1, 1)
    per_page = _int_arg("per_page", 25, 1, MAX_PER_PAGE)
    q = (Incident.select(Incident, EmailConnection).join(EmailConnection, JOIN.LEFT_OUTER)
         .where(Incident.organization == g.org))
    if request.args.get("connection"):
        name = request.args["connection"]
        conn = EmailConnection.get_or_none((EmailConnection.organization == g.org) & (EmailConnection.api_name == name))
        if conn is None:
            raise ApiError(400, "invalid_parameter", f"connection: there is no connection with the API Name {name!r}.")
        q = q.where(Incident.connection == conn)
    if request.args.get("status"):
        status = request.args["status"]
        if status not in api_spec.INCIDENT_STATUSES:
            raise ApiError(400, "invalid_parameter", f"status must be one of {', '.join(api_spec.INCIDENT_STATUSES)}.")
        q = q.where(Incident.status == status)
    total = q.count()
    rows = list(q.order_by(Incident.created_at.desc(), Incident.id.desc()).paginate(page, per_page))
    counts = dict(StoredMessage.select(StoredMessage.incident, fn.COUNT(StoredMessage.id))
                  .where(StoredMessage.incident.in_([i.id for i in rows]) & (StoredMessage.organization == g.org))
                  .group_by(StoredMessage.incident).tuples()) if rows else {}
    return jsonify({"incidents": [incident_json(i, counts.get(i.id, 0)) for i in rows],
                    "page": page, "per_page": per_page, "total": total,
                    "pages": math.ceil(total / per_page)})


@bp.get("/incidents/<int:number>")
def incident(number):
    """One incident with its emails, their attachments and indicators."""
    inc = get_incident_or_404(number)
    emails = list(StoredMessage.select()
                  .where((StoredMessage.incident == inc) & (StoredMessage.organization == g.org))
                  .order_by(StoredMessage.captured_at, StoredMessage.id))
    ids = [m.id for m in emails]
    attachments: dict[int, list] = {i: [] for i in ids}
    indicators: dict[int, list] = {i: [] for i in ids}
    if ids:
        for a in Attachment.select().where(Attachment.message.in_(ids)).order_by(Attachment.id):
            attachments[a.message_id].append(a)
        for i in Indicator.select().where(Indicator.message.in_(ids)).order_by(Indicator.id):
            indicators[i.message_id].append(i)
    out = incident_json(inc, len(emails))
    out["emails"] = [email_json(m, attachments[m.id], indicators[m.id]) for m in emails]
    return jsonify(out)


# -- health and the document --------------------------------------------------------

@bp.get("/health")
def health():
    """The service's health (as /healthz) and this organization's connections by status."""
    from . import health as health_view

    resp, code = health_view.healthz()
    out = resp.get_json()
    try:
        rows = (EmailConnection.select(EmailConnection.status, EmailConnection.enabled, fn.COUNT(EmailConnection.id))
                .where(EmailConnection.organization == g.org)
                .group_by(EmailConnection.status, EmailConnection.enabled).tuples())
        by_status: dict[str, int] = {}
        disabled = 0
        for status, enabled, n in rows:
            by_status[status] = by_status.get(status, 0) + n
            disabled += 0 if enabled else n
        out["connections"] = {"total": sum(by_status.values()), "by_status": by_status, "disabled": disabled}
    except Exception as e:  # the database is down: health still answers
        log.warning("API health: connection counts failed: %s", e.__class__.__name__)
        out["connections"] = {"total": 0, "by_status": {}, "disabled": 0}
    return jsonify(out), code


@bp.get("/openapi.json")
def openapi():
    """The OpenAPI 3.1 document (no token needed)."""
    return jsonify(api_spec.document())
