"""Office 365 / Microsoft Entra ID tokens for one connection (msal).

A `TokenProvider` wraps one msal `ConfidentialClientApplication` built from a
connection's `OAuthSettings`:

* Identity traffic goes through `session_for(settings)`, so the connection's
  proxy and uploaded certificates cover login.microsoftonline.com too.
* Delegated access (an admin clicked Grant Access and signed in as a user):
  auth code + PKCE once, then refresh tokens from the connection's own
  serialized msal cache, with no user present.
* App-only access (no account): client credentials, `.default` scopes.
* Every failure becomes a `ConnectorError` whose `Diagnosis` names the form
  field to fix; AADSTS codes get their own admin-friendly messages.

The caller stores `serialized_cache()` (encrypted) whenever `cache_changed`:
the cache holds refresh tokens, so it is a secret. Nothing here logs tokens,
secrets, codes or the cache.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence
from urllib.parse import urlsplit

import msal
from msal.authority import WELL_KNOWN_AUTHORITY_HOSTS
from msal.exceptions import MsalServiceError
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs12

from .base import ConnectionSettings, OAuthSettings, split_mailbox
from .errors import ConnectorError, Diagnosis
from .http import diagnose_http, session_for, with_presented_certificate

log = logging.getLogger(__name__)

# -- scopes -------------------------------------------------------------------

EWS_DELEGATED_SCOPES = ("https://outlook.office365.com/EWS.AccessAsUser.All",)
EWS_APP_SCOPES = ("https://outlook.office365.com/.default",)  # full_access_as_app
IMAP_SCOPES = ("https://outlook.office.com/IMAP.AccessAsUser.All",)
IMAP_APP_SCOPES = ("https://outlook.office365.com/.default",)  # IMAP.AccessAsApp
GRAPH_READ_WRITE = "Mail.ReadWrite"
GRAPH_READ_WRITE_SHARED = "Mail.ReadWrite.Shared"


def graph_delegated_scopes(graph_endpoint: "str | ConnectionSettings", shared: Optional[bool] = None
                           ) -> tuple[str, ...]:
    """Mail.ReadWrite for the signed-in user's own mailbox; the .Shared
    variant for a mailbox the user was given access to. ReadWrite, not Read:
    Intake marks messages read. Given a connection's settings instead of an
    endpoint, `shared` is decided as `graph_scopes` does."""
    if isinstance(graph_endpoint, ConnectionSettings):
        if shared is None:
            return graph_scopes(graph_endpoint, app_only=False)
        graph_endpoint = _require_oauth(graph_endpoint).graph_endpoint
    permission = GRAPH_READ_WRITE_SHARED if shared else GRAPH_READ_WRITE
    return (f"{_origin(graph_endpoint)}/{permission}",)


def graph_app_scopes(graph_endpoint: str) -> tuple[str, ...]:
    return (f"{_origin(graph_endpoint)}/.default",)


def is_app_only(settings: ConnectionSettings) -> bool:
    """No signed-in account means application (client credentials) access."""
    return settings.oauth is None or not settings.oauth.account_username.strip()


def graph_scopes(settings: ConnectionSettings, app_only: Optional[bool] = None) -> tuple[str, ...]:
    """The Graph scopes for this connection, for both Grant Access and later
    tokens (they must agree, or the refresh asks for an unconsented scope).
    Shared when the mailbox is not the account's own: the seed's
    `primary\\shared` form, or a signed-in account other than the mailbox."""
    oauth = _require_oauth(settings)
    if is_app_only(settings) if app_only is None else app_only:
        return graph_app_scopes(oauth.graph_endpoint)
    login, mailbox = split_mailbox(settings.email_address)
    user = oauth.account_username.strip() or login
    return graph_delegated_scopes(oauth.graph_endpoint, shared=user.lower() != mailbox.lower())


def ews_scopes(settings: ConnectionSettings, app_only: Optional[bool] = None) -> tuple[str, ...]:
    return EWS_APP_SCOPES if (is_app_only(settings) if app_only is None else app_only) else EWS_DELEGATED_SCOPES


def imap_scopes(settings: ConnectionSettings, app_only: Optional[bool] = None) -> tuple[str, ...]:
    return IMAP_APP_SCOPES if (is_app_only(settings) if app_only is None else app_only) else IMAP_SCOPES


def _origin(url: str) -> str:
    return url.strip().rstrip("/")


# -- authority ------------------------------------------------------------------

def authority_for(oauth: OAuthSettings) -> str:
    """`{authority_host}/{tenant}`; a blank tenant means a multi-tenant app,
    which signs in work and school accounts through `organizations`."""
    tenant = oauth.tenant_id.strip().strip("/") or "organizations"
    return f"{_origin(oauth.authority_host)}/{tenant}"


def _instance_discovery(authority_host: str):
    """msal validates unknown authority hosts by asking login.microsoftonline.com
    (instance discovery). Microsoft's own hosts, national clouds included, are
    known to msal and need no call; any other host (a private cloud, the test
    server) was typed by an admin on purpose, and asking the public cloud about
    it would fail offline and leak the host name. So: default for known hosts,
    off for the rest."""
    host = (urlsplit(_origin(authority_host)).hostname or "").lower()
    return None if host in WELL_KNOWN_AUTHORITY_HOSTS else False


# Shared by every msal app in this process: discovery documents (public, so
# three connections to one tenant make one GET) and msal's throttling records
# (keyed by the full request, so connections never see each other's results).
HTTP_CACHE: dict = {}


# -- client certificates --------------------------------------------------------

@dataclass(frozen=True)
class ClientCertificate:
    """A certificate credential for an Entra app, normalised to PEM."""

    cert_pem: str  # the leaf certificate only
    private_key_pem: str = field(repr=False)  # PKCS#8, unencrypted: store it encrypted
    sha1_thumbprint: str = ""  # hex, upper case: what the Entra portal lists
    sha256_thumbprint: str = ""
    not_after: Optional[dt.datetime] = None
    subject: str = ""


_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\s.*?-----END \1-----", re.S)
_NOT_A_CERTIFICATE = ("This file is not a certificate. Upload the certificate registered with your Entra app "
                      "as PEM (certificate and private key, in one file or two) or as PFX/PKCS#12 (.pfx, .p12).")


def load_client_certificate(cert_bytes: bytes, key_bytes: bytes | None = None,
                            passphrase: str = "") -> ClientCertificate:
    """Read an uploaded client certificate: PEM (certificate and key in one
    file or two, key optionally encrypted), DER certificate plus PEM key, or
    PFX/PKCS#12. Raises ValueError with a message meant for the admin."""
    data = cert_bytes or b""
    extra = key_bytes or b""
    pw = passphrase.encode() if passphrase else None
    if b"-----BEGIN" in data or (extra and b"-----BEGIN" not in data and not _looks_like_pkcs12(data)):
        certs, key = _read_pem_or_der(data, extra, pw)
    elif _looks_like_pkcs12(data):
        certs, key = _read_pkcs12(data, passphrase)
        if key is None and extra:
            _, key = _read_pem_or_der(b"", extra, pw)
    else:
        raise ValueError(_NOT_A_CERTIFICATE)
    if not certs:
        raise ValueError("No certificate was found in the upload. " + _NOT_A_CERTIFICATE)
    if key is None:
        raise ValueError("The upload has no private key. Upload the private key file (PEM) too, "
                         "or a PFX file that contains the key.")
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("The certificate's key is not an RSA key. Microsoft Entra app certificates "
                         "must use RSA keys (2048 bits or more).")
    cert = _certificate_for(key, certs)
    not_after = cert.not_valid_after_utc
    if not_after < dt.datetime.now(dt.timezone.utc):
        raise ValueError(f"The certificate expired on {not_after:%Y-%m-%d}. Create a new certificate, "
                         "register it with the Entra app and upload it here.")
    return ClientCertificate(
        cert_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
        private_key_pem=key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()).decode(),
        sha1_thumbprint=cert.fingerprint(hashes.SHA1()).hex().upper(),  # noqa: S303 - thumbprint, not security
        sha256_thumbprint=cert.fingerprint(hashes.SHA256()).hex().upper(),
        not_after=not_after,
        subject=cert.subject.rfc4514_string(),
    )


