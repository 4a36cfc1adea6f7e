"""Grant Access / Switch Account: the delegated sign-in, begun and completed
for the web views. The flow (with its PKCE verifier) is kept server-side in
Redis, encrypted, under its `state`, for 15 minutes."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

from connectors.errors import ConnectorError
from models import ConnectionDraft
from services import crypto, queue

from .connect import settings_from_values

log = logging.getLogger(__name__)
FLOW_TTL = 15 * 60


def _key(state: str) -> str:
    return f"intake:oauth-flow:{state}"


def _notice_key(draft_id: str) -> str:
    return f"intake:oauth-notice:{draft_id}"


def leave_notice(draft_id: str, category: str, message: str) -> None:
    """What the form says when the admin is back from signing in. It waits in
    Redis because the sign-in answer arrives without the session cookie,
    where a flash() would replace that cookie and sign the admin out."""
    queue.connection().set(_notice_key(draft_id), json.dumps([category, message]), ex=FLOW_TTL)


def take_notice(draft_id: str) -> tuple[str, str] | None:
    raw = queue.connection().getdel(_notice_key(draft_id))
    return tuple(json.loads(raw)) if raw else None


def delegated_scopes(values: dict) -> list[str]:
    from connectors import oauth

    settings = settings_from_values(values)
    if values["protocol"] == "graph":
        return oauth.graph_delegated_scopes(settings)
    if values.get("protocol") == "imap":
        return list(oauth.IMAP_SCOPES)
    return list(oauth.EWS_DELEGATED_SCOPES)


def begin(draft: ConnectionDraft, redirect_uri: str, user_id: int) -> str:
    """Start the sign-in; returns the identity platform URL to send the admin to."""
    from connectors.base import split_mailbox
    from connectors.oauth import TokenProvider

    values = draft.values()
    provider = TokenProvider(settings_from_values(values))
    login_hint = split_mailbox(values.get("email_address", ""))[0]
    flow = provider.begin_grant(redirect_uri, delegated_scopes(values), login_hint=login_hint if "@" in login_hint else "")
    record = {"draft_id": draft.id, "user_id": user_id, "org_id": draft.organization_id, "flow": flow}
    queue.connection().set(_key(flow["state"]), crypto.encrypt(json.dumps(record)), ex=FLOW_TTL)
    return flow["auth_uri"]


@dataclass
class GrantOutcome:
    draft: ConnectionDraft | None
    username: str = ""
    name: str = ""
    error: str = ""


def complete(state: str, params: dict, user_id: int | None, org_id: int | None) -> GrantOutcome:
    """Redeem the code; the token cache and account go into the draft.

    The answer usually arrives as a cross-site form POST, which carries no
    (SameSite=Lax) session cookie: the flow is found and bound by its
    unguessable, single-use `state` instead. When a session is there, it
    must be the user who started the sign-in."""
    from connectors.oauth import TokenProvider

    raw = queue.connection().getdel(_key(state)) if state else None
    if raw is None:
        return GrantOutcome(None, error="This sign-in has expired or was already used. Press Grant Access again.")
    record = json.loads(crypto.decrypt(raw.decode() if isinstance(raw, bytes) else raw))
    if user_id is not None and (record["user_id"] != user_id or record["org_id"] != org_id):
        return GrantOutcome(None, error="This sign-in was started by another user or organization.")
    draft = ConnectionDraft.get_or_none(ConnectionDraft.id == record["draft_id"])
    if draft is None:
        return GrantOutcome(None, error="The connection form expired. Fill it in and press Grant Access again.")
    values = draft.values()
    provider = TokenProvider(settings_from_values(values))
    try:
        if params.get("error"):
            d = provider.diagnose(params, redirect_uri=record["flow"].get("redirect_uri", ""), during="grant")
            return GrantOutcome(draft, error=f"Sign-in did not complete: {d.message} {d.hint}".strip())
        result = provider.complete_grant(record["flow"], params)
    except ConnectorError as e:
        return GrantOutcome(draft, error=f"{e.diagnosis.message} {e.diagnosis.hint}".strip())
    values.update(oauth_token_cache=provider.serialized_cache(), oauth_account_username=result.username,
                  oauth_account_name=result.name or result.username, oauth_refreshed_on=time.time(),
                  oauth_token_expires_on=result.expires_on)
    draft.payload = crypto.encrypt(json.dumps(values, default=str))
    draft.save()
    log.info("Office 365 access granted for %s as %s", values.get("api_name"), result.username)
    return GrantOutcome(draft, username=result.username, name=result.name)


def graph_migration_draft(conn, user, certificate_upload=None) -> ConnectionDraft:
    """Migrate to Graph: a draft of this same connection with protocol
    `graph`, tested by the ordinary Test job; the connection changes only if
    that test succeeds, and then in place: same id, credentials, grant
    (refresh tokens are not tied to EWS: Graph scopes are asked for with the
    same grant) and history.

    No email is fetched twice. RemoteKey rows are per connection and keyed
    by the server's item id, and EWS item ids differ from Graph ids, so the
    old keys do not match. But capture (ingest/capture.py) also looks up
    each fetched message's SHA-256 among this connection's StoredMessages and
    records a match as a duplicate (a new RemoteKey to the same message),
    not a new email. Messages fetched by EWS were marked read anyway, so
    Graph, which lists unread mail only, normally never sees them; the hash
    covers those that were not (a crash before mark-read, or marked unread
    again) as long as Exchange serves the same MIME through both APIs.

    `certificate_upload`: a "Certificate file" uploaded after a failed
    attempt (Graph's certificate), trusted in addition to the stored ones."""
    from connectors.tls import add_certificates, load_certificate_upload

    values = conn.stored_values()
    values["protocol"] = "graph"
    data = certificate_upload.read() if certificate_upload and certificate_upload.filename else b""
    if data:
        values["trusted_cert_pem"] = add_certificates(values.get("trusted_cert_pem") or "",
                                                      load_certificate_upload(data))
    return ConnectionDraft.make(conn.organization, values, connection=conn, user=user)
