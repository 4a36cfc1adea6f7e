"""Incidents (cases) and the emails in them: the list, the case view, and
the email's content served safely (sanitized HTML in a sandboxed frame,
attachments and raw .eml as downloads only).

Email content is hostile by assumption: it is never served as a page the
browser would run. Every lookup is scoped to `g.org`; another
organization's incident, email or attachment is a 404."""
from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import re
import unicodedata
from dataclasses import dataclass

from flask import (Blueprint, abort, current_app, g, make_response, redirect, render_template, request,
                   send_file, url_for)
from peewee import JOIN, fn

from ingest.store import RawStore
from models import Attachment, EmailConnection, Incident, StoredMessage, utcnow

from .access import login_required

bp = Blueprint("incidents", __name__, url_prefix="/incidents")
log = logging.getLogger(__name__)

PER_PAGE = 50
STATUSES = ("open", "closed")
INDICATOR_ORDER = ("url", "domain", "ip", "email", "sha256", "md5")
# The frame's own policy: no script, no network, no plugins, no forms, even
# if the sanitizer missed something; `sandbox` also applies when the URL is
# opened directly in a tab.
FRAME_CSP = ("sandbox; default-src 'none'; style-src 'unsafe-inline'; img-src {img}; "
             "form-action 'none'; base-uri 'none'; frame-ancestors 'self'")


def member_required(view):
    """Any member of the current organization; a user without one gets 403."""
    @functools.wraps(view)
    @login_required
    def wrapped(*args, **kwargs):
        if g.membership is None:
            abort(403)
        return view(*args, **kwargs)
    return wrapped


# ---- lookups (every one scoped to the organization) ----

def get_incident_or_404(number: int) -> Incident:
    inc = Incident.get_or_none((Incident.organization == g.org) & (Incident.number == number))
    if inc is None:
        abort(404)
    return inc


def get_message_or_404(message_id: int) -> StoredMessage:
    msg = StoredMessage.get_or_none((StoredMessage.organization == g.org) & (StoredMessage.id == message_id))
    if msg is None:
        abort(404)
    return msg


def incidents_query(org, connection: EmailConnection | None = None, status: str | None = None):
    """Incidents newest first, each with `email_count`; shared with the CLI."""
    q = (Incident.select(Incident, EmailConnection, fn.COUNT(StoredMessage.id).alias("email_count"))
         .join(EmailConnection, JOIN.LEFT_OUTER, on=(Incident.connection == EmailConnection.id))
         .switch(Incident).join(StoredMessage, JOIN.LEFT_OUTER, on=(StoredMessage.incident == Incident.id))
         .where(Incident.organization == org)
         .group_by(Incident.id, EmailConnection.id)
         .order_by(Incident.created_at.desc(), Incident.id.desc()))
    if connection is not None:
        q = q.where(Incident.connection == connection)
    if status:
        q = q.where(Incident.status == status)
    return q


@dataclass
class Page:
    items: list
    number: int
    pages: int
    total: int

    def url(self, number: int) -> str:
        """This page's URL with another page number; filters are kept."""
        args = request.args.to_dict()
        args["page"] = number
        return url_for(request.endpoint, **(request.view_args or {}), **args)


def paginate(query, per_page: int = PER_PAGE) -> Page:
    total = query.count()
    pages = max(1, math.ceil(total / per_page))
    number = min(max(request.args.get("page", 1, type=int) or 1, 1), pages)
    return Page(list(query.paginate(number, per_page)), number, pages, total)


# ---- the list and the case view ----

@bp.get("/")
@member_required
def index():
    """Incidents newest first, filtered by connection and status."""
    connections = list(EmailConnection.select().where(EmailConnection.organization == g.org)
                       .order_by(EmailConnection.name))
    api_name = request.args.get("connection", "")
    status = request.args.get("status", "")
    status = status if status in STATUSES else ""
    chosen = next((c for c in connections if c.api_name == api_name), None)
    notice = ""
    if api_name and chosen is None:
        notice = f"There is no connection with API Name “{api_name}” in this organization; showing all incidents."
    page = paginate(incidents_query(g.org, chosen, status))
    return render_template("incidents/index.html", page=page, connections=connections, chosen=chosen,
                           status=status, notice=notice)


@bp.get("/<int:number>")
@member_required
def detail(number):
    """One incident with each of its emails."""
    inc = get_incident_or_404(number)
    emails = list(inc.emails.order_by(StoredMessage.captured_at, StoredMessage.id))
    return render_template("incidents/detail.html", incident=inc, emails=[email_view(m) for m in emails])


@bp.post("/<int:number>/status")
@member_required
def set_status(number):
    """Close or reopen; htmx swaps the status block in place."""
    inc = get_incident_or_404(number)
    status = request.form.get("status", "")
    if status not in STATUSES:
        abort(400)
    if inc.status != status:
        inc.status, inc.updated_at = status, utcnow()
        inc.save()
        log.info("%s set %s to %s", g.user.email, inc.tag, status)
    if not request.htmx:
        return redirect(url_for(".detail", number=number))
    return render_template("incidents/_status.html", incident=inc)


