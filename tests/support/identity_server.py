"""A local HTTPS stand-in for the Microsoft identity platform
(login.microsoftonline.com), faithful enough for msal and a browser.

Shaped on recorded Entra ID traffic (Azure SDK recordings, msal test data):
the v2.0 OpenID configuration, the sign-in page and its form_post answer,
the token endpoint with its checks and its error JSON (`error`,
`error_description` "AADSTSnnnn: …\\r\\nTrace ID: …", `error_codes`,
`timestamp`, `trace_id`, `correlation_id`, `error_uri`).

What it checks, like Entra does: the tenant exists; the app is registered
in it (or is multi-tenant); client secrets; certificate client assertions
(the JWT's signature against the registered certificate found by
`x5t#S256`/`x5t`); redirect URIs; PKCE S256; single-use, short-lived codes;
refresh tokens (revocable, expirable); consent; client credentials only with
`{resource}/.default`. Tokens are RS256 JWTs signed by this server, so the
Graph test server can validate them (`validate`).

Fixture `identity_server` (function scope, state reset per test):
    app = identity_server.register_app(secret="s3cret", redirect_uris=[...])
    identity_server.add_account("alice@contoso.example", "Alice")
    params = identity_server.sign_in(flow["auth_uri"], "alice@contoso.example")
    identity_server.revoke_refresh_tokens("alice@contoso.example")
    identity_server.authority_host, identity_server.tenant_id, identity_server.cert
"""
from __future__ import annotations

import base64
import datetime as dt
import hashlib
import html
import json
import secrets
import ssl
import threading
import time
import uuid
from dataclasses import dataclass, field
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

import jwt
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support.certs import CertPair, make_cert

OIDC_SCOPES = frozenset({"openid", "profile", "offline_access", "email"})
DEFAULT_RESOURCE = "https://graph.microsoft.com"  # bare scope names belong to Graph, as in Entra
DEFAULT_DELEGATED = frozenset({"Mail.ReadWrite", "Mail.ReadWrite.Shared", "Mail.Read", "User.Read",
                               "EWS.AccessAsUser.All", "IMAP.AccessAsUser.All"})
DEFAULT_APP_ROLES = frozenset({"Mail.ReadWrite", "full_access_as_app", "IMAP.AccessAsApp"})
_CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


# -- a threaded HTTPS server (also used by the Graph test server) -------------

