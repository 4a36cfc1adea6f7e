"""The Inbox (processed email in no case yet: routing "keep in the Inbox",
or its incident was deleted) and Quarantine (email that could not be
processed, with its error and Reprocess)."""
from __future__ import annotations

import logging
import re

from flask import Blueprint, abort, flash, g, redirect, render_template, request, url_for
from rq.exceptions import NoSuchJobError
from rq.job import Job

from ingest import route
from jobs import process as process_jobs
from models import Incident, StoredMessage
from services import queue

from .incidents import email_view, get_message_or_404, member_required, paginate

bp = Blueprint("inbox", __name__)
log = logging.getLogger(__name__)

CASE_NUMBER = re.compile(r"^\[?\s*(?:INC\s*-?\s*)?#?(\d{1,9})\s*\]?$", re.I)
PENDING = ("queued", "started", "deferred", "scheduled")


def _inbox_message_or_404(message_id: int) -> StoredMessage:
    msg = get_message_or_404(message_id)
    if msg.state != "processed":
        abort(404)
    return msg


# ---- Inbox ----

@bp.get("/inbox/")
@member_required
def index():
    """Email waiting for an analyst, newest first."""
    q = (StoredMessage.select().where((StoredMessage.organization == g.org) & (StoredMessage.state == "processed")
                                      & StoredMessage.incident.is_null())
         .order_by(StoredMessage.captured_at.desc(), StoredMessage.id.desc()))
    return render_template("inbox/index.html", page=paginate(q))


@bp.get("/inbox/<int:message_id>")
@member_required
def message(message_id):
    """One Inbox email in full, with the same actions as its row."""
    msg = _inbox_message_or_404(message_id)
    if msg.incident_id is not None:
        return redirect(url_for("incidents.detail", number=msg.incident.number, _anchor=f"email-{msg.id}"))
    return render_template("inbox/message.html", msg=msg, email=email_view(msg))


@bp.post("/inbox/<int:message_id>/create-incident")
@member_required
def create_incident(message_id):
    """A new incident from this email."""
    msg = _inbox_message_or_404(message_id)
    if msg.incident_id is None:
        inc = route.create_from(msg, g.user)
        log.info("%s created %s from message %s", g.user.email, inc.tag, msg.id)
    return _row(msg)


@bp.post("/inbox/<int:message_id>/add-to-case")
@member_required
def add_to_case(message_id):
    """Add this email to an existing case, typed as INC-42 or 42."""
    msg = _inbox_message_or_404(message_id)
    if msg.incident_id is not None:
        return _row(msg)
    typed = request.form.get("case", "").strip()
    m = CASE_NUMBER.match(typed)
    if not typed:
        return _row(msg, error="Enter a case number, like INC-42 or 42.", typed=typed)
    if m is None:
        return _row(msg, error=f"“{typed}” is not a case number. Enter it like INC-42 or 42.", typed=typed)
    inc = Incident.get_or_none((Incident.organization == g.org) & (Incident.number == int(m.group(1))))
    if inc is None:
        return _row(msg, error=f"There is no case INC-{int(m.group(1))} in this organization.", typed=typed)
    route.attach_to(msg, inc)
    log.info("%s added message %s to %s", g.user.email, msg.id, inc.tag)
    return _row(msg)


def _row(msg: StoredMessage, error: str = "", typed: str = ""):
    """The row's actions after an action; 200 even with an error, as htmx
    swaps only 2xx. Without htmx, back to the page with the outcome."""
    if request.htmx:
        return render_template("inbox/_actions.html", msg=msg, error=error, typed=typed)
    if error:
        flash(error, "error")
        return redirect(url_for(".message", message_id=msg.id))
    return redirect(url_for("incidents.detail", number=msg.incident.number, _anchor=f"email-{msg.id}"))


# ---- Quarantine ----

@bp.get("/quarantine/")
@member_required
def quarantine():
    """Email that could not be processed, with the reason."""
    q = (StoredMessage.select().where((StoredMessage.organization == g.org)
                                      & (StoredMessage.state == "quarantined"))
         .order_by(StoredMessage.captured_at.desc(), StoredMessage.id.desc()))
    return render_template("inbox/quarantine.html", page=paginate(q))


@bp.post("/quarantine/<int:message_id>/reprocess")
@member_required
def reprocess(message_id):
    """Queue the email to be parsed and routed again."""
    msg = get_message_or_404(message_id)
    if msg.state != "quarantined":
        return render_template("inbox/_quarantine_row.html", msg=msg, job=None)
    job = process_jobs.enqueue(msg.id, force=True)
    log.info("%s queued message %s for reprocessing", g.user.email, msg.id)
    if not request.htmx:
        flash("Queued for reprocessing.", "info")
        return redirect(url_for(".quarantine"))
    return render_template("inbox/_quarantine_row.html", msg=msg, job=_job_state(job, msg))


@bp.get("/quarantine/<int:message_id>/row")
@member_required
def quarantine_row(message_id):
    """The row, polled while its reprocessing job is pending."""
    msg = get_message_or_404(message_id)
    try:
        job = Job.fetch(request.args.get("job", ""), connection=queue.connection())
    except NoSuchJobError:
        job = None
    return render_template("inbox/_quarantine_row.html", msg=msg, job=_job_state(job, msg))


def _job_state(job: Job | None, msg: StoredMessage) -> dict | None:
    """{"id", "status", "pending", "error"} of this message's Reprocess job;
    None for any other job id (the id comes from the page)."""
    if job is None or job.func_name != "jobs.process.run" or list(job.args[:1]) != [msg.id]:
        return None
    status = job.get_status(refresh=True)
    status = getattr(status, "value", status)
    error = ""
    if status == "failed":
        result = job.latest_result()
        lines = ((result and result.exc_string) or "").strip().splitlines()
        error = lines[-1] if lines else "The job failed without an error message; see the worker's log."
    return {"id": job.id, "status": status, "pending": status in PENDING, "error": error}