@dataclass
class EmailView:
    """What the templates show of one stored email."""
    msg: StoredMessage
    headers: list
    evidence: dict | None
    attachments: list
    indicators: list  # [(kind, [Indicator, ...]), ...]
    blocked_images: int  # remote images the frame does not load unless asked


def email_view(msg: StoredMessage) -> EmailView:
    try:
        headers = [(str(k), str(v)) for k, v in json.loads(msg.headers_json or "[]")]
    except (ValueError, TypeError):
        headers = []
    try:
        evidence = json.loads(msg.evidence_json) if msg.evidence_json else None
    except ValueError:
        evidence = None
    attachments = list(msg.attachments.order_by(Attachment.from_evidence.desc(), Attachment.id))
    for att in attachments:
        att.download_name = safe_filename(att.filename, f"attachment-{att.id}.bin")
        att.shown_name = visible(att.filename)
    rank = {k: i for i, k in enumerate(INDICATOR_ORDER)}
    found = sorted(msg.indicators, key=lambda i: (rank.get(i.kind, len(rank)), i.kind, i.value))
    grouped = [(kind, list(rows)) for kind, rows in itertools.groupby(found, key=lambda i: i.kind)]
    return EmailView(msg, headers, evidence if isinstance(evidence, dict) else None, attachments, grouped,
                     _sanitize(msg.html_body).count(" data-blocked-src=") if msg.html_body else 0)


def _sanitize(html: str, allow_remote_images: bool = False) -> str:
    from ingest import sanitize  # looked up per call, so a test can take this layer away

    return sanitize.sanitize_html(html or "", allow_remote_images=allow_remote_images)


# ---- email content: never rendered as a page of ours ----

@bp.get("/messages/<int:message_id>/body.html")
@member_required
def message_html(message_id):
    """The email's HTML, sanitized, for the sandboxed frame only."""
    msg = get_message_or_404(message_id)
    remote = request.args.get("remote") == "1"
    body = _sanitize(msg.html_body, allow_remote_images=remote)
    page = f'<!doctype html><html><head><meta charset="utf-8"></head><body>{body}</body></html>'
    resp = make_response(page)
    resp.headers["Content-Type"] = "text/html; charset=utf-8"
    # Remote images tell the sender the email was opened: only on request, and https only.
    resp.headers["Content-Security-Policy"] = FRAME_CSP.format(img="data: https:" if remote else "data:")
    return _private(resp)


@bp.get("/messages/<int:message_id>/raw")
@member_required
def message_raw(message_id):
    """The raw email as it was received, as a download."""
    msg = get_message_or_404(message_id)
    path = _stored_file(msg.path, f"The raw email of message {msg.id}")
    name = f"{_incident_prefix(msg)}message-{msg.id}.eml"
    return _private(send_file(path, mimetype="message/rfc822", as_attachment=True, download_name=name))


@bp.get("/attachments/<int:attachment_id>")
@member_required
def attachment(attachment_id):
    """An attachment, as a download only: never shown inline."""
    att = (Attachment.select().join(StoredMessage)
           .where((Attachment.id == attachment_id) & (StoredMessage.organization == g.org)).first())
    if att is None:
        abort(404)
    path = _stored_file(att.path, f"Attachment {att.id} ({att.filename or 'no name'})")
    name = safe_filename(att.filename, f"attachment-{att.id}.bin")
    return _private(send_file(path, mimetype="application/octet-stream", as_attachment=True,
                              download_name=name))


def _stored_file(rel: str, what: str):
    """The file under DATA_DIR, or a 404 page that says what is missing."""
    path = RawStore(current_app.config["DATA_DIR"]).path(rel) if rel else None
    if path is None or not path.is_file():
        log.warning("%s is missing: %r under DATA_DIR %s", what, rel, current_app.config["DATA_DIR"])
        text = (f"{what} was not stored (too large, or not kept)." if not rel else
                f"{what} is missing from the data folder (DATA_DIR/{rel}). Check that DATA_DIR points "
                "to the same folder the workers write to.")
        abort(make_response(render_template("error.html", code=404, title="File not found", text=text), 404))
    return path


def _private(resp):
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Cache-Control"] = "private, no-store"
    return resp


def _incident_prefix(msg: StoredMessage) -> str:
    return f"INC-{msg.incident.number}-" if msg.incident_id else ""


_UNSAFE_NAME = re.compile(r'[/\\:*?"<>|]+')


def visible(text: str) -> str:
    """Control and format characters spelled out (\\u202e), so a name shows what it is."""
    return "".join(f"\\u{ord(ch):04x}" if unicodedata.category(ch) in ("Cc", "Cf") else ch for ch in text or "")


def safe_filename(name: str, fallback: str) -> str:
    """A download name without folders, quotes, leading dots, or control and
    format characters (a right-to-left override makes "exe.pdf" look like a PDF)."""
    name = unicodedata.normalize("NFC", name or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join("_" if unicodedata.category(ch) in ("Cc", "Cf") else ch for ch in name)
    name = _UNSAFE_NAME.sub("_", name).strip(" ._")
    return name[:150] or fallback
