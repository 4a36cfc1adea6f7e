"""Test and Save Connection, as a background job.

The job gets a draft id. It logs in and opens the folder for real; only on
success are the draft's values copied onto the connection (created or
updated). A failure leaves the saved connection exactly as it was."""
from __future__ import annotations

import logging
import time

from peewee import IntegrityError
from rq import get_current_job

from connectors.errors import ConnectorError, Diagnosis
from models import EDITABLE_FIELDS, PROTOCOLS, ConnectionDraft, EmailConnection, db, write_transaction, utcnow

from .connect import epoch_to_utc, open_session

log = logging.getLogger(__name__)

STEP_LABELS = {
    "queued": "Queued",
    "starting": "Starting",
    "connecting": "Connecting",
    "signing in": "Signing in",
    "logging in": "Logging in",
    "opening folder": "Opening folder",
    "saving": "Saving",
}


def _progress(step: str) -> None:
    job = get_current_job()
    if job is not None:
        job.meta["step"] = step
        job.meta.setdefault("started", time.time())
        job.save_meta()


def run(draft_id: str) -> dict:
    with db.connection_context():
        draft = ConnectionDraft.get_or_none(ConnectionDraft.id == draft_id)
        if draft is None:
            return _failed(Diagnosis("draft_missing", "This test expired before it ran.",
                                     "Press Test and Save Connection again."))
        return _run(draft)


def _run(draft: ConnectionDraft) -> dict:
    values = draft.values()
    conn = draft.connection
    label = f"{values['name']} ({values['api_name']})"
    _progress("starting")
    log.info("Testing connection %s: %s", label, _describe(values))
    try:
        session = open_session(values, _progress)
        with session.connector as c:
            result = c.check()
        cache = session.new_token_cache()
        if cache is not None:
            values["oauth_token_cache"] = cache
            values["oauth_refreshed_on"] = time.time()
        if session.tokens is not None and session.tokens.token_expires_on:
            values["oauth_token_expires_on"] = session.tokens.token_expires_on
    except ConnectorError as e:
        return _record_failure(conn, label, e.diagnosis)
    except Exception as e:  # a bug or an unforeseen library error: still a clear answer
        log.exception("Unexpected error while testing %s", label)
        return _record_failure(conn, label, Diagnosis(
            "unexpected", f"The test stopped with an unexpected error: {e.__class__.__name__}: {e}",
            "See the log file for details. If it keeps happening, report it with the log lines."))
    _progress("saving")
    previous = conn.protocol if conn is not None else None
    try:
        conn = save_tested(draft, values)
    except IntegrityError:
        return _failed(Diagnosis("api_name_taken", f"The API Name {values['api_name']} is already used.",
                                 "Choose another API Name.", field="api_name"))
    summary = f"Test succeeded: {result.folder} opened, {result.unread} unread."
    conn.log("info", summary, job_id=_job_id())
    migrated = previous is not None and previous != conn.protocol
    if migrated:
        conn.log("info", f"Protocol changed from {PROTOCOLS.get(previous, previous)} to {conn.protocol_label}. "
                 "Mail and incidents it already brought in are kept.", job_id=_job_id())
    log.info("Connection %s saved. %s", label, summary)
    return {"ok": True, "connection_id": conn.id, "api_name": conn.api_name, "folder": result.folder,
            "unread": result.unread, "message": summary, "migrated": migrated}


def save_tested(draft: ConnectionDraft, values: dict) -> EmailConnection:
    """Copy the tested values onto the connection in one transaction."""
    with write_transaction():
        conn = draft.connection or EmailConnection(organization=draft.organization)
        for name in EDITABLE_FIELDS + ("oauth_token_cache", "oauth_account_username", "oauth_account_name"):
            if name in values:
                setattr(conn, name, values[name])
        # Token health (epoch seconds in the draft): from Grant Access or this test.
        for attr, key in (("oauth_token_expires_at", "oauth_token_expires_on"),
                          ("oauth_last_refresh_at", "oauth_refreshed_on")):
            if values.get(key):
                setattr(conn, attr, epoch_to_utc(float(values[key])))
        now = utcnow()
        conn.status, conn.last_test_at, conn.updated_at = "ok", now, now
        conn.last_error = conn.last_error_code = ""
        conn.consecutive_failures = 0
        if conn.next_fetch_at is None:
            conn.next_fetch_at = now
        conn.save()
        draft.delete_instance()
    return conn


def _record_failure(conn, label: str, d: Diagnosis) -> dict:
    log.warning("Test of %s failed [%s]: %s", label, d.code, d.message)
    if conn is not None:
        # The saved settings stay as they were; only the log records the failed test.
        conn.log("error", f"Test failed: {d.message} {d.hint}".strip(), job_id=_job_id())
    return _failed(d)


def _failed(d: Diagnosis) -> dict:
    return {"ok": False, "diagnosis": d.to_dict()}


def _job_id() -> str:
    job = get_current_job()
    return job.id if job else ""


def _describe(values: dict) -> str:
    """Where we connect, for the log: never a secret."""
    p = values["protocol"]
    if p == "imap":
        return f"IMAP {values.get('host')}:{values.get('port')} ({values.get('encryption')}) as {values.get('email_address')}"
    target = values.get("endpoint") or values.get("graph_endpoint") or ""
    proxy = f" via proxy {values.get('proxy_host')}:{values.get('proxy_port')}" if values.get("proxy_enabled") else ""
    return f"{p} {target} as {values.get('email_address')}{proxy}"


def enqueue(draft: ConnectionDraft):
    """Queue the test; the job id is the draft id so the page can poll it."""
    from services import queue

    job = queue.queue("tests").enqueue(run, draft.id, job_id=f"test-{draft.id}", job_timeout=300,
                                       result_ttl=3600, failure_ttl=3600,
                                       description=f"Test connection draft {draft.id}")
    draft.job_id = job.id
    draft.save()
    return job


def status(draft_id: str) -> dict:
    """What the status partial shows: state, step, elapsed, result."""
    from rq.exceptions import NoSuchJobError
    from rq.job import Job

    from services import queue

    try:
        job = Job.fetch(f"test-{draft_id}", connection=queue.connection())
    except NoSuchJobError:
        return {"state": "missing"}
    state = job.get_status(refresh=True)
    state = getattr(state, "value", state)
    meta = job.get_meta(refresh=False) if hasattr(job, "get_meta") else job.meta
    started = meta.get("started") or (job.enqueued_at.timestamp() if job.enqueued_at else time.time())
    out = {"state": state, "step": STEP_LABELS.get(meta.get("step", "queued"), meta.get("step", "")),
           "elapsed": max(0, int(time.time() - started))}
    if state == "finished":
        out["result"] = job.return_value()
    elif state in ("failed", "stopped", "canceled"):
        out["result"] = _failed(Diagnosis(
            "job_failed", "The test job stopped before it could finish (the worker crashed or timed out).",
            "See the log file. Then press Test and Save Connection again."))
    return out
