"""The OpenAPI 3.1 document of the REST API, served at /api/v1/openapi.json.

Written out here (not generated) so it is the contract: tests/test_api.py
checks that every route of the `api` blueprint is in it and the other way
round, and validates every response the tests get against it. Objects have
`additionalProperties: false`, so a field added to a response (a secret,
say) fails the tests until it is documented here."""
from __future__ import annotations

import copy

from models import PROTOCOLS, STATUS_LABELS

JOB_STATES = ["created", "queued", "started", "deferred", "scheduled", "finished", "failed", "stopped", "canceled"]
INCIDENT_STATUSES = ["open", "closed"]


def _nullable(type_: str, **kw) -> dict:
    return {"type": [type_, "null"], **kw}


def _obj(properties: dict, required: list[str] | None = None, **kw) -> dict:
    return {"type": "object", "properties": properties,
            "required": list(properties) if required is None else required,
            "additionalProperties": False, **kw}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


DATETIME = {"type": "string", "format": "date-time"}
DATETIME_OR_NULL = _nullable("string", format="date-time")

_INCIDENT_FIELDS = {
    "number": {"type": "integer", "description": "Per organization; the id in /incidents/{number}."},
    "tag": {"type": "string", "examples": ["INC-42"]},
    "title": {"type": "string"},
    "status": {"type": "string", "enum": INCIDENT_STATUSES},
    "connection": _nullable("string", description="API Name of the connection it came from "
                                                  "(null when it was created by hand or the connection was deleted)."),
    "email_count": {"type": "integer"},
    "created_at": DATETIME,
    "updated_at": DATETIME,
}