def _looks_like_pkcs12(data: bytes) -> bool:
    """A PFX is a DER SEQUENCE whose first element is INTEGER 3 (the PFX
    version). Telling this apart from garbage lets a wrong passphrase be
    reported as such instead of "not a certificate"."""
    if len(data) < 8 or data[0] != 0x30:
        return False
    n = data[1]
    offset = 2 if n < 0x80 else 2 + (n & 0x7F)
    return data[offset:offset + 3] == b"\x02\x01\x03"


def _read_pkcs12(data: bytes, passphrase: str):
    # A PFX exported with an empty password differs from one with none at all.
    candidates = [passphrase.encode()] if passphrase else [None, b""]
    for pw in candidates:
        try:
            key, cert, extra = pkcs12.load_key_and_certificates(data, pw)
        except ValueError:
            continue
        return [c for c in [cert, *(extra or [])] if c is not None], key
    if passphrase:
        raise ValueError("The passphrase is wrong for this PFX file. Enter the password it was exported with.")
    raise ValueError("This PFX file is protected by a passphrase. Enter it in Certificate passphrase.")


def _read_pem_or_der(data: bytes, extra: bytes, pw: Optional[bytes]):
    certs, key = [], None
    blobs = [data, extra]
    for blob in blobs:
        for m in _PEM_BLOCK.finditer(blob):
            label = m.group(1).decode()
            if label in ("CERTIFICATE", "X509 CERTIFICATE", "TRUSTED CERTIFICATE"):
                try:
                    certs.append(x509.load_pem_x509_certificate(m.group(0)))
                except ValueError as exc:
                    raise ValueError("A certificate in the upload is damaged. " + _NOT_A_CERTIFICATE) from exc
            elif label.endswith("PRIVATE KEY") and key is None:
                key = _load_pem_key(m.group(0), pw)
    if not certs and data and b"-----BEGIN" not in data:
        try:  # a .cer/.der certificate with the key in a separate PEM file
            certs.append(x509.load_der_x509_certificate(data))
        except ValueError as exc:
            raise ValueError(_NOT_A_CERTIFICATE) from exc
    return certs, key