class HttpsServer(ThreadingHTTPServer):
    """TLS is negotiated in the request's own thread, so a client that
    rejects our certificate (the "untrusted" tests) cannot stall the others."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, handler, cert: CertPair):
        super().__init__(("127.0.0.1", 0), handler)
        self.ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ssl_context.load_cert_chain(str(cert.cert_path), str(cert.key_path))

    def finish_request(self, request, client_address):
        try:
            request = self.ssl_context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return  # the client did not trust us: that is the point of some tests
        super().finish_request(request, client_address)

    def handle_error(self, request, client_address):
        pass  # broken pipes and resets from clients that gave up are not test failures

    def start(self) -> None:
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
                         name=type(self).__name__).start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    @property
    def port(self) -> int:
        return self.server_address[1]


class JsonHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the real services

    def log_message(self, *args):  # quiet
        pass

    def read_body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def send(self, status: int, body: bytes, content_type: str, headers: Optional[dict] = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_json(self, status: int, obj, headers: Optional[dict] = None,
                  content_type: str = "application/json; charset=utf-8") -> None:
        self.send(status, json.dumps(obj).encode(), content_type, headers)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# -- the directory ------------------------------------------------------------

@dataclass
class App:
    client_id: str
    tenant: str
    display_name: str
    secrets: set = field(default_factory=set)
    expired_secrets: set = field(default_factory=set)
    certificates: list = field(default_factory=list)  # x509.Certificate
    redirect_uris: list = field(default_factory=list)
    multi_tenant: bool = False
    delegated_permissions: set = field(default_factory=set)  # consented scope names
    app_permissions: set = field(default_factory=set)  # application roles with admin consent
    service_principal_id: str = field(default_factory=lambda: str(uuid.uuid4()))

    @property
    def secret(self) -> str:
        return next(iter(self.secrets), "")


@dataclass
class Account:
    username: str
    name: str
    tenant: str
    oid: str = field(default_factory=lambda: str(uuid.uuid4()))


@dataclass
class _Code:
    client_id: str
    redirect_uri: str
    scopes: list
    code_challenge: str
    code_challenge_method: str
    nonce: str
    username: str
    tenant: str
    issued_at: float
    used: bool = False


@dataclass
class _RefreshToken:
    client_id: str
    username: str
    issued_at: float
    revoked: bool = False
    expired: bool = False


class AuthorizePageError(AssertionError):
    """The sign-in page showed an error instead of answering the app (as
    Entra does for a wrong redirect URI or an unknown app)."""


class IdentityServer:
    """State and behaviour; `_IdentityHandler` does the HTTP."""

    def __init__(self, directory: Path):
        # Distinct subject names: OpenSSL finds a trusted self-signed certificate by
        # subject, so two test servers with the same name would shadow each other.
        self.cert = make_cert(directory, "identity", hostnames=("127.0.0.1", "localhost"),
                              common_name="Intake test identity platform")
        self._signing_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._kid = b64url(secrets.token_bytes(15))
        self._server = HttpsServer(_IdentityHandler, self.cert)
        self._server.identity = self
        self.authority_host = f"https://127.0.0.1:{self._server.port}"
        self._lock = threading.RLock()
        self.reset()

    # -- lifecycle --------------------------------------------------------
    def start(self) -> None:
        self._server.start()

    def stop(self) -> None:
        self._server.stop()

    def reset(self) -> None:
        with self._lock:
            self.tenant_id = str(uuid.uuid4())
            self.tenant_domain = "intake-test.onmicrosoft.com"
            self._tenants: dict[str, str] = {}  # id or domain (lower) -> tenant id
            self._add_tenant(self.tenant_id, self.tenant_domain)
            self.apps: dict[str, App] = {}
            self.accounts: dict[str, Account] = {}
            self._codes: dict[str, _Code] = {}
            self._refresh_tokens: dict[str, _RefreshToken] = {}
            self._pending: dict[str, dict] = {}
            self._issued: list[dict] = []
            self.token_requests: list[dict] = []  # grant_type, client_id, client_auth, tenant
            self.authorize_requests = 0
            self.access_token_lifetime = 3600  # seconds; lower it to make tokens expire
            self.code_lifetime = 600

    # -- directory helpers (the fixture API) ----------------------------
    def add_tenant(self, tenant_id: Optional[str] = None, domain: str = "") -> str:
        tenant_id = tenant_id or str(uuid.uuid4())
        with self._lock:
            self._add_tenant(tenant_id, domain)
        return tenant_id

    def _add_tenant(self, tenant_id: str, domain: str) -> None:
        self._tenants[tenant_id.lower()] = tenant_id
        if domain:
            self._tenants[domain.lower()] = tenant_id

    def register_app(self, client_id: Optional[str] = None, secret: Optional[str] = None,
                     certificate_pem: Optional[str | bytes] = None, redirect_uris: Optional[list] = None,
                     tenant: Optional[str] = None, *, multi_tenant: bool = False, display_name: str = "Intake",
                     delegated_permissions=DEFAULT_DELEGATED, app_permissions=DEFAULT_APP_ROLES) -> App:
        """An app registration. With neither `secret` nor `certificate_pem`
        a random secret is made (read it from `app.secret`)."""
        app = App(client_id=client_id or str(uuid.uuid4()), tenant=self._resolve(tenant) or self.tenant_id,
                  display_name=display_name, redirect_uris=list(redirect_uris or []), multi_tenant=multi_tenant,
                  delegated_permissions=set(delegated_permissions), app_permissions=set(app_permissions))
        if secret is not None or certificate_pem is None:
            app.secrets.add(secret if secret is not None else secrets.token_urlsafe(30))
        if certificate_pem is not None:
            self.add_certificate(app, certificate_pem)
        with self._lock:
            self.apps[app.client_id.lower()] = app
        return app

    def add_certificate(self, app: App, certificate_pem: str | bytes) -> None:
        pem = certificate_pem.encode() if isinstance(certificate_pem, str) else certificate_pem
        app.certificates.append(x509.load_pem_x509_certificate(pem))

    def expire_secret(self, app: App) -> None:
        app.expired_secrets |= app.secrets
        app.secrets = set()

    def add_account(self, username: str, name: str = "", tenant: Optional[str] = None) -> Account:
        account = Account(username=username, name=name or username.split("@")[0].title(),
                          tenant=self._resolve(tenant) or self.tenant_id)
        with self._lock:
            self.accounts[username.lower()] = account
        return account

    def revoke_refresh_tokens(self, username: Optional[str] = None) -> int:
        """Like "Revoke sessions" in Entra (or a password change): AADSTS50173."""
        return self._mark_refresh_tokens(username, revoked=True)

    def expire_refresh_tokens(self, username: Optional[str] = None) -> int:
        """Like 90 days without use: AADSTS700082."""
        return self._mark_refresh_tokens(username, expired=True)

    def _mark_refresh_tokens(self, username, **flags) -> int:
        n = 0
        with self._lock:
            for rt in self._refresh_tokens.values():
                if username is None or rt.username.lower() == username.lower():
                    for k, v in flags.items():
                        setattr(rt, k, v)
                    n += 1
        return n

    @property
    def issued_tokens(self) -> list[dict]:
        """Every access token issued: grant_type, client_id, username, aud,
        scp, roles, exp, access_token."""
        with self._lock:
            return list(self._issued)

    def authority(self, tenant: Optional[str] = None) -> str:
        return f"{self.authority_host}/{tenant or self.tenant_id}"

    # -- tokens -----------------------------------------------------------
    def validate(self, access_token: str, audience: str) -> Optional[dict]:
        return self.check_token(access_token, audience)[0]

    def check_token(self, access_token: str, audience: str) -> tuple[Optional[dict], str]:
        """(claims, "") or (None, why) in Microsoft's words."""
        if not access_token:
            return None, "Access token is empty."
        try:
            header = jwt.get_unverified_header(access_token)
        except jwt.PyJWTError:
            return None, "IDX14100: JWT is not well formed, there are no dots (.)."
        if header.get("kid") != self._kid:
            return None, "Access token validation failure. Invalid signature."
        try:
            claims = jwt.decode(access_token, self._signing_key.public_key(), algorithms=["RS256"],
                                audience=audience.rstrip("/"), options={"require": ["exp", "aud"]})
        except jwt.ExpiredSignatureError:
            return None, "Lifetime validation failed, the token is expired."
        except jwt.InvalidAudienceError:
            return None, "Access token validation failure. Invalid audience."
        except jwt.PyJWTError:
            return None, "Access token validation failure. Invalid signature."
        return claims, ""

    def _sign(self, claims: dict) -> str:
        return jwt.encode(claims, self._signing_key, algorithm="RS256", headers={"kid": self._kid, "typ": "JWT"})

    def jwks(self) -> dict:
        numbers = self._signing_key.public_key().public_numbers()
        as_bytes = lambda n: n.to_bytes((n.bit_length() + 7) // 8, "big")  # noqa: E731
        return {"keys": [{"kty": "RSA", "use": "sig", "kid": self._kid, "n": b64url(as_bytes(numbers.n)),
                          "e": b64url(as_bytes(numbers.e))}]}

    # -- the browser part, driven by requests ----------------------------
    def sign_in(self, auth_uri: str, username: str, *, accept: bool = True,
                session: Optional[requests.Session] = None) -> dict:
        """Do what a user does: open the sign-in page, enter the account,
        press Accept (or Cancel). Returns the parameters the page sends to
        the redirect URI (code, state, session_state; or error...). Raises
        AuthorizePageError when Entra would show an error page instead."""
        s = session or requests.Session()
        s.trust_env = False
        page = s.get(auth_uri, verify=str(self.cert.cert_path), allow_redirects=False)
        form = _parse_form(page.text)
        if form is None:
            raise AuthorizePageError(_page_text(page.text))
        fields = dict(form["fields"])
        fields["login"] = username
        fields["action"] = "accept" if accept else "cancel"
        action = form["action"] if form["action"].startswith("http") else self.authority_host + form["action"]
        answer = s.post(action, data=fields, verify=str(self.cert.cert_path), allow_redirects=False)
        return _callback_params(answer)

    # -- internals used by the handler -----------------------------------
    def _resolve(self, tenant: Optional[str]) -> Optional[str]:
        if not tenant:
            return None
        return self._tenants.get(tenant.lower())

    def _now(self) -> float:
        return time.time()


# -- HTTP -----------------------------------------------------------------------

class _IdentityHandler(JsonHandler):
    server_version = "Microsoft-IIS/10.0"

    @property
    def idp(self) -> IdentityServer:
        return self.server.identity

    def do_GET(self):
        parts = urlsplit(self.path)
        segs = [s for s in parts.path.split("/") if s]
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        if len(segs) == 4 and segs[1:] == ["v2.0", ".well-known", "openid-configuration"]:
            return self._openid_configuration(segs[0])
        if len(segs) == 4 and segs[1:] == ["discovery", "v2.0", "keys"]:
            return self.send_json(200, self.idp.jwks())
        if len(segs) == 4 and segs[1:] == ["oauth2", "v2.0", "authorize"]:
            return self._authorize_page(segs[0], query)
        if segs == ["common", "discovery", "instance"]:
            return self._instance_discovery(query)
        self.send_json(404, {"error": "not_found"})

    def do_POST(self):
        segs = [s for s in urlsplit(self.path).path.split("/") if s]
        form = {k: v[0] for k, v in parse_qs(self.read_body().decode(), keep_blank_values=True).items()}
        if len(segs) == 4 and segs[1:] == ["oauth2", "v2.0", "token"]:
            return self._token(segs[0], form)
        if len(segs) == 4 and segs[1:] == ["oauth2", "v2.0", "authorize"]:
            return self._authorize_submit(segs[0], form)
        self.send_json(404, {"error": "not_found"})

    # -- errors in Entra's shape ------------------------------------------
    def _error(self, status: int, error: str, code: int, message: str, *, error_uri: bool = True,
               extra: Optional[dict] = None) -> None:
        self.send_json(status, self._error_body(error, code, message, error_uri=error_uri, extra=extra),
                       headers={"Cache-Control": "no-store, no-cache", "Pragma": "no-cache",
                                "x-ms-request-id": str(uuid.uuid4())})

    def _error_body(self, error: str, code: int, message: str, *, error_uri: bool = True,
                    extra: Optional[dict] = None) -> dict:
        trace, correlation = str(uuid.uuid4()), str(uuid.uuid4())
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
        body = {
            "error": error,
            "error_description": f"AADSTS{code}: {message}\r\nTrace ID: {trace}\r\n"
                                 f"Correlation ID: {correlation}\r\nTimestamp: {stamp}",
            "error_codes": [code],
            "timestamp": stamp,
            "trace_id": trace,
            "correlation_id": correlation,
        }
        if error_uri:  # Entra leaves it out of some errors (54005 in the recordings)
            body["error_uri"] = f"{self.idp.authority_host}/error?code={code}"
        body.update(extra or {})
        return body

    def _tenant_not_found(self, tenant: str) -> None:
        self._error(400, "invalid_tenant" if self.command == "GET" else "invalid_request", 90002,
                    f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are "
                    "signing into the correct cloud. Check with your subscription administrator, this may happen "
                    "if there are no active subscriptions for the tenant.")

    # -- discovery --------------------------------------------------------
    def _openid_configuration(self, tenant: str) -> None:
        if tenant.lower() not in ("organizations", "common", "consumers") and not self.idp._resolve(tenant):
            return self._tenant_not_found(tenant)
        base = f"{self.idp.authority_host}/{tenant}"
        issuer_tenant = "{tenantid}" if tenant.lower() in ("organizations", "common") else self.idp._resolve(tenant) or tenant
        self.send_json(200, {
            "token_endpoint": f"{base}/oauth2/v2.0/token",
            "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
            "jwks_uri": f"{base}/discovery/v2.0/keys",
            "response_modes_supported": ["query", "fragment", "form_post"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "issuer": f"{self.idp.authority_host}/{issuer_tenant}/v2.0",
            "request_uri_parameter_supported": False,
            "userinfo_endpoint": "https://graph.microsoft.com/oidc/userinfo",
            "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
            "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
            "http_logout_supported": True,
            "frontchannel_logout_supported": True,
            "end_session_endpoint": f"{base}/oauth2/v2.0/logout",
            "claims_supported": ["sub", "iss", "cloud_instance_name", "cloud_instance_host_name",
                                 "cloud_graph_host_name", "msgraph_host", "aud", "exp", "iat", "auth_time",
                                 "acr", "nonce", "preferred_username", "name", "tid", "ver", "at_hash",
                                 "c_hash", "email"],
            "kerberos_endpoint": f"{base}/kerberos",
            "tenant_region_scope": "NA",
            "cloud_instance_name": "microsoftonline.com",
            "cloud_graph_host_name": "graph.windows.net",
            "msgraph_host": "graph.microsoft.com",
            "rbac_url": "https://pas.windows.net",
        }, headers={"Cache-Control": "max-age=86400, private"})

    def _instance_discovery(self, query: dict) -> None:
        host = urlsplit(self.idp.authority_host).netloc
        self.send_json(200, {
            "tenant_discovery_endpoint": f"{self.idp.authority_host}/common/v2.0/.well-known/openid-configuration",
            "api-version": query.get("api-version", "1.1"),
            "metadata": [{"preferred_network": host, "preferred_cache": host, "aliases": [host]}],
        })

    # -- authorize (the browser part) ----------------------------------
    def _app_for(self, tenant: str, client_id: str) -> tuple[Optional[App], Optional[tuple]]:
        """(app, None) or (None, (status, error, code, message))."""
        idp = self.idp
        generic = tenant.lower() in ("organizations", "common")
        if not generic and not idp._resolve(tenant):
            return None, (400, "invalid_request", 90002, f"Tenant '{tenant}' not found. Check to make sure you "
                          "have the correct tenant ID and are signing into the correct cloud.")
        app = idp.apps.get(client_id.lower())
        directory = tenant if generic else idp._resolve(tenant)
        if app is None or (not generic and not app.multi_tenant and app.tenant != directory):
            return None, (400, "unauthorized_client", 700016,
                          f"Application with identifier '{client_id}' was not found in the directory "
                          f"'{tenant}'. This can happen if the application has not been installed by the "
                          "administrator of the tenant or consented to by any user in the tenant. You may have "
                          "sent your authentication request to the wrong tenant.")
        if generic and not app.multi_tenant:
            return None, (400, "invalid_request", 50194,
                          f"Application '{client_id}'({app.display_name}) is not configured as a multi-tenant "
                          "application. Usage of the /common endpoint is not supported for such applications "
                          "created after '10/15/2018'. Use a tenant-specific endpoint or configure the "
                          "application to be multi-tenant.")
        return app, None

    def _authorize_page(self, tenant: str, q: dict) -> None:
        idp = self.idp
        with idp._lock:
            idp.authorize_requests += 1
        app, err = self._app_for(tenant, q.get("client_id", ""))
        if err:
            return self._error_page(err[2], err[3])
        redirect_uri = q.get("redirect_uri", "")
        if redirect_uri not in app.redirect_uris:
            return self._error_page(50011, f"The redirect URI '{redirect_uri}' specified in the request does not "
                                    f"match the redirect URIs configured for the application '{app.client_id}'. "
                                    "Make sure the redirect URI sent in the request matches one added to your "
                                    "application in the Azure portal. Navigate to https://aka.ms/redirectUriMismatchError "
                                    "to learn more about how to fix this.")
        if q.get("response_type") != "code":
            return self._error_page(900144, "The request body must contain the following parameter: 'response_type'.")
        ctx = secrets.token_urlsafe(24)
        q = dict(q, tenant=tenant)
        with idp._lock:
            idp._pending[ctx] = q
        self._sign_in_form(ctx, app, q, error="")

    def _sign_in_form(self, ctx: str, app: App, q: dict, error: str) -> None:
        e = html.escape
        scopes = [s for s in q.get("scope", "").split() if s not in OIDC_SCOPES]
        items = "".join(f"<li>{e(s.rsplit('/', 1)[-1])}</li>" for s in scopes)
        alert = f'<p role="alert" id="error">{e(error)}</p>' if error else ""
        page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Sign in to your account</title></head>
<body>
<main>
<h1>Sign in</h1>
<p><strong>{e(app.display_name)}</strong> wants to:</p>
<ul id="permissions">{items}<li>Maintain access to data you have given it access to</li></ul>
{alert}
<form method="post" action="/{e(q.get('tenant', ''))}/oauth2/v2.0/authorize" id="signin">
<input type="hidden" name="ctx" value="{e(ctx)}">
<label for="login">Account (email address)</label>
<input type="email" id="login" name="login" autocomplete="username" required value="{e(q.get('login_hint', ''))}">
<button type="submit" name="action" value="accept" id="accept">Accept</button>
<button type="submit" name="action" value="cancel" id="cancel" formnovalidate>Cancel</button>
</form>
</main>
</body></html>"""
        self.send(200, page.encode(), "text/html; charset=utf-8", {"Cache-Control": "no-store, no-cache"})

    def _error_page(self, code: Optional[int], message: str) -> None:
        e = html.escape
        prefix = f"AADSTS{code}: " if code is not None else ""
        page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Sign in to your account</title></head>
<body><main><h1>Sorry, but we're having trouble signing you in.</h1>
<p id="error">{prefix}{e(message)}</p></main></body></html>"""
        self.send(200, page.encode(), "text/html; charset=utf-8")

    def _authorize_submit(self, tenant: str, form: dict) -> None:
        idp = self.idp
        with idp._lock:
            q = idp._pending.get(form.get("ctx", ""))
        if q is None:
            return self._error_page(None, "This sign-in page has expired. Start the sign-in again.")
        app, err = self._app_for(q["tenant"], q.get("client_id", ""))
        if err:
            return self._error_page(err[2], err[3])
        if form.get("action") == "cancel":
            return self._answer(q, {"error": "access_denied", "error_description":
                                    "AADSTS65004: User declined to consent to access the app."})
        account = idp.accounts.get(form.get("login", "").strip().lower())
        directory = idp._resolve(q["tenant"])
        if account is None or (directory and account.tenant != directory):
            where = directory or q["tenant"]
            return self._sign_in_form(form["ctx"], app, q, error=(
                f"AADSTS50034: The user account {form.get('login', '')} does not exist in the {where} directory. "
                "To sign into this application, the account must be added to the directory."))
        missing = [s for s in _resource_scopes(q.get("scope", "")) if s[1] not in app.delegated_permissions]
        if missing:
            body = self._error_body("consent_required", 65001, _consent_message(app), error_uri=False)
            return self._answer(q, {"error": body["error"], "error_description": body["error_description"],
                                    "error_uri": f"{idp.authority_host}/error?code=65001"})
        code = "0.A" + secrets.token_urlsafe(64)
        with idp._lock:
            idp._pending.pop(form["ctx"], None)
            idp._codes[code] = _Code(
                client_id=app.client_id, redirect_uri=q["redirect_uri"], scopes=q.get("scope", "").split(),
                code_challenge=q.get("code_challenge", ""), code_challenge_method=q.get("code_challenge_method", ""),
                nonce=q.get("nonce", ""), username=account.username, tenant=account.tenant, issued_at=idp._now())
        self._answer(q, {"code": code, "session_state": str(uuid.uuid4())})

    def _answer(self, q: dict, params: dict) -> None:
        """Send the browser back to the app: an auto-submitting form for
        form_post (what Entra does), a 302 for query and fragment."""
        if q.get("state"):
            params = dict(params, state=q["state"])
        mode = q.get("response_mode", "query")
        if mode == "form_post":
            e = html.escape
            inputs = "".join(f'<input type="hidden" name="{e(k)}" value="{e(v)}" />' for k, v in params.items())
            page = (f'<html><head><title>Working...</title></head><body><form method="POST" name="hiddenform" '
                    f'action="{e(q["redirect_uri"])}">{inputs}<noscript><p>Script is disabled. Click Submit to '
                    'continue.</p><input type="submit" value="Submit" /></noscript></form>'
                    '<script language="javascript">document.forms[0].submit();</script></body></html>')
            return self.send(200, page.encode(), "text/html; charset=utf-8", {"Cache-Control": "no-store, no-cache"})
        sep = "#" if mode == "fragment" else ("&" if "?" in q["redirect_uri"] else "?")
        self.send(302, b"", "text/html", {"Location": q["redirect_uri"] + sep + urlencode(params)})

    # -- the token endpoint ---------------------------------------------
    def _token(self, tenant: str, form: dict) -> None:
        idp = self.idp
        generic = tenant.lower() in ("organizations", "common")
        if not generic and not idp._resolve(tenant):
            return self._tenant_not_found(tenant)
        client_id = form.get("client_id") or self._basic_auth()[0]
        if not client_id:
            return self._error(400, "invalid_request", 900144,
                               "The request body must contain the following parameter: 'client_id'.")
        app, err = self._app_for(tenant, client_id)
        if err:
            return self._error(err[0], err[1], err[2], err[3])
        method = self._authenticate(app, tenant, form)
        if method is None:
            return  # the error was sent
        grant_type = form.get("grant_type", "")
        with idp._lock:
            idp.token_requests.append({"grant_type": grant_type, "client_id": app.client_id,
                                       "client_auth": method, "tenant": tenant})
        if grant_type == "client_credentials":
            return self._client_credentials(app, tenant, form)
        if grant_type == "authorization_code":
            return self._authorization_code(app, form)
        if grant_type == "refresh_token":
            return self._refresh(app, form)
        self._error(400, "unsupported_grant_type", 70003, "The app requested an unsupported grant type "
                    f"'{grant_type}'.")

    def _basic_auth(self) -> tuple[str, str]:
        header = self.headers.get("Authorization") or ""
        if not header.lower().startswith("basic "):
            return "", ""
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except ValueError:
            return "", ""
        return unquote(user), unquote(password)

    def _authenticate(self, app: App, tenant: str, form: dict) -> Optional[str]:
        """"client_secret" / "private_key_jwt", or None after sending the error."""
        if form.get("client_assertion"):
            if form.get("client_assertion_type") != _CLIENT_ASSERTION_TYPE:
                self._error(400, "invalid_request", 50027, "JWT token is invalid or malformed.")
                return None
            return "private_key_jwt" if self._check_assertion(app, form["client_assertion"]) else None
        secret = form.get("client_secret") or self._basic_auth()[1]
        if not secret:
            self._error(401, "invalid_client", 7000218, "The request body must contain the following parameter: "
                        "'client_assertion' or 'client_secret'.")
            return None
        if secret in app.secrets:
            return "client_secret"
        if secret in app.expired_secrets:
            self._error(401, "invalid_client", 7000222, f"The provided client secret keys for app "
                        f"'{app.client_id}' are expired. Visit the Azure portal to create new keys for your app: "
                        "https://aka.ms/NewClientSecret, or consider using certificate credentials for added "
                        "security: https://aka.ms/certCreds.")
            return None
        self._error(401, "invalid_client", 7000215, "Invalid client secret is provided.")
        return None

    def _check_assertion(self, app: App, assertion: str) -> bool:
        try:
            header = jwt.get_unverified_header(assertion)
        except jwt.PyJWTError:
            self._error(400, "invalid_request", 50027, "JWT token is invalid or malformed.")
            return False
        cert, used = self._registered_certificate(app, header)
        if cert is None:
            self._error(401, "invalid_client", 700027, (
                "Client assertion contains an invalid signature. [Reason - The key was not found., Thumbprint of "
                f"key used by client: '{used}', Please visit the Azure Portal, Graph Explorer or directly use MS "
                f"Graph to see configured keys for app Id '{app.client_id}'.]"))
            return False
        try:
            claims = jwt.decode(assertion, cert.public_key(), algorithms=["PS256", "RS256"],
                                options={"verify_aud": False, "require": ["exp", "iss", "sub", "aud"]})
        except jwt.ExpiredSignatureError:
            self._error(401, "invalid_client", 700024, "Client assertion is not within its valid time range.")
            return False
        except jwt.PyJWTError:
            self._error(401, "invalid_client", 700027, (
                "Client assertion contains an invalid signature. [Reason - The provided signature value did not "
                f"match the expected signature value., Thumbprint of key used by client: '{used}']"))
            return False
        if claims.get("iss") != app.client_id or claims.get("sub") != app.client_id:
            self._error(401, "invalid_client", 700023, "Client assertion audience claim does not match Realm issuer.")
            return False
        audience = urlsplit(str(claims.get("aud")))
        if f"{audience.scheme}://{audience.netloc}" != self.idp.authority_host or \
                not audience.path.endswith("/oauth2/v2.0/token"):
            self._error(401, "invalid_client", 700021, "Client assertion audience claim does not match the token "
                        "endpoint.")
            return False
        return True

    def _registered_certificate(self, app: App, header: dict):
        """Find the certificate as Entra does: by thumbprint from the JWT
        header (x5t#S256 first, then the SHA-1 x5t). x5c is ignored: only
        registered certificates count."""
        # msal pads its base64url thumbprints; RFC 7515 says unpadded: accept both.
        want256, want1 = (str(header.get(k) or "").rstrip("=") for k in ("x5t#S256", "x5t"))
        for cert in app.certificates:
            if want256 and b64url(cert.fingerprint(hashes.SHA256())) == want256:
                return cert, want256
            if want1 and b64url(cert.fingerprint(hashes.SHA1())) == want1:
                return cert, want1
        used = want256 or want1 or ""
        try:
            used = base64.urlsafe_b64decode(used + "=" * (-len(used) % 4)).hex().upper()
        except ValueError:
            pass
        return None, used

    # -- grants ----------------------------------------------------------
    def _client_credentials(self, app: App, tenant: str, form: dict) -> None:
        scopes = form.get("scope", "").split()
        if tenant.lower() in ("organizations", "common"):
            return self._error(400, "invalid_request", 50059, "No tenant-identifying information found in "
                               "either the request or implied by any provided credentials.")
        if len(scopes) != 1 or not scopes[0].endswith("/.default"):
            return self._error(400, "invalid_scope", 1002012, f"The provided value for scope {' '.join(scopes)} "
                               "is not valid. Client credential flows must have a scope value with /.default "
                               "suffixed to the resource identifier (application ID URI).")
        resource = scopes[0][: -len("/.default")]
        tid = self.idp._resolve(tenant)
        claims = {"aud": resource, "iss": f"https://sts.windows.net/{tid}/", "appid": app.client_id,
                  "tid": tid, "oid": app.service_principal_id, "sub": app.service_principal_id,
                  "idtyp": "app", "ver": "1.0"}
        if app.app_permissions:
            claims["roles"] = sorted(app.app_permissions)
        token, lifetime = self._access_token(claims, "client_credentials", app.client_id, "")
        self.send_json(200, {"token_type": "Bearer", "expires_in": lifetime, "ext_expires_in": lifetime,
                             "access_token": token}, headers={"Cache-Control": "no-store, no-cache"})

    def _authorization_code(self, app: App, form: dict) -> None:
        idp = self.idp
        with idp._lock:
            grant = idp._codes.get(form.get("code", ""))
            first_use = grant is not None and not grant.used
            if grant is not None:
                grant.used = True  # single use, even when the redemption fails below
        if grant is None or grant.client_id != app.client_id:
            return self._error(400, "invalid_grant", 9002313, "Invalid request. Request is malformed or invalid.")
        if not first_use:
            return self._error(400, "invalid_grant", 54005, "OAuth2 Authorization code was already redeemed, "
                               "please retry with a new valid code or use an existing refresh token.",
                               error_uri=False)
        if idp._now() - grant.issued_at > idp.code_lifetime:
            return self._error(400, "invalid_grant", 70008, "The provided authorization code or refresh token has "
                               "expired due to inactivity. Send a new interactive authorization request for this "
                               "user and resource.")
        if form.get("redirect_uri") != grant.redirect_uri:
            return self._error(400, "invalid_grant", 500112, f"The reply address '{form.get('redirect_uri')}' "
                               f"does not match the reply address '{grant.redirect_uri}' provided when requesting "
                               "Authorization code.")
        if grant.code_challenge:
            verifier = form.get("code_verifier", "")
            if not verifier:
                return self._error(400, "invalid_grant", 50148, "The code_verifier does not match the "
                                   "code_challenge supplied in the authorization request for PKCE.")
            derived = verifier if grant.code_challenge_method.lower() == "plain" else \
                b64url(hashlib.sha256(verifier.encode()).digest())
            if derived != grant.code_challenge:
                return self._error(400, "invalid_grant", 501481, "The Code_Verifier does not match the "
                                   "code_challenge supplied in the authorization request.")
        scopes = form.get("scope", "").split() or grant.scopes
        self._user_tokens(app, idp.accounts[grant.username.lower()], scopes, "authorization_code", grant.nonce)

    def _refresh(self, app: App, form: dict) -> None:
        idp = self.idp
        with idp._lock:
            rt = idp._refresh_tokens.get(form.get("refresh_token", ""))
        if rt is None or rt.client_id != app.client_id:
            return self._error(400, "invalid_grant", 9002313, "Invalid request. Request is malformed or invalid.")
        issued = dt.datetime.fromtimestamp(rt.issued_at, dt.timezone.utc).strftime("%m/%d/%Y %H:%M:%S")
        if rt.revoked:
            now = dt.datetime.now(dt.timezone.utc).strftime("%m/%d/%Y %H:%M:%S")
            return self._error(400, "invalid_grant", 50173, "The provided grant has expired due to it being "
                               "revoked, a fresh auth token is needed. The user might have changed or reset their "
                               f"password. The grant was issued on '{issued}' and the TokensValidFrom date (before "
                               f"which tokens are not valid) for this user is '{now}'.")
        if rt.expired:
            return self._error(400, "invalid_grant", 700082, f"The refresh token has expired due to inactivity. "
                               f"The token was issued on {issued} and was inactive for 90.00:00:00.")
        scopes = form.get("scope", "").split()
        missing = [s for s in _resource_scopes(" ".join(scopes)) if s[1] not in app.delegated_permissions]
        if missing:
            return self._error(400, "invalid_grant", 65001, _consent_message(app),
                               extra={"suberror": "consent_required"})
        self._user_tokens(app, idp.accounts[rt.username.lower()], scopes, "refresh_token", "")

    def _user_tokens(self, app: App, account: Account, scopes: list, grant_type: str, nonce: str) -> None:
        idp = self.idp
        resources = {r for r, _ in _resource_scopes(" ".join(scopes))}
        if len(resources) > 1:
            return self._error(400, "invalid_scope", 28000, "Provided value for the input parameter scope is not "
                               "valid because it contains more than one resource. Scope "
                               f"{' '.join(scopes)} is not valid.")
        resource = next(iter(resources), DEFAULT_RESOURCE)
        names = sorted({n for _, n in _resource_scopes(" ".join(scopes))}) or ["User.Read"]
        claims = {"aud": resource, "iss": f"https://sts.windows.net/{account.tenant}/", "appid": app.client_id,
                  "tid": account.tenant, "oid": account.oid, "sub": account.oid, "upn": account.username,
                  "unique_name": account.username, "name": account.name, "scp": " ".join(names), "ver": "1.0"}
        token, lifetime = self._access_token(claims, grant_type, app.client_id, account.username)
        refresh = "1.A" + secrets.token_urlsafe(96)
        with idp._lock:
            idp._refresh_tokens[refresh] = _RefreshToken(app.client_id, account.username, idp._now())
        now = int(idp._now())
        id_claims = {"aud": app.client_id, "iss": f"{idp.authority_host}/{account.tenant}/v2.0", "iat": now,
                     "nbf": now, "exp": now + 3600, "name": account.name, "oid": account.oid,
                     "preferred_username": account.username, "sub": b64url(hashlib.sha256(
                         (account.oid + app.client_id).encode()).digest()), "tid": account.tenant,
                     "uti": b64url(secrets.token_bytes(16)), "ver": "2.0"}
        if nonce:
            id_claims["nonce"] = nonce
        granted = [f"{resource}/{n}" for n in names] + [s for s in scopes if s in OIDC_SCOPES]
        self.send_json(200, {
            "token_type": "Bearer", "scope": " ".join(granted), "expires_in": lifetime,
            "ext_expires_in": lifetime, "access_token": token, "refresh_token": refresh,
            "id_token": idp._sign(id_claims),
            "client_info": b64url(json.dumps({"uid": account.oid, "utid": account.tenant}).encode()),
        }, headers={"Cache-Control": "no-store, no-cache"})

    def _access_token(self, claims: dict, grant_type: str, client_id: str, username: str) -> tuple[str, int]:
        idp = self.idp
        now = int(idp._now())
        lifetime = int(idp.access_token_lifetime)
        claims = dict(claims, iat=now, nbf=now, exp=now + lifetime, uti=b64url(secrets.token_bytes(16)))
        token = idp._sign(claims)
        with idp._lock:
            idp._issued.append({"grant_type": grant_type, "client_id": client_id, "username": username,
                                "aud": claims["aud"], "scp": claims.get("scp", ""), "roles": claims.get("roles", []),
                                "exp": claims["exp"], "access_token": token})
        return token, lifetime


def _resource_scopes(scope: str) -> list[tuple[str, str]]:
    """[(resource, permission)] for the non-OIDC scopes; bare names are Graph's."""
    out = []
    for s in scope.split():
        if s in OIDC_SCOPES:
            continue
        if "/" in s and s.startswith(("http://", "https://")) or s.startswith("api://"):
            resource, _, name = s.rpartition("/")
            out.append((resource.rstrip("/"), name))
        else:
            out.append((DEFAULT_RESOURCE, s))
    return out


def _consent_message(app: App) -> str:
    return (f"The user or administrator has not consented to use the application with ID '{app.client_id}' named "
            f"'{app.display_name}'. Send an interactive authorization request for this user and resource.")


# -- reading pages like a browser would --------------------------------------

class _FormParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.forms: list[dict] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form":
            self.forms.append({"action": a.get("action", ""), "method": a.get("method", "get"), "fields": {}})
        elif tag == "input" and self.forms and a.get("name") and a.get("type") != "submit":
            self.forms[-1]["fields"][a["name"]] = a.get("value", "")

    def handle_data(self, data):
        if data.strip():
            self.text.append(data.strip())


def _parse_form(page: str) -> Optional[dict]:
    p = _FormParser()
    p.feed(page)
    return p.forms[0] if p.forms else None


def _page_text(page: str) -> str:
    p = _FormParser()
    p.feed(page)
    return " ".join(p.text)


def _callback_params(answer: requests.Response) -> dict:
    if answer.is_redirect:
        location = urlsplit(answer.headers["Location"])
        raw = location.fragment or location.query
        return {k: v[0] for k, v in parse_qs(raw).items()}
    form = _parse_form(answer.text)
    if form is None or "code" not in form["fields"] and "error" not in form["fields"]:
        raise AuthorizePageError(_page_text(answer.text))
    if form["fields"].get("login") is not None:  # the sign-in page again, with an error on it
        raise AuthorizePageError(_page_text(answer.text))
    return dict(form["fields"])


# -- pytest plugin ------------------------------------------------------------

@pytest.fixture(scope="session")
def _identity_platform(tmp_path_factory):
    server = IdentityServer(tmp_path_factory.mktemp("identity"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def identity_server(_identity_platform) -> IdentityServer:
    """The identity platform with an empty directory (one tenant,
    `identity_server.tenant_id`; a new GUID every test)."""
    _identity_platform.reset()
    return _identity_platform

