"""Routing: what a processed email becomes, chosen per connection.

  incident  every email creates an incident;
  case      an email that replies to one already in a case (In-Reply-To /
            References), or carries a case tag like [INC-42] in its
            subject, is added to that case; otherwise a new incident;
  inbox     kept in the Inbox for an analyst to create or attach.
"""
from __future__ import annotations

import re
from typing import Iterable, Optional

from peewee import IntegrityError, fn

from models import EmailConnection, Incident, StoredMessage, db, write_transaction, utcnow

CASE_TAG = re.compile(r"\[\s*INC-(\d{1,9})\s*\]", re.I)
MSGID = re.compile(r"<[^<>\s]+>")


def message_ids(text: str) -> list[str]:
    return MSGID.findall(text or "")


def find_case(org_id: int, subject: str, in_reply_to: str, references: Iterable[str]) -> tuple[Optional[Incident], str]:
    """The existing case this email belongs to, and why."""
    m = CASE_TAG.search(subject or "")
    if m:
        inc = Incident.get_or_none((Incident.organization == org_id) & (Incident.number == int(m.group(1))))
        if inc is not None:
            return inc, "tag"
    ids = [i for i in message_ids(in_reply_to)] + [i for r in references for i in message_ids(r)]
    if ids:
        hit = (StoredMessage.select(StoredMessage.incident)
               .where((StoredMessage.organization == org_id) & (StoredMessage.message_id.in_(ids))
                      & StoredMessage.incident.is_null(False))
               .order_by(StoredMessage.id.desc()).first())
        if hit is not None:
            return hit.incident, "reply"
    return None, ""


def new_incident(org_id: int, title: str, connection: EmailConnection | None = None, user=None) -> Incident:
    """Numbers are per organization; a clash with a concurrent worker retries."""
    for _ in range(10):
        try:
            with write_transaction():
                number = (Incident.select(fn.COALESCE(fn.MAX(Incident.number), 0))
                          .where(Incident.organization == org_id).scalar()) + 1
                return Incident.create(organization=org_id, number=number, title=(title or "(no subject)")[:500],
                                       connection=connection, created_by=user)
        except IntegrityError:
            continue
    raise RuntimeError("Could not allocate an incident number")


def decide(routing: str, org_id: int, subject: str, in_reply_to: str, references: list[str]) -> tuple[str, Optional[Incident]]:
    """('new-incident' | 'threaded' | 'inbox', existing incident or None)."""
    if routing == "inbox":
        return "inbox", None
    if routing == "case":
        inc, _why = find_case(org_id, subject, in_reply_to, references)
        if inc is not None:
            return "threaded", inc
    return "new-incident", None


def apply(msg: StoredMessage, routing: str) -> str:
    """Route a message inside the caller's transaction; returns the route."""
    refs = msg.references.split() if msg.references else []
    route, inc = decide(routing, msg.organization_id, msg.subject, msg.in_reply_to, refs)
    if route == "new-incident":
        inc = new_incident(msg.organization_id, msg.subject, msg.connection)
    if inc is not None:
        msg.incident = inc
        Incident.update(updated_at=utcnow()).where(Incident.id == inc.id).execute()
    msg.route = route
    return route


def preview_route(conn: EmailConnection, parsed) -> str:
    """For Dry run: what would happen, in words."""
    refs = list(getattr(parsed, "references", []) or [])
    route, inc = decide(conn.routing, conn.organization_id, parsed.subject or "", parsed.in_reply_to or "", refs)
    if route == "threaded":
        return f"add to case {inc.tag}"
    if route == "inbox":
        return "keep in the Inbox"
    return "create an incident"


def attach_to(msg: StoredMessage, incident: Incident) -> None:
    """An analyst adds an Inbox email to a case."""
    with write_transaction():
        msg.incident, msg.route = incident, "attached"
        msg.save()
        Incident.update(updated_at=utcnow()).where(Incident.id == incident.id).execute()


def create_from(msg: StoredMessage, user=None) -> Incident:
    """An analyst creates an incident from an Inbox email."""
    with write_transaction():
        inc = new_incident(msg.organization_id, msg.subject, msg.connection, user)
        msg.incident, msg.route = inc, "created"
        msg.save()
    return inc