def _load_pem_key(block: bytes, pw: Optional[bytes]):
    try:
        return serialization.load_pem_private_key(block, pw)
    except TypeError as exc:
        if pw is None:
            raise ValueError("The private key is protected by a passphrase. "
                             "Enter it in Certificate passphrase.") from exc
        return serialization.load_pem_private_key(block, None)  # not encrypted: the passphrase is unused
    except ValueError as exc:
        if pw is not None:
            raise ValueError("The passphrase is wrong for this private key.") from exc
        raise ValueError("The private key in the upload could not be read (PEM expected).") from exc


def _certificate_for(key, certs: list) -> x509.Certificate:
    """The certificate that belongs to the key (a chain may come first)."""
    wanted = key.public_key().public_numbers()
    for cert in certs:
        public = cert.public_key()
        if isinstance(public, rsa.RSAPublicKey) and public.public_numbers() == wanted:
            return cert
    raise ValueError("The private key does not belong to this certificate. "
                     "Upload the key that was created together with the certificate.")


def certificate_thumbprint(cert_pem: str) -> str:
    """SHA-1 hex as the Entra portal shows it, or "" when unreadable."""
    try:
        return x509.load_pem_x509_certificate(cert_pem.encode()).fingerprint(hashes.SHA1()).hex().upper()  # noqa: S303
    except (ValueError, TypeError):
        return ""


# -- results --------------------------------------------------------------------

@dataclass(frozen=True)
class Token:
    access_token: str = field(repr=False)
    expires_on: float = 0.0  # epoch seconds
    scopes: tuple[str, ...] = ()
    token_type: str = "Bearer"

    def expires_within(self, seconds: float) -> bool:
        return self.expires_on - time.time() < seconds


@dataclass(frozen=True)
class GrantResult:
    username: str
    name: str = ""
    tenant_id: str = ""
    object_id: str = ""
    scopes: tuple[str, ...] = ()
    expires_on: float = 0.0
    previous_username: str = ""  # the account this grant replaced, if another one

    @property
    def switched(self) -> bool:
        return bool(self.previous_username) and self.previous_username.lower() != self.username.lower()


# -- the provider ---------------------------------------------------------------

