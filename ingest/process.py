"""Processing: a captured email is parsed, its attachments and indicators
stored, and it is routed (incident, case or Inbox).

Separate from capture so it scales with workers and can be repeated: a
message that cannot be parsed goes to quarantine with its error (shown in
the UI with Reprocess); an unexpected failure is retried at most
MAX_PROCESS_ATTEMPTS times, then quarantined, so it never blocks the rest
and is never retried forever."""
from __future__ import annotations

import json
import logging

from models import MAX_PROCESS_ATTEMPTS, Attachment, Indicator, StoredMessage, db, write_transaction, utcnow

from . import route
from .parse import ParseError, parse_file
from .indicators import extract_indicators
from .store import RawStore

log = logging.getLogger(__name__)
MAX_TEXT = 2 * 1024 * 1024


def process(message_id: int, store: RawStore, *, force: bool = False) -> str:
    """Returns the outcome: processed route, 'quarantined', or 'skipped'."""
    msg = StoredMessage.get_or_none(StoredMessage.id == message_id)
    if msg is None:
        return "skipped"
    if msg.state == "processed" or (msg.state == "quarantined" and not force):
        return "skipped"
    # Count the attempt first: a crash mid-way still counts towards the limit.
    StoredMessage.update(attempts=StoredMessage.attempts + 1).where(StoredMessage.id == msg.id).execute()
    msg.attempts += 1
    try:
        parsed = parse_file(store.path(msg.path))
    except ParseError as e:
        return _quarantine(msg, f"Cannot be parsed as an email: {e}")
    except Exception as e:
        log.exception("Processing message %s failed", msg.id)
        if msg.attempts >= MAX_PROCESS_ATTEMPTS and not force:
            return _quarantine(msg, f"Processing failed {msg.attempts} times: {e.__class__.__name__}: {e}")
        if force:
            return _quarantine(msg, f"Processing failed: {e.__class__.__name__}: {e}")
        raise
    return _store_parsed(msg, parsed, store)


def _quarantine(msg: StoredMessage, error: str) -> str:
    StoredMessage.update(state="quarantined", error=error[:4000], processed_at=utcnow()).where(
        StoredMessage.id == msg.id).execute()
    log.warning("Message %s quarantined: %s", msg.id, error)
    if msg.connection_id:
        from models import EmailConnection

        conn = EmailConnection.get_or_none(EmailConnection.id == msg.connection_id)
        if conn is not None:
            conn.log("warning", f"An email was sent to quarantine: {error}")
    return "quarantined"


def _store_parsed(msg: StoredMessage, parsed, store: RawStore) -> str:
    attachments = _attachment_rows(parsed, store)
    indicators = extract_indicators(parsed)
    with write_transaction():
        fresh = StoredMessage.get_by_id(msg.id)
        if fresh.state == "processed":
            return "skipped"  # another worker finished it first: never two incidents
        _fill(fresh, parsed)
        Attachment.delete().where(Attachment.message == fresh).execute()
        Indicator.delete().where(Indicator.message == fresh).execute()
        if attachments:
            Attachment.insert_many([dict(row, message=fresh.id) for row in attachments]).execute()
        for chunk in range(0, len(indicators), 200):  # bounded statement size
            Indicator.insert_many([
                {"message": fresh.id, "kind": i.kind, "value": str(i.value)[:2000], "source": i.source[:255]}
                for i in indicators[chunk:chunk + 200]]).execute()
        routing = fresh.connection.routing if fresh.connection_id else "incident"
        outcome = route.apply(fresh, routing) if fresh.incident_id is None else "kept"
        fresh.state, fresh.error, fresh.processed_at = "processed", "", utcnow()
        fresh.save()
    return outcome


def _fill(msg: StoredMessage, p) -> None:
    msg.subject = (p.subject or "")[:10000]
    msg.from_addr = format_address(p.from_)[:998]
    msg.to_addrs = ", ".join(format_address(a) for a in (p.to or []))[:10000]
    msg.date = (p.date or "")[:64]
    msg.message_id = (p.message_id or msg.message_id or "")[:998]
    msg.in_reply_to = (p.in_reply_to or "")[:998]
    msg.references = " ".join(p.references or [])[:10000]
    msg.text_body = (p.text or "")[:MAX_TEXT]
    msg.html_body = (p.html or "")[:MAX_TEXT]
    msg.headers_json = json.dumps([[str(k), str(v)[:4000]] for k, v in (p.headers or [])][:500])
    msg.defects = "\n".join(str(d) for d in (p.defects or []))[:10000]
    ev = p.evidence
    if ev is not None and ev is not p:
        msg.evidence_json = json.dumps({
            "subject": ev.subject, "from": format_address(ev.from_), "date": ev.date, "message_id": ev.message_id,
            "to": [format_address(a) for a in (ev.to or [])], "text": (ev.text or "")[:200000],
        })


def format_address(a) -> str:
    """ParsedEmail addresses may be (name, address) pairs or objects."""
    if a is None:
        return ""
    if isinstance(a, str):
        return a
    if isinstance(a, (tuple, list)):
        name, addr = (list(a) + ["", ""])[:2]
        return f"{name} <{addr}>" if name and addr else (addr or name or "")
    name, addr = getattr(a, "name", "") or getattr(a, "display", ""), getattr(a, "address", "") or getattr(a, "addr", "")
    return f"{name} <{addr}>" if name and addr else (addr or name or str(a))


def _attachment_rows(parsed, store: RawStore) -> list[dict]:
    rows = []
    ev = parsed.evidence if parsed.evidence is not parsed else None
    seen = set()
    for source, from_evidence in ((parsed, False), (ev, True)):
        if source is None:
            continue
        for att in source.attachments or []:
            data = getattr(att, "data", None)
            if data is not None:
                rel, _ = store.put_bytes(data, kind="att")
            else:
                rel = ""
            key = (att.sha256, from_evidence)
            if key in seen:
                continue
            seen.add(key)
            rows.append({"filename": (att.filename or "")[:255], "content_type": (att.content_type or "")[:255],
                         "size": att.size, "sha256": att.sha256, "md5": att.md5, "path": rel,
                         "from_evidence": from_evidence})
    return rows
