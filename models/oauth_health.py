"""Office 365 sign-in health of an OAuth, Graph or IMAP XOAUTH2 connection,
for the list and the connection page: who is signed in, until when the
access token is valid, when tokens were last fetched, whether sign-in is
failing, and a warning 30 days before the client secret or certificate
expires (an expired one stops all mail, with no error until then)."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Optional

from cryptography import x509

from connectors.errors import AUTH_CODES

WARN_DAYS = 30


@dataclass(frozen=True)
class OAuthHealth:
    state: str  # "ok" | "grant" (Grant Access again) | "failing" | "not_granted"
    account_name: str = ""
    account_username: str = ""
    app_only: bool = False
    token_expires_at: Optional[dt.datetime] = None  # naive UTC, like every stored time
    last_refresh_at: Optional[dt.datetime] = None
    token_valid: bool = False  # the access token has not expired yet
    problem: str = ""  # what is failing, in the fetch's or test's words
    warnings: list[str] = field(default_factory=list)  # secret / certificate expiry, long form
    short_warnings: list[str] = field(default_factory=list)  # the same, for the list

    @property
    def account(self) -> str:
        return self.account_name or self.account_username


def uses_oauth(conn) -> bool:
    return conn.protocol in ("oauth", "graph") or (conn.protocol == "imap" and conn.imap_auth == "xoauth2")


def oauth_health(conn, today: Optional[dt.date] = None) -> Optional[OAuthHealth]:
    """None for connections that do not sign in with Office 365."""
    if not uses_oauth(conn):
        return None
    today = today or dt.datetime.now(dt.timezone.utc).date()
    app_only = conn.oauth_access == "application"
    warnings, short = _expiry_warnings(conn, today)
    state, problem = _state(conn, app_only)
    expires = conn.oauth_token_expires_at
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    return OAuthHealth(
        state=state, account_name=conn.oauth_account_name, account_username=conn.oauth_account_username,
        app_only=app_only, token_expires_at=expires, token_valid=bool(expires and expires > now),
        last_refresh_at=conn.oauth_last_refresh_at,
        problem=problem, warnings=warnings, short_warnings=short)


def _state(conn, app_only: bool) -> tuple[str, str]:
    if conn.status == "grant":
        return "grant", conn.last_error
    if conn.status in ("failing", "paused") and (conn.last_error_code in AUTH_CODES
                                                 or conn.last_error_code.startswith("oauth_")):
        return "failing", conn.last_error
    if not app_only and not conn.oauth_account_username:
        return "not_granted", ""
    return "ok", ""


def _expiry_warnings(conn, today: dt.date) -> tuple[list[str], list[str]]:
    if conn.oauth_client_auth == "certificate":
        expires, what = certificate_expiry(conn.oauth_cert_pem), "certificate"
        renew = ("Create a new certificate, add it to the app's Certificates & secrets in the Microsoft Entra "
                 "admin center, upload it here and press Test and Save Connection.")
    else:
        expires, what = _as_date(conn.oauth_secret_expires), "client secret"
        renew = ("Create a new client secret on the app's Certificates & secrets page in the Microsoft Entra "
                 "admin center, enter its Value here (with its new expiry date) and press Test and Save Connection.")
    if expires is None:
        return [], []
    days = (expires - today).days
    if days > WARN_DAYS:
        return [], []
    if days < 0:
        return ([f"The {what} of the Entra app expired on {expires:%Y-%m-%d}: Office 365 refuses new tokens, "
                 f"so no mail is fetched. {renew}"], [f"{what.capitalize()} expired {expires:%Y-%m-%d}"])
    when = "today" if days == 0 else ("tomorrow" if days == 1 else f"in {days} days")
    return ([f"The {what} of the Entra app expires on {expires:%Y-%m-%d} ({when}). After that no mail is "
             f"fetched. {renew}"], [f"{what.capitalize()} expires {expires:%Y-%m-%d}"])


def certificate_expiry(cert_pem: str) -> Optional[dt.date]:
    if not (cert_pem or "").strip():
        return None
    try:
        return x509.load_pem_x509_certificate(cert_pem.encode()).not_valid_after_utc.date()
    except ValueError:
        return None


def _as_date(value) -> Optional[dt.date]:
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    if isinstance(value, str) and value:
        try:
            return dt.date.fromisoformat(value[:10])
        except ValueError:
            return None
    return None