class TokenProvider:
    """Tokens for one connection. Cheap to construct: msal (and its discovery
    GET) is built on first use, so every failure surfaces from a method call
    as a ConnectorError."""

    # Why form_post: the code then travels in a POST body, never in a URL
    # that browser history, proxy logs or a Referer header could keep. The
    # callback is a cross-site POST: exempt it from CSRF and find the stored
    # flow by its `state`, not by a (SameSite=Lax) session cookie.
    RESPONSE_MODE = "form_post"

    def __init__(self, settings: ConnectionSettings, *, http_client: Optional[requests.Session] = None):
        self.settings = settings
        self.oauth = _require_oauth(settings)
        self.authority = authority_for(self.oauth)
        self._cache = msal.SerializableTokenCache()
        if self.oauth.token_cache.strip():
            try:
                self._cache.deserialize(self.oauth.token_cache)
            except (ValueError, TypeError):
                # Unreadable: start empty; the next token call says "Grant Access again".
                log.warning("The stored token cache of this connection could not be read; it was ignored")
                self._cache = msal.SerializableTokenCache()
        self._account_username = self.oauth.account_username.strip()
        self._http = http_client
        self._app: Optional[msal.ConfidentialClientApplication] = None
        self._lock = threading.RLock()
        # When the last access token handed out expires (epoch seconds; 0 = none
        # yet): the connection page shows it ("token valid until").
        self.token_expires_on = 0.0

    # -- state the caller persists ---------------------------------------
    @property
    def account_username(self) -> str:
        return self._account_username

    @property
    def app_only(self) -> bool:
        return not self._account_username

    @property
    def cache_changed(self) -> bool:
        return bool(self._cache.has_state_changed)

    def serialized_cache(self) -> str:
        """The msal cache as JSON. It contains refresh tokens: encrypt it at rest."""
        return self._cache.serialize()

    def close(self) -> None:
        """Drop pooled connections to the sign-in service (and any proxy
        tunnel). The provider stays usable: requests reconnects on demand."""
        if self._http is not None:
            self._http.close()

    # -- delegated: Grant Access -----------------------------------------
    def begin_grant(self, redirect_uri: str, scopes: Sequence[str], login_hint: str = "") -> dict:
        """Start auth code + PKCE. Redirect the browser to `flow["auth_uri"]`
        and keep the whole flow server-side (it holds the PKCE verifier),
        keyed by `flow["state"]`. The answer comes back as a form POST."""
        app = self._application()
        try:
            return app.initiate_auth_code_flow(
                list(scopes), redirect_uri=redirect_uri, login_hint=login_hint or None,
                response_mode=self.RESPONSE_MODE,
                # Always show the account picker: "Switch Account" must not
                # silently reuse the browser's current Microsoft session.
                prompt="select_account",
            )
        except ValueError as exc:
            raise ConnectorError(Diagnosis(
                "oauth_error", f"Could not start Grant Access: {exc}.",
                "This is a configuration problem in Intake; check the logs.")) from exc

    def complete_grant(self, flow: dict, params: dict) -> GrantResult:
        """Redeem the code posted back to the redirect URI. On success the
        signed-in account becomes the connection's account; any other account
        in the cache is removed (Switch Account replaces, never adds)."""
        app = self._application()
        try:
            result = self._call(app.acquire_token_by_auth_code_flow, flow, dict(params))
        except ValueError as exc:  # msal: state mismatch or a flow from elsewhere
            raise ConnectorError(Diagnosis(
                "oauth_state_mismatch",
                "The sign-in answer does not belong to this Grant Access request "
                "(it may come from an older tab or another browser).",
                "Click Grant Access again and finish the sign-in in the same browser tab.")) from exc
        if "error" in result:
            raise ConnectorError(self.diagnose(result, redirect_uri=flow.get("redirect_uri", ""), during="grant"))
        claims = result.get("id_token_claims") or {}
        username = claims.get("preferred_username") or claims.get("upn") or claims.get("email") or ""
        if not username:
            raise ConnectorError(Diagnosis(
                "oauth_error", "Microsoft signed the user in but did not say who it was (no user name in the ID token).",
                "Click Grant Access again; if it keeps happening, check the app's token configuration in Entra."))
        previous = self._account_username
        with self._lock:
            self._keep_only_account(app, username)
            self._account_username = username
        log.info("Grant Access completed for %s (tenant %s)", username, claims.get("tid", ""))
        return GrantResult(
            username=username, name=claims.get("name", ""), tenant_id=claims.get("tid", ""),
            object_id=claims.get("oid", ""), scopes=tuple((result.get("scope") or "").split()),
            expires_on=time.time() + int(result.get("expires_in") or 0),
            previous_username=previous if previous.lower() != username.lower() else "",
        )

    def remove_account(self) -> None:
        """Forget the signed-in account and its tokens (the connection goes
        back to "Grant Access")."""
        app = self._application()
        with self._lock:
            for account in self._call(app.get_accounts):
                app.remove_account(account)
            self._account_username = ""

    # -- tokens -----------------------------------------------------------
    def access_token(self, scopes: Iterable[str], *, force_refresh: bool = False) -> Token:
        """A valid token for `scopes`: from the cache, refreshed with the
        refresh token (delegated) or fetched with the app's credential
        (app-only). Never needs a user."""
        scopes = list(scopes)
        app = self._application()
        if self.app_only:
            result = self._app_only_token(app, scopes)
        else:
            result = self._delegated_token(app, scopes, force_refresh)
        if "access_token" not in result:
            raise ConnectorError(self.diagnose(result, during="refresh"))
        token = Token(result["access_token"], time.time() + int(result.get("expires_in") or 0), tuple(scopes),
                      result.get("token_type") or "Bearer")
        self.token_expires_on = token.expires_on
        return token

    def _app_only_token(self, app, scopes: list) -> dict:
        if not all(s.endswith("/.default") for s in scopes):
            raise ConnectorError(_grant_required())
        if not self.oauth.tenant_id.strip():
            raise ConnectorError(Diagnosis(
                "oauth_tenant_required", "Application (app-only) access needs the Directory (Tenant) ID "
                "of the mailbox's tenant.", "Enter the Directory (tenant) ID from the app's Overview page.",
                field="oauth_tenant_id"))
        return self._call(app.acquire_token_for_client, scopes)

    def _delegated_token(self, app, scopes: list, force_refresh: bool) -> dict:
        accounts = self._call(app.get_accounts, username=self._account_username)
        if not accounts:
            raise ConnectorError(_grant_expired(self._account_username, None, "no sign-in is stored for it"))
        result = self._call(app.acquire_token_silent_with_error, scopes, accounts[0], force_refresh=force_refresh)
        if result is None:  # no refresh token left in the cache
            raise ConnectorError(_grant_expired(self._account_username, None, "no refresh token is stored"))
        return result

    # -- msal plumbing ----------------------------------------------------
    def _application(self) -> msal.ConfidentialClientApplication:
        with self._lock:
            if self._app is None:
                self._app = self._build()
            return self._app

    def _build(self) -> msal.ConfidentialClientApplication:
        credential = self._credential()
        if self._http is None:
            self._http = session_for(self.settings)
        try:
            return msal.ConfidentialClientApplication(
                self.oauth.client_id.strip(), client_credential=credential, authority=self.authority,
                token_cache=self._cache, http_client=self._http, http_cache=HTTP_CACHE,
                instance_discovery=_instance_discovery(self.oauth.authority_host),
            )
        except requests.RequestException as exc:
            raise ConnectorError(self._network(exc)) from exc
        except (ValueError, MsalServiceError) as exc:
            raise ConnectorError(self._setup_failure(exc)) from exc

    def _credential(self):
        if self.oauth.client_auth == "certificate":
            if not (self.oauth.certificate_pem.strip() and self.oauth.private_key_pem.strip()):
                raise ConnectorError(Diagnosis(
                    "oauth_invalid_client", "No client certificate is stored for this connection.",
                    "Upload the certificate (with its private key) registered with the Entra app.",
                    field="oauth_certificate"))
            # public_certificate makes msal sign with PS256 and send the SHA-256
            # thumbprint (x5t#S256) and the chain (x5c), as Entra expects.
            return {"private_key": self.oauth.private_key_pem, "public_certificate": self.oauth.certificate_pem}
        if not self.oauth.client_secret.strip():
            raise ConnectorError(Diagnosis(
                "oauth_invalid_client", "No client secret is stored for this connection.",
                "Enter the client secret's Value (not its Secret ID) from the app's Certificates & secrets page.",
                field="oauth_client_secret"))
        return self.oauth.client_secret.strip()

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except requests.RequestException as exc:
            raise ConnectorError(self._network(exc)) from exc

    def _keep_only_account(self, app, username: str) -> None:
        for account in self._call(app.get_accounts):
            if (account.get("username") or "").lower() != username.lower():
                app.remove_account(account)

    # -- diagnosis --------------------------------------------------------
    def _network(self, exc: BaseException) -> Diagnosis:
        host = urlsplit(self.authority).hostname or self.authority
        d = diagnose_http(exc, self.settings, self.authority, what="the Microsoft sign-in service",
                          host_field="oauth_authority_host")
        if d is not None:
            return with_presented_certificate(d, self.settings, self.authority)
        return Diagnosis(
            "identity_unreachable", f"Could not talk to the Microsoft sign-in service at {host}.",
            "Check the Authority Host, this server's network and proxy settings, then try again.",
            field="oauth_authority_host")

    def _setup_failure(self, exc: BaseException) -> Diagnosis:
        """msal's constructor fetches the tenant's OpenID configuration; a
        400 there carries the real AADSTS error (unknown tenant...)."""
        text = " | ".join(str(e) for e in _chain(exc))
        embedded = _embedded_error(text)
        if embedded is not None:
            return self.diagnose(embedded, during="setup")
        if "should consist of an https url" in text or "invalid_instance" in text:
            return Diagnosis(
                "oauth_bad_authority", f"The Authority Host {self.oauth.authority_host!r} is not a valid sign-in address.",
                "Use https://login.microsoftonline.com, or your national cloud's host such as "
                "https://login.microsoftonline.us.", field="oauth_authority_host")
        return Diagnosis(
            "identity_unreachable",
            f"The Microsoft sign-in service did not return the configuration of tenant "
            f"{self.oauth.tenant_id or 'organizations'}.",
            "Check the Directory (Tenant) ID and the Authority Host, then try again.", field="oauth_tenant_id")

    def diagnose(self, result: dict, *, redirect_uri: str = "", during: str = "refresh") -> Diagnosis:
        """Turn an msal/Entra error response (or the error parameters posted
        back to the redirect URI) into a Diagnosis."""
        return diagnose_aad_error(result, settings=self.settings, account=self._account_username,
                                  redirect_uri=redirect_uri, during=during)