SCHEMAS = {
    "Error": _obj({"error": _obj({
        "code": {"type": "string", "description": "Stable, for programs: missing_token, invalid_token, "
                                                  "rate_limited, not_found, invalid_parameter, fetch_in_progress, ..."},
        "message": {"type": "string", "description": "For people: what went wrong and what to do."},
        "job_id": {"type": "string", "description": "fetch_in_progress only: the fetch already queued or running."},
    }, required=["code", "message"])}),
    "Proxy": _obj({
        "enabled": {"type": "boolean"},
        "protocol": {"type": "string", "enum": ["http", "https"]},
        "host": {"type": "string"},
        "port": _nullable("integer"),
        "username": {"type": "string"},
        "has_password": {"type": "boolean"},
    }),
    "Connection": _obj({
        "api_name": {"type": "string"},
        "name": {"type": "string"},
        "description": {"type": "string"},
        "protocol": {"type": "string", "enum": list(PROTOCOLS)},
        "protocol_label": {"type": "string"},
        "email_address": {"type": "string"},
        "source_folder": {"type": "string"},
        "host": {"type": "string", "description": "IMAP only."},
        "port": _nullable("integer", description="IMAP only."),
        "encryption": {"type": "string", "description": "IMAP only: ssl, starttls or none."},
        "imap_auth": {"type": "string", "description": "IMAP only: password or xoauth2."},
        "endpoint": {"type": "string", "description": "Exchange (EWS) only."},
        "graph_endpoint": {"type": "string"},
        "oauth_client_id": {"type": "string"},
        "oauth_tenant_id": {"type": "string"},
        "oauth_client_auth": {"type": "string", "description": "secret or certificate."},
        "oauth_access": {"type": "string", "description": "delegated or application."},
        "oauth_authority_host": {"type": "string"},
        "oauth_secret_expires": _nullable("string", format="date"),
        "oauth_account_username": {"type": "string", "description": "Who granted access (delegated OAuth)."},
        "oauth_token_expires_at": DATETIME_OR_NULL,
        "has_password": {"type": "boolean"},
        "has_oauth_client_secret": {"type": "boolean"},
        "has_oauth_private_key": {"type": "boolean"},
        "has_oauth_grant": {"type": "boolean", "description": "A token from Grant Access is stored."},
        "has_trusted_certificate": {"type": "boolean"},
        "proxy": _ref("Proxy"),
        "enabled": {"type": "boolean"},
        "fetch_interval": {"type": "integer", "description": "Seconds."},
        "routing": {"type": "string", "description": "incident, case or inbox."},
        "max_message_size": {"type": "integer", "description": "Bytes."},
        "status": {"type": "string", "enum": list(STATUS_LABELS)},
        "status_label": {"type": "string"},
        "last_test_at": DATETIME_OR_NULL,
        "last_fetch_at": DATETIME_OR_NULL,
        "next_fetch_at": DATETIME_OR_NULL,
        "last_error": {"type": "string"},
        "last_error_code": {"type": "string"},
        "consecutive_failures": {"type": "integer"},
        "messages_total": {"type": "integer"},
        "messages_last_run": {"type": "integer"},
        "created_at": DATETIME,
        "updated_at": DATETIME,
    }, description="A connection as the API shows it: secrets appear only as has_* booleans."),
    "ConnectionList": _obj({"connections": {"type": "array", "items": _ref("Connection")}}),
    "JobAccepted": _obj({
        "job_id": {"type": "string", "examples": ["test-0b6f…", "fetch-12"]},
        "status_url": {"type": "string", "description": "GET it for the job's state and result."},
    }),
    "Certificate": _obj({
        "subject": {"type": "string"}, "issuer": {"type": "string"},
        "not_before": {"type": "string"}, "not_after": {"type": "string"},
        "sha256_fingerprint": {"type": "string"}, "pem_chain": {"type": "string"},
        "self_signed": {"type": "boolean"},
    }),
    "Diagnosis": _obj({
        "code": {"type": "string",
                 "description": "Stable: auth_failed, connection_refused, untrusted_certificate, ..."},
        "message": {"type": "string"},
        "hint": {"type": "string"},
        "field": _nullable("string", description="The connection field the failure concerns."),
        "certificate": {"anyOf": [_ref("Certificate"), {"type": "null"}]},
        "retry_after": _nullable("number"),
        "extra": {"type": "object", "description": "Details such as the server's (redacted) answer."},
    }, required=["code", "message"]),
    "TestResult": _obj({
        "ok": {"type": "boolean"},
        "api_name": {"type": "string"},
        "folder": {"type": "string"},
        "unread": {"type": "integer"},
        "message": {"type": "string"},
        "diagnosis": _ref("Diagnosis"),
    }, required=["ok"], description="ok true: the connection works (and was saved with status ok); "
                                     "ok false: diagnosis says why not, the saved connection is unchanged."),
    "FetchResult": _obj({
        "listed": {"type": "integer"},
        "stored": {"type": "integer"},
        "duplicates": {"type": "integer"},
        "quarantined": {"type": "integer"},
        "skipped": {"type": "string", "description": "Why nothing was done: running, deleted."},
        "error": _ref("Diagnosis"),
    }, required=[]),
    "Job": _obj({
        "id": {"type": "string"},
        "kind": {"type": "string", "enum": ["test", "fetch", "process"]},
        "status": {"type": "string", "enum": JOB_STATES},
        "step": _nullable("string", description="Test jobs: what the test is doing (Connecting, Logging in, ...)."),
        "enqueued_at": DATETIME_OR_NULL,
        "started_at": DATETIME_OR_NULL,
        "ended_at": DATETIME_OR_NULL,
        "result": {"anyOf": [_ref("TestResult"), _ref("FetchResult"), {"type": "string"}, {"type": "null"}],
                   "description": "test: TestResult (also when the job crashed); fetch: FetchResult; "
                                  "process: the outcome (new-incident, threaded, inbox, quarantined, skipped). "
                                  "null until the job has finished."},
        "error": _nullable("string", description="Set when a fetch or process job crashed or timed out."),
    }),
    "IncidentSummary": _obj(dict(_INCIDENT_FIELDS)),
    "IncidentPage": _obj({
        "incidents": {"type": "array", "items": _ref("IncidentSummary")},
        "page": {"type": "integer", "minimum": 1},
        "per_page": {"type": "integer", "minimum": 1, "maximum": 100},
        "total": {"type": "integer"},
        "pages": {"type": "integer"},
    }),
    "Header": _obj({"name": {"type": "string"}, "value": {"type": "string"}}),
    "Attachment": _obj({
        "filename": {"type": "string"},
        "content_type": {"type": "string"},
        "size": {"type": "integer"},
        "sha256": {"type": "string"},
        "md5": {"type": "string"},
        "from_evidence": {"type": "boolean", "description": "Inside the forwarded (reported) email."},
    }),
    "Indicator": _obj({
        "kind": {"type": "string", "description": "url, domain, ip, email, sha256 or md5."},
        "value": {"type": "string"},
        "source": {"type": "string"},
    }),
    "Evidence": _obj({
        "subject": _nullable("string"), "from": _nullable("string"), "date": _nullable("string"),
        "message_id": _nullable("string"), "to": {"type": "array", "items": {"type": "string"}},
    }, required=[], description="The email forwarded as an attachment (the reported one), when there is one."),
    "Email": _obj({
        "id": {"type": "integer"},
        "message_id": {"type": "string"},
        "subject": {"type": "string"},
        "from": {"type": "string"},
        "to": {"type": "string"},
        "date": {"type": "string", "description": "The Date header as sent."},
        "received_at": {"type": "string"},
        "captured_at": DATETIME,
        "processed_at": DATETIME_OR_NULL,
        "state": {"type": "string", "enum": ["captured", "processed", "quarantined"]},
        "route": {"type": "string"},
        "size": {"type": "integer"},
        "sha256": _nullable("string", description="Of the raw message; null until processing has read it "
                                                  "(a message too large to process has none)."),
        "connection": {"type": "string", "description": "The connection's name when it was captured."},
        "headers": {"type": "array", "items": _ref("Header"),
                    "description": "A summary in message order: routing, authentication and addressing headers "
                                   "(Received, Authentication-Results, Received-SPF, Return-Path, Reply-To, ...)."},
        "evidence": {"anyOf": [_ref("Evidence"), {"type": "null"}]},
        "attachments": {"type": "array", "items": _ref("Attachment")},
        "indicators": {"type": "array", "items": _ref("Indicator")},
    }),
    "Incident": _obj({**_INCIDENT_FIELDS, "emails": {"type": "array", "items": _ref("Email")}}),
    "Health": _obj({
        "status": {"type": "string", "enum": ["ok", "degraded"]},
        "database": {"type": "string"},
        "redis": {"type": "string"},
        "workers": {"type": "integer"},
        "scheduler": _obj({"last_heartbeat_seconds_ago": _nullable("number"), "alive": {"type": "boolean"}}),
        "connections": _obj({
            "total": {"type": "integer"},
            "by_status": {"type": "object", "additionalProperties": {"type": "integer"},
                          "description": "Count per status (ok, failing, paused, grant, never)."},
            "disabled": {"type": "integer"},
        }, required=["total", "by_status", "disabled"]),
    }),
}


