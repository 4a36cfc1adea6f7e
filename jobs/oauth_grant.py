"""Grant Access / Switch Account: the delegated sign-in, begun and completed
for the web views. The flow (with its PKCE verifier) is kept server-side in
Redis, encrypted, under its `state`, for 15 minutes."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from connectors.errors import ConnectorError
from models import ConnectionDraft
from services import crypto, queue

from .connect import settings_from_values

log = logging.getLogger(__name__)
FLOW_TTL = 15 * 60


def _key(state: str) -> str:
    return f"intake:oauth-flow:{state}"


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
                  oauth_account_name=result.name or result.username)
    draft.payload = crypto.encrypt(json.dumps(values, default=str))
    draft.save()
    log.info("Office 365 access granted for %s as %s", values.get("api_name"), result.username)
    return GrantOutcome(draft, username=result.username, name=result.name)