# -- AADSTS → Diagnosis -----------------------------------------------------------

_AADSTS_RE = re.compile(r"AADSTS(\d+)")


def aadsts_code(result: dict) -> Optional[int]:
    codes = result.get("error_codes") or []
    if codes:
        try:
            return int(codes[0])
        except (TypeError, ValueError):
            pass
    m = _AADSTS_RE.search(result.get("error_description") or "")
    return int(m.group(1)) if m else None


def diagnose_aad_error(result: dict, *, settings: Optional[ConnectionSettings] = None, account: str = "",
                       redirect_uri: str = "", during: str = "refresh") -> Diagnosis:
    """`result` is Entra's error JSON (error, error_description "AADSTSnnnn:
    …", error_codes, trace_id, correlation_id, timestamp), as msal returns it
    or as it arrives in the redirect's query/form. `during` is "setup",
    "grant" or "refresh"."""
    ctx = _Context(settings, account, redirect_uri, during)
    code = aadsts_code(result)
    builder = _DIAGNOSES.get(code) if code is not None else None
    if builder is None:
        builder = _BY_ERROR.get(result.get("error") or "", _generic)
    d = builder(ctx, result)
    extra = {k: result[k] for k in ("error", "trace_id", "correlation_id", "timestamp") if result.get(k)}
    if code is not None:
        extra["aadsts"] = code
    first_line = (result.get("error_description") or "").replace("\r\n", "\n").split("\n")[0].strip()
    if first_line:
        extra["entra_message"] = first_line[:1000]
    return Diagnosis(d.code, d.message, d.hint, field=d.field, extra={**extra, **d.extra})