def _json(schema_name: str, description: str, headers: dict | None = None) -> dict:
    out = {"description": description, "content": {"application/json": {"schema": _ref(schema_name)}}}
    if headers:
        out["headers"] = headers
    return out


RESPONSES = {
    "Unauthorized": _json("Error", "No token, or a token that is unknown, revoked, or whose creator is no longer "
                                   "an administrator of the organization (codes missing_token, invalid_token).",
                          {"WWW-Authenticate": {"schema": {"type": "string"}}}),
    "RateLimited": _json("Error", "Too many requests with this token in the current window (code rate_limited).",
                         {"Retry-After": {"description": "Seconds until the window resets.",
                                          "schema": {"type": "integer"}}}),
    "NotFound": _json("Error", "Not found in the token's organization (code not_found)."),
    "BadRequest": _json("Error", "A query parameter is invalid (code invalid_parameter)."),
}
_COMMON = {"401": {"$ref": "#/components/responses/Unauthorized"},
           "429": {"$ref": "#/components/responses/RateLimited"}}
_404 = {"404": {"$ref": "#/components/responses/NotFound"}}
_API_NAME = {"name": "api_name", "in": "path", "required": True, "schema": {"type": "string"},
             "description": "The connection's API Name."}


def _op(op_id: str, summary: str, responses: dict, description: str = "", parameters=None, tag: str = "") -> dict:
    out = {"operationId": op_id, "summary": summary, "responses": {**responses, **_COMMON}}
    if description:
        out["description"] = description
    if parameters:
        out["parameters"] = parameters
    if tag:
        out["tags"] = [tag]
    return out


