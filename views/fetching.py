"""Fetching controls on a saved connection: Fetch now, Enable/Disable and
Dry run. The live fetch panel on the connection page polls `panel`."""
from __future__ import annotations

import logging

from flask import Blueprint, abort, g, render_template
from rq.exceptions import NoSuchJobError
from rq.job import Job

from jobs import fetch as fetch_jobs
from models import EmailConnection, FetchRun, utcnow
from services import queue

from .access import admin_required
from .connections import get_connection_or_404

bp = Blueprint("fetching", __name__, url_prefix="/settings/connections")
log = logging.getLogger(__name__)


def _panel(conn: EmailConnection, notice: str = ""):
    runs = conn.fetch_runs.order_by(FetchRun.id.desc()).limit(5)
    return render_template("connections/_fetch_panel.html", conn=conn, runs=runs, notice=notice)


@bp.get("/<api_name>/fetch-panel")
@admin_required
def panel(api_name):
    """Fetch state, refreshed while the page is open."""
    return _panel(get_connection_or_404(api_name))


@bp.post("/<api_name>/fetch-now")
@admin_required
def fetch_now(api_name):
    """Queue a fetch now (unless one is queued or running)."""
    conn = get_connection_or_404(api_name)
    if conn.status == "never":
        return _panel(conn, "Test and Save the connection first.")
    job = fetch_jobs.enqueue(conn.id)
    log.info("%s asked to fetch %s now", g.user.email, conn.api_name)
    return _panel(conn, "Fetch queued." if job else "A fetch is already queued or running.")


@bp.post("/<api_name>/enable")
@admin_required
def enable(api_name):
    """Enable fetching (also resumes a connection paused after failed sign-ins)."""
    conn = get_connection_or_404(api_name)
    conn.enabled = True
    if conn.status == "paused":
        conn.status, conn.consecutive_failures = "failing", 0
    conn.next_fetch_at = utcnow()
    conn.save()
    conn.log("info", f"Fetching enabled by {g.user.email}.")
    return _panel(conn, "Fetching enabled.")


@bp.post("/<api_name>/disable")
@admin_required
def disable(api_name):
    """Stop fetching this connection until it is enabled again."""
    conn = get_connection_or_404(api_name)
    conn.enabled = False
    conn.save()
    conn.log("info", f"Fetching disabled by {g.user.email}.")
    return _panel(conn, "Fetching disabled.")


@bp.post("/<api_name>/dry-run")
@admin_required
def dry_run(api_name):
    """Show the next unread emails and what would happen, marking nothing read."""
    conn = get_connection_or_404(api_name)
    job = queue.queue("tests").enqueue(fetch_jobs.dry_run, conn.id, 10, job_timeout=300, result_ttl=600,
                                       failure_ttl=600, description=f"Dry run of connection {conn.id}")
    return render_template("connections/_dry_run.html", conn=conn, job_id=job.id, state="queued", items=None)


@bp.get("/<api_name>/dry-run/<job_id>")
@admin_required
def dry_run_status(api_name, job_id):
    """The dry run's result, polled until it is there."""
    conn = get_connection_or_404(api_name)
    try:
        job = Job.fetch(job_id, connection=queue.connection())
    except NoSuchJobError:
        abort(404)
    if job.args[:1] != (conn.id,):
        abort(404)  # another connection's (or organization's) job
    state = getattr(job.get_status(), "value", job.get_status())
    items, error = None, ""
    if state == "finished":
        items = job.return_value()
    elif state == "failed":
        result = job.latest_result()
        error = _first_line(result.exc_string if result else "")
    return render_template("connections/_dry_run.html", conn=conn, job_id=job_id, state=state, items=items,
                           error=error)


def _first_line(exc_string: str) -> str:
    lines = [line for line in (exc_string or "").strip().splitlines() if line.strip()]
    return lines[-1] if lines else "The dry run failed; see the log file."