@dataclass
class _Context:
    settings: Optional[ConnectionSettings]
    account: str
    redirect_uri: str
    during: str

    @property
    def oauth(self) -> Optional[OAuthSettings]:
        return self.settings.oauth if self.settings else None

    @property
    def client_id(self) -> str:
        return self.oauth.client_id if self.oauth else "this app"

    @property
    def tenant(self) -> str:
        return (self.oauth.tenant_id.strip() if self.oauth else "") or "organizations"


def _tag(result: dict) -> str:
    code = aadsts_code(result)
    return f" (AADSTS{code})" if code is not None else ""


def _grant_required() -> Diagnosis:
    return Diagnosis(
        "grant_expired", "No Office 365 account has been granted access for this connection yet. Grant Access first.",
        "Click Grant Access and sign in with the account that can read the mailbox.")


def _grant_expired(account: str, result: Optional[dict], why: str = "") -> Diagnosis:
    who = f" of {account}" if account else ""
    reason = why or "it expired or was revoked"
    tag = _tag(result) if result else ""
    return Diagnosis(
        "grant_expired",
        f"The Office 365 sign-in{who} is no longer valid: {reason}{tag}. Grant Access again to resume fetching mail.",
        "Click Grant Access (or Switch Account) and sign in again. This happens after a password change, "
        "when an admin revokes sessions, or after 90 days without use.")


def _invalid_secret(ctx: _Context, r: dict) -> Diagnosis:
    return Diagnosis(
        "oauth_invalid_client", f"Microsoft Entra ID rejected the client secret{_tag(r)}.",
        "Enter the secret's Value, not its Secret ID, from the app's Certificates & secrets page "
        "in the Microsoft Entra admin center. If the secret was deleted, create a new one.",
        field="oauth_client_secret")


def _secret_expired(ctx: _Context, r: dict) -> Diagnosis:
    return Diagnosis(
        "oauth_secret_expired", f"The client secret of the Entra app has expired{_tag(r)}.",
        "Create a new client secret on the app's Certificates & secrets page and enter its Value here.",
        field="oauth_client_secret")


def _no_credential(ctx: _Context, r: dict) -> Diagnosis:
    return Diagnosis(
        "oauth_invalid_client", f"Microsoft Entra ID expected a client secret or certificate and got none{_tag(r)}.",
        "Choose Client secret or Certificate and enter or upload it.", field="oauth_client_secret")


def _unknown_app(ctx: _Context, r: dict) -> Diagnosis:
    return Diagnosis(
        "oauth_unknown_app",
        f"Microsoft Entra ID has no application with client ID {ctx.client_id} in tenant {ctx.tenant}{_tag(r)}.",
        "Copy the Application (client) ID from the app's Overview page. Check the Directory (Tenant) ID too: "
        "the app must be registered in, or consented to by, the mailbox's tenant.",
        field="oauth_client_id")


def _app_disabled(ctx: _Context, r: dict) -> Diagnosis:
    return Diagnosis(
        "oauth_unknown_app", f"The Entra app {ctx.client_id} is disabled{_tag(r)}.",
        "Ask your Entra administrator to enable the app (Enterprise applications > Properties).", field="oauth_client_id")


def _tenant_not_found(ctx: _Context, r: dict) -> Diagnosis:
    host = ctx.oauth.authority_host if ctx.oauth else "the sign-in service"
    return Diagnosis(
        "oauth_tenant_not_found", f"Microsoft Entra ID has no tenant {ctx.tenant!r} at {host}{_tag(r)}.",
        "Copy the Directory (tenant) ID (a GUID) from the app's Overview page, or use the tenant's domain such as "
        "contoso.onmicrosoft.com. For a national cloud, check the Authority Host too.",
        field="oauth_tenant_id")