PATHS = {
    "/connections": {"get": _op(
        "listConnections", "The organization's inbound email connections",
        {"200": _json("ConnectionList", "Every connection, by name. Secrets are never included.")},
        tag="Connections")},
    "/connections/{api_name}": {"get": _op(
        "getConnection", "One connection", {"200": _json("Connection", "The connection."), **_404},
        parameters=[_API_NAME], tag="Connections")},
    "/connections/{api_name}/test": {"post": _op(
        "testConnection", "Test the saved connection",
        {"202": _json("JobAccepted", "The test is queued; poll status_url."), **_404},
        description="Tests the connection's saved settings the way Test and Save Connection does. On success the "
                    "connection is saved with status ok; on failure it is left as it was and the job's result "
                    "holds the diagnosis.",
        parameters=[_API_NAME], tag="Connections")},
    "/connections/{api_name}/fetch": {"post": _op(
        "fetchConnection", "Fetch unread email now",
        {"202": _json("JobAccepted", "The fetch is queued; poll status_url."), **_404,
         "409": _json("Error", "Nothing was queued. fetch_in_progress: a fetch of this connection is already "
                               "queued or running (error.job_id is its id, poll it); not_tested: the connection "
                               "was never tested successfully; connection_disabled; connection_paused: paused after "
                               "failed sign-ins, fix and test it first; grant_required: Grant Access again in "
                               "the web app.")},
        parameters=[_API_NAME], tag="Connections")},
    "/jobs/{job_id}": {"get": _op(
        "getJob", "A test, fetch or processing job",
        {"200": _json("Job", "The job's state and, once finished, its result."), **_404},
        description="Ids as returned by the test and fetch endpoints (test-…, fetch-…) and process-… jobs of "
                    "the organization's email. Finished jobs are kept for a limited time (about 10 minutes for "
                    "fetches, an hour for tests), then this answers 404.",
        parameters=[{"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}],
        tag="Jobs")},
    "/incidents": {"get": _op(
        "listIncidents", "Incidents, newest first",
        {"200": _json("IncidentPage", "One page of incidents."),
         "400": {"$ref": "#/components/responses/BadRequest"}},
        parameters=[
            {"name": "page", "in": "query", "schema": {"type": "integer", "minimum": 1, "default": 1}},
            {"name": "per_page", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100,
                                                           "default": 25}},
            {"name": "connection", "in": "query", "schema": {"type": "string"},
             "description": "Only incidents from the connection with this API Name."},
            {"name": "status", "in": "query", "schema": {"type": "string", "enum": INCIDENT_STATUSES}},
        ], tag="Incidents")},
    "/incidents/{number}": {"get": _op(
        "getIncident", "One incident with its emails, attachments and indicators",
        {"200": _json("Incident", "The incident."), **_404},
        parameters=[{"name": "number", "in": "path", "required": True, "schema": {"type": "integer"},
                     "description": "The incident number: 42 for INC-42."}],
        tag="Incidents")},
    "/health": {"get": _op(
        "getHealth", "Service health and the organization's connections by status",
        {"200": _json("Health", "Database and Redis work."),
         "503": _json("Health", "The database or Redis does not answer.")},
        tag="Health")},
    "/openapi.json": {"get": {
        "operationId": "getOpenApi", "summary": "This document", "security": [], "tags": ["Health"],
        "responses": {"200": {"description": "The OpenAPI document.",
                              "content": {"application/json": {"schema": {"type": "object"}}}}}}},
}

DOCUMENT = {
    "openapi": "3.1.0",
    "info": {
        "title": "Intake API",
        "version": "1.0.0",
        "description": (
            "Inbound email connections, their jobs, and the incidents their email became.\n\n"
            "Authenticate with `Authorization: Bearer <token>`. An administrator creates tokens under "
            "Administrator Settings > API tokens (or `flask --app app api-token create --email ...`). A token "
            "sees only its organization. Requests are limited per token (by default 120 a minute); over the "
            "limit the answer is 429 with Retry-After. Errors are `{\"error\": {\"code\", \"message\"}}`."),
    },
    "servers": [{"url": "/api/v1"}],
    "security": [{"bearerAuth": []}],
    "tags": [{"name": "Connections"}, {"name": "Jobs"}, {"name": "Incidents"}, {"name": "Health"}],
    "paths": PATHS,
    "components": {
        "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "intake_…",
                                           "description": "An API token of the organization."}},
        "schemas": SCHEMAS,
        "responses": RESPONSES,
    },
}


def document() -> dict:
    """A copy, so nobody changes the contract by accident."""
    return copy.deepcopy(DOCUMENT)
