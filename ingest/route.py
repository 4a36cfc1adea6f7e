"""Routing: what a processed email becomes, chosen per connection.

  incident  every email creates an incident;
  case      an email that replies to one already in a case (In-Reply-To /
            References), or carries a case tag like [INC-42] in its
            subject, is added to that case; otherwise a new incident;
  inbox     kept in the Inbox for an analyst to create or attach.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Optional

from peewee import IntegrityError, chunked, fn

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


@dataclass
class Email:
    """What routing needs to know of one email of a batch."""
    id: int
    organization_id: int
    connection_id: Optional[int]
    routing: str  # the connection's: incident | case | inbox
    subject: str = ""
    message_id: str = ""
    in_reply_to: str = ""
    references: str = ""  # space-separated Message-IDs
    incident_id: Optional[int] = None  # routed before (e.g. by an earlier attempt): kept as it is


class _NewIncident:
    """An incident this batch creates; its id is known once it is inserted."""

    def __init__(self, org_id: int, number: int, title: str, connection_id: Optional[int]):
        self.org_id, self.number, self.title, self.connection_id = org_id, number, title, connection_id
        self.id: Optional[int] = None


def route_many(emails: list[Email]) -> dict[int, tuple[str, Optional[int]]]:
    """Route a batch inside the caller's write transaction: {email id:
    (route, incident id)}, route one of new-incident | threaded | inbox |
    kept (it already had an incident).

    The result is the one routing the emails one at a time, in list order,
    would give: a case tag or a reply also finds the incident or the email
    of an earlier email of the same batch. Yet the batch costs a handful of
    statements (tags, replies, numbers, one insert, one update) instead of
    three or four per email.

    Incident numbers are the organization's MAX + 1, + 2, ... read inside
    the caller's transaction. Two workers can read the same MAX on
    PostgreSQL; the second insert then fails on the unique (organization,
    number) index with IntegrityError, and the caller retries its whole
    transaction (on SQLite, BEGIN IMMEDIATE already serializes writers)."""
    out: dict[int, tuple[str, object]] = {}
    routed = [e for e in emails if e.incident_id is None and e.routing != "inbox"]
    if not routed:
        return {e.id: ("kept", e.incident_id) if e.incident_id is not None else ("inbox", None) for e in emails}
    orgs = sorted({e.organization_id for e in routed})
    cases = [e for e in routed if e.routing == "case"]
    tag_of = {e.id: int(m.group(1)) for e in cases if (m := CASE_TAG.search(e.subject or ""))}
    refs_of = {e.id: message_ids(e.in_reply_to) + [i for r in (e.references or "").split() for i in message_ids(r)]
               for e in cases}

    # Incidents named by a case tag: (organization, number) -> incident (id, or one of this batch)
    by_number: dict[tuple[int, int], object] = {}
    for chunk in chunked(sorted(set(tag_of.values())), 500):
        by_number.update(((org, number), inc_id) for inc_id, org, number in Incident.select(
            Incident.id, Incident.organization, Incident.number).where(
            Incident.organization.in_(orgs) & Incident.number.in_(chunk)).tuples())

    # Emails a case email replies to: (organization, Message-ID) -> {email id: its incident}.
    # This includes the batch's own emails as they were before this batch; each
    # is moved to its new Message-ID and incident below as it is routed.
    holders: dict[tuple[int, str], dict[int, object]] = {}
    held_under: dict[int, tuple[int, str]] = {}
    for chunk in chunked(sorted({i for refs in refs_of.values() for i in refs}), 500):
        for mid, org, msgid, inc_id in StoredMessage.select(
                StoredMessage.id, StoredMessage.organization, StoredMessage.message_id, StoredMessage.incident).where(
                StoredMessage.organization.in_(orgs) & StoredMessage.message_id.in_(chunk)
                & StoredMessage.incident.is_null(False)).tuples():
            holders.setdefault((org, msgid), {})[mid] = inc_id
            held_under[mid] = (org, msgid)

    # The statements of every batch are written out, as processing writes its
    # rows: peewee composing them cost more than the rest of routing. (Imported
    # here, not at the top: processing imports this module.)
    from .process import _col, _insert_rows, _params, _table

    table, org_col, number_col = _table(Incident), _col(Incident.organization), _col(Incident.number)
    last_number = dict.fromkeys(orgs, 0)
    last_number.update(db.execute_sql(f"SELECT {org_col}, MAX({number_col}) FROM {table} WHERE {org_col} IN "
                                      f"{_params(orgs)} GROUP BY {org_col}", orgs).fetchall())

    new: list[_NewIncident] = []
    touched: set[int] = set()  # existing incidents that got an email: updated_at
    for e in emails:
        inc: object = e.incident_id
        if inc is not None:
            out[e.id] = ("kept", inc)
        elif e.routing == "inbox":
            out[e.id] = ("inbox", None)
        else:
            if e.routing == "case":
                if e.id in tag_of:
                    inc = by_number.get((e.organization_id, tag_of[e.id]))
                if inc is None:  # the latest email it replies to that is in a case, as find_case
                    hits = {mid: i for r in refs_of[e.id] for mid, i in holders.get((e.organization_id, r), {}).items()}
                    if hits:
                        inc = hits[max(hits)]
            if inc is not None:
                out[e.id] = ("threaded", inc)
                if isinstance(inc, int):
                    touched.add(inc)
            else:
                last_number[e.organization_id] += 1
                inc = _NewIncident(e.organization_id, last_number[e.organization_id], e.subject, e.connection_id)
                new.append(inc)
                by_number[(inc.org_id, inc.number)] = inc
                out[e.id] = ("new-incident", inc)
        # Later emails of the batch see this one as routed.
        if e.id in held_under:
            holders[held_under.pop(e.id)].pop(e.id, None)
        if inc is not None and e.message_id:
            holders.setdefault((e.organization_id, e.message_id), {})[e.id] = inc
            held_under[e.id] = (e.organization_id, e.message_id)

    now = utcnow()
    if new:
        _insert_rows(Incident, (Incident.organization, Incident.number, Incident.title, Incident.connection,
                                Incident.status, Incident.created_at, Incident.updated_at),
                     [(i.org_id, i.number, (i.title or "(no subject)")[:500], i.connection_id, "open", now, now)
                      for i in new])
        # Our numbers are ours now (the unique index): read their ids back.
        span: dict[int, tuple[int, int]] = {}
        for i in new:  # consecutive per organization
            span[i.org_id] = (span.get(i.org_id, (i.number,))[0], i.number)
        p = db.param
        where = " OR ".join([f"({org_col} = {p} AND {number_col} BETWEEN {p} AND {p})"] * len(span))
        ids = {(org, number): inc_id for inc_id, org, number in db.execute_sql(
            f"SELECT {_col(Incident.id)}, {org_col}, {number_col} FROM {table} WHERE {where}",
            [v for org, (lo, hi) in span.items() for v in (org, lo, hi)]).fetchall()}
        for i in new:
            i.id = ids[(i.org_id, i.number)]
    if touched:
        Incident.update(updated_at=now).where(Incident.id.in_(sorted(touched))).execute()
    return {mid: (r, inc.id if isinstance(inc, _NewIncident) else inc) for mid, (r, inc) in out.items()}


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