def _tenant_required(ctx: _Context, r: dict) -> Diagnosis:
    return Diagnosis(
        "oauth_tenant_required",
        f"Application (app-only) access needs the Directory (Tenant) ID of the mailbox's tenant{_tag(r)}.",
        "Enter the Directory (tenant) ID from the app's Overview page.", field="oauth_tenant_id")


def _not_multi_tenant(ctx: _Context, r: dict) -> Diagnosis:
    return Diagnosis(
        "oauth_not_multitenant",
        f"The Entra app {ctx.client_id} is single-tenant, but no Directory (Tenant) ID is set{_tag(r)}.",
        "Enter the Directory (tenant) ID, or make the app multi-tenant (Authentication > Supported account types).",
        field="oauth_tenant_id")


def _consent_required(ctx: _Context, r: dict) -> Diagnosis:
    return Diagnosis(
        "oauth_consent_required",
        f"The Entra app {ctx.client_id} has not been granted the permissions Intake asks for{_tag(r)}.",
        "In the Microsoft Entra admin center open the app's API permissions, add the permission "
        "(Mail.ReadWrite, Mail.ReadWrite.Shared, EWS.AccessAsUser.All or IMAP.AccessAsUser.All, as this "
        "connection needs), click Grant admin consent, then click Grant Access again.")


def _consent_declined(ctx: _Context, r: dict) -> Diagnosis:
    return Diagnosis(
        "oauth_consent_declined", f"The sign-in was cancelled: the permission request was declined{_tag(r)}.",
        "Click Grant Access again and accept the permissions, or ask an Entra administrator to grant admin consent.")


def _redirect_mismatch(ctx: _Context, r: dict) -> Diagnosis:
    uri = f" {ctx.redirect_uri}" if ctx.redirect_uri else ""
    return Diagnosis(
        "oauth_redirect_mismatch",
        f"The redirect URI{uri} is not registered for the Entra app {ctx.client_id}{_tag(r)}.",
        f"Add{uri or ' the redirect URI shown on this page'} as a Web redirect URI on the app's Authentication page "
        "(scheme, host, port and path must match exactly), then click Grant Access again.")


def _certificate_not_registered(ctx: _Context, r: dict) -> Diagnosis:
    thumb = certificate_thumbprint(ctx.oauth.certificate_pem) if ctx.oauth else ""
    which = f" (SHA-1 thumbprint {thumb})" if thumb else ""
    return Diagnosis(
        "oauth_certificate_not_registered",
        f"Microsoft Entra ID does not accept this connection's certificate{which} for app {ctx.client_id}{_tag(r)}.",
        "Upload the certificate's public part (.cer or .pem) on the app's Certificates & secrets > Certificates page, "
        "or upload here the certificate that is registered there.", field="oauth_certificate")


def _assertion_time(ctx: _Context, r: dict) -> Diagnosis:
    return Diagnosis(
        "oauth_clock_skew", f"Microsoft Entra ID says the certificate sign-in is outside its valid time{_tag(r)}.",
        "Check that this server's clock is correct (enable NTP), then try again.", field="oauth_certificate")


def _code_redeemed(ctx: _Context, r: dict) -> Diagnosis:
    return Diagnosis(
        "oauth_code_redeemed", f"This sign-in answer was already used{_tag(r)}.",
        "Click Grant Access again. (This happens when the sign-in page is submitted twice or reloaded.)")


def _grant_failed(ctx: _Context, r: dict) -> Diagnosis:
    return Diagnosis(
        "oauth_grant_failed", f"Microsoft Entra ID refused to complete the sign-in{_tag(r)}.",
        "Click Grant Access again and finish the sign-in in the same browser tab.")


def _expired_or_revoked(ctx: _Context, r: dict) -> Diagnosis:
    code = aadsts_code(r)
    why = {
        70008: "it expired",
        700082: "it expired after a long time without use",
        50173: "it was revoked (password change or an admin revoked the sessions)",
        50076: "the account now requires multi-factor authentication",
        50079: "the account now requires multi-factor authentication",
    }.get(code, "it expired or was revoked")
    if ctx.during == "grant":
        return Diagnosis("grant_expired", f"The sign-in took too long and expired{_tag(r)}. Grant Access again.",
                         "Click Grant Access and finish signing in within a few minutes.")
    return _grant_expired(ctx.account, r, why)


def _conditional_access(ctx: _Context, r: dict) -> Diagnosis:
    return Diagnosis(
        "oauth_conditional_access", f"A Conditional Access policy in your tenant blocked this sign-in{_tag(r)}.",
        "Ask your Entra administrator to allow this app (or this server's network location) in Conditional Access.")


def _generic(ctx: _Context, r: dict) -> Diagnosis:
    error = r.get("error") or "error"
    return Diagnosis(
        "oauth_error", f"Microsoft Entra ID refused the request: {error}{_tag(r)}.",
        "Check the app registration and the connection's OAuth settings. Microsoft's own message is shown "
        "in the details; the trace and correlation IDs identify the request for Microsoft support.")


def _invalid_client(ctx: _Context, r: dict) -> Diagnosis:
    if ctx.oauth is not None and ctx.oauth.client_auth == "certificate":
        return _certificate_not_registered(ctx, r)
    return _invalid_secret(ctx, r)


def _invalid_grant(ctx: _Context, r: dict) -> Diagnosis:
    if ctx.during == "grant":
        return _grant_failed(ctx, r)
    return _grant_expired(ctx.account, r)


_DIAGNOSES = {
    7000215: _invalid_secret,
    7000222: _secret_expired,
    7000218: _no_credential,
    700016: _unknown_app,
    7000112: _app_disabled,
    90002: _tenant_not_found,
    50059: _tenant_required,
    50194: _not_multi_tenant,
    65001: _consent_required,
    65004: _consent_declined,
    50011: _redirect_mismatch,
    500112: _redirect_mismatch,  # the token request's redirect_uri differs from the sign-in's
    700027: _certificate_not_registered,
    700024: _assertion_time,
    54005: _code_redeemed,
    501481: _grant_failed,  # PKCE verifier mismatch
    50148: _grant_failed,
    70008: _expired_or_revoked,
    700082: _expired_or_revoked,
    50173: _expired_or_revoked,
    50076: _expired_or_revoked,
    50079: _expired_or_revoked,
    53003: _conditional_access,
}
_BY_ERROR = {
    "invalid_client": _invalid_client,
    "unauthorized_client": _unknown_app,
    "invalid_grant": _invalid_grant,
    "consent_required": _consent_required,
    "interaction_required": _invalid_grant,
    "access_denied": _consent_declined,
}


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _embedded_error(text: str) -> Optional[dict]:
    """msal puts the discovery response's body in its ValueError text."""
    start = text.find("{")
    while start != -1:
        try:
            obj, _ = json.JSONDecoder().raw_decode(text[start:])
        except ValueError:
            start = text.find("{", start + 1)
            continue
        if isinstance(obj, dict) and "error" in obj:
            return obj
        start = text.find("{", start + 1)
    m = _AADSTS_RE.search(text)
    return {"error": "invalid_request", "error_codes": [int(m.group(1))]} if m else None


def _require_oauth(settings: ConnectionSettings) -> OAuthSettings:
    if settings.oauth is None or not settings.oauth.client_id.strip():
        raise ConnectorError(Diagnosis(
            "oauth_unknown_app", "No Application (Client) ID is set for this connection.",
            "Enter the Application (client) ID of your Microsoft Entra app.", field="oauth_client_id"))
    return settings.oauth


# -- exchangelib ------------------------------------------------------------------

_credentials_class = None


def ews_credentials(provider: TokenProvider, scopes: Sequence[str], identity=None):
    """exchangelib credentials that take their token from `provider` and ask
    it again when exchangelib finds the token expired (`refresh`).

    `identity` is for app-only impersonation only: exchangelib impersonates
    `credentials.identity` on *every* request when it is set, which breaks
    delegated access, so it must stay None there."""
    if identity is not None and not provider.app_only:
        raise ValueError("identity must stay None for delegated tokens (exchangelib would impersonate it)")
    return _provider_credentials_class()(provider, tuple(scopes), identity=identity)


def _provider_credentials_class():
    """Built on first use so that importing this module does not load
    exchangelib in workers that never talk EWS."""
    global _credentials_class
    if _credentials_class is None:
        from exchangelib.credentials import OAuth2AuthorizationCodeCredentials
        from oauthlib.oauth2 import OAuth2Token

        def oauth2_token(token: Token) -> OAuth2Token:
            return OAuth2Token({
                "access_token": token.access_token, "token_type": token.token_type,
                "expires_in": max(0, int(token.expires_on - time.time())), "expires_at": token.expires_on,
            })

        class ProviderCredentials(OAuth2AuthorizationCodeCredentials):
            # No client_id/secret on purpose: with them exchangelib refreshes by
            # itself against the hard-coded login.microsoftonline.com, bypassing
            # the connection's authority, proxy and trust.
            def __init__(self, provider: TokenProvider, scopes: tuple, identity=None):
                super().__init__(access_token=oauth2_token(provider.access_token(scopes)), identity=identity)
                # BaseCredentials.__hash__ hashes every attribute: keep them hashable.
                self.provider = provider
                self.scopes = tuple(scopes)

            def refresh(self, session=None):
                self.access_token = oauth2_token(self.provider.access_token(self.scopes))

            def __repr__(self):
                return f"{type(self).__name__}({self.provider.oauth.client_id!r}, [access_token])"

        _credentials_class = ProviderCredentials
    return _credentials_class

