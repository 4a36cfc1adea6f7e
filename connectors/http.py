"""One `requests.Session` per connection: its own trust, proxy and timeouts.

Everything HTTP a connection does (EWS, the identity platform, Graph) goes
through `session_for(settings)`, so an uploaded server or proxy certificate
and the connection's proxy apply everywhere and nowhere else. The environment
(`REQUESTS_CA_BUNDLE`, `HTTPS_PROXY`, ...) is ignored on purpose: a
connection's own settings must win (`trust_env = False`).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import re
import ssl
import tempfile
from pathlib import Path
from typing import Optional
from urllib.parse import quote, urlsplit

import certifi
import requests

from .base import ConnectionSettings, ProxySettings
from .errors import Diagnosis, diagnose_certificate, diagnose_network, exception_chain, find

_BUNDLE_DIR = Path(tempfile.gettempdir()) / f"intake-ca-{os.getuid()}"


def ca_bundle(*extra_pems: str) -> str | bool:
    """A CA file for requests: the public roots plus this connection's uploaded
    certificates. requests wants a file path, and reading only the uploaded
    file would drop the public roots (a TLS-inspecting proxy in front of a
    public service needs both). Files are content-addressed, so identical
    settings share one file and different connections never share trust."""
    extra = "\n".join(p.strip() for p in extra_pems if p and p.strip())
    if not extra:
        return True  # the public roots (certifi), never the environment
    digest = hashlib.sha256(extra.encode()).hexdigest()[:32]
    path = _BUNDLE_DIR / f"{digest}.pem"
    if not path.exists():
        _BUNDLE_DIR.mkdir(mode=0o700, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(Path(certifi.where()).read_text() + "\n" + extra + "\n")
        tmp.replace(path)
    return str(path)


def proxy_url(proxy: ProxySettings) -> str:
    auth = ""
    if proxy.username:
        auth = quote(proxy.username, safe="")
        if proxy.password:
            auth += ":" + quote(proxy.password, safe="")
        auth += "@"
    host = f"[{proxy.host}]" if ":" in proxy.host else proxy.host
    return f"{proxy.protocol}://{auth}{host}:{proxy.port}"


def proxies_for(settings: ConnectionSettings) -> dict:
    if settings.proxy is None:
        # An explicit empty mapping is not enough: requests merges env proxies
        # unless trust_env is off, which session_for() does.
        return {}
    u = proxy_url(settings.proxy)
    return {"http": u, "https": u}


def verify_for(settings: ConnectionSettings) -> str | bool:
    proxy_pem = settings.proxy.certificate_pem if settings.proxy else ""
    return ca_bundle(settings.trusted_cert_pem, proxy_pem)


def session_for(settings: ConnectionSettings) -> requests.Session:
    s = requests.Session()
    s.trust_env = False
    s.verify = verify_for(settings)
    s.proxies = proxies_for(settings)
    s.request = functools.partial(s.request, timeout=(settings.connect_timeout, settings.read_timeout))
    return s


def diagnose_http(exc: BaseException, settings: ConnectionSettings, url: str, *,
                  what: str = "the server", host_field: str = "endpoint") -> Optional[Diagnosis]:
    """Proxy failures first (they hide behind every other error), then the
    shared network/TLS classification for the target host."""
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    proxy = settings.proxy
    if proxy is not None:
        d = _diagnose_proxy(exc, proxy, target=f"{what} ({host}:{port})")
        if d is not None:
            return d
    d = diagnose_network(exc, host, port, what=what, host_field=host_field, port_field=host_field)
    if d is not None and proxy is not None and d.code == "connection_lost":
        # A plain-HTTP CONNECT sent to an HTTPS proxy port looks exactly like this.
        d = dataclasses.replace(d, hint=d.hint + " With a proxy, also check the Proxy Protocol "
                                "(HTTP or HTTPS) and the Proxy Port.")
    return d


def with_presented_certificate(d: Optional[Diagnosis], settings: ConnectionSettings, url: str) -> Optional[Diagnosis]:
    """An untrusted server certificate, with the certificate the server
    presented (read through the connection's proxy, if any), so the page can
    show it and offer the "Certificate file" upload."""
    if d is None or d.code != "untrusted_certificate" or d.certificate is not None:
        return d
    from .tls import probe_certificate

    parts = urlsplit(url)
    try:
        cert = probe_certificate(parts.hostname or "", parts.port or 443, proxy=settings.proxy,
                                 timeout=min(settings.connect_timeout, 10))
    except (OSError, ValueError):
        return d  # the diagnosis still says what is wrong; only the details are missing
    return dataclasses.replace(d, certificate=cert)


# urllib3 reports a refused CONNECT as "Tunnel connection failed: 407 Proxy
# Authentication Required". Only that phrase carries the proxy's status: a
# looser pattern picks up digits from "127.0.0.1" or "(_ssl.c:1006)".
_TUNNEL_STATUS_RE = re.compile(r"Tunnel connection failed: (\d{3})(?: ([^'\")|]*))?")
# Statuses with which a working proxy says it could not reach the server.
_PROXY_UPSTREAM_FAILED = {502, 503, 504}


def _tunnel_status(exc: BaseException) -> tuple[Optional[int], str]:
    text = " | ".join(str(e) for e in exception_chain(exc))
    m = _TUNNEL_STATUS_RE.search(text)
    if m:
        return int(m.group(1)), (m.group(2) or "").strip()
    if "407 Proxy Authentication Required" in text:  # a plain-HTTP request answered by the proxy
        return 407, "Proxy Authentication Required"
    return None, ""


def _diagnose_proxy(exc: BaseException, proxy: ProxySettings, target: str = "the server") -> Optional[Diagnosis]:
    """None when the failure happened past the proxy (the tunnel worked)."""
    where = f"{proxy.host}:{proxy.port}"
    status, reason = _tunnel_status(exc)
    if status == 407:
        return _proxy_auth(proxy, where)
    if status is not None:
        return _proxy_status(status, reason, where, target)
    if find(exc, requests.exceptions.ProxyError) is None:
        return None
    # From here on urllib3 failed before the tunnel was up: it is the proxy's fault.
    if proxy.protocol == "https":
        d = _proxy_tls(exc, proxy, where)
        if d is not None:
            return d
    net = diagnose_network(exc, proxy.host, proxy.port, what="the proxy",
                           host_field="proxy_host", port_field="proxy_port")
    if net is not None and net.code not in ("tls_handshake", "connection_lost"):
        return Diagnosis("proxy_unreachable", net.message,
                         net.hint + " These are the Proxy Host Name and Proxy Port settings.", field=net.field)
    return Diagnosis(
        "proxy_unreachable",
        f"Could not talk to the proxy at {where}.",
        "Check the Proxy Protocol (HTTP or HTTPS), Proxy Host Name and Proxy Port.",
        field="proxy_host",
    )


def _proxy_auth(proxy: ProxySettings, where: str) -> Diagnosis:
    if proxy.username:
        return Diagnosis(
            "proxy_auth_failed",
            f"The proxy at {where} rejected the user name or password (HTTP 407 Proxy Authentication Required).",
            "Check the Proxy User name and Proxy Password. Only Basic proxy authentication is supported.",
            field="proxy_password",
        )
    return Diagnosis(
        "proxy_auth_required",
        f"The proxy at {where} requires authentication (HTTP 407 Proxy Authentication Required).",
        "Enter the Proxy User name and Proxy Password.",
        field="proxy_username",
    )


def _proxy_status(status: int, reason: str, where: str, target: str) -> Diagnosis:
    said = f"HTTP {status} {reason}".strip()
    if status in _PROXY_UPSTREAM_FAILED:
        return Diagnosis(
            "proxy_refused",
            f"The proxy at {where} could not connect to {target} ({said}).",
            "Check the server address and port. If they are right, ask the proxy's administrator "
            "whether the proxy can reach that server.",
            field="proxy_host",
        )
    return Diagnosis(
        "proxy_refused",
        f"The proxy at {where} refused to open a tunnel to {target} ({said}).",
        "Ask the proxy's administrator to allow connections to this server and port.",
        field="proxy_host",
    )


def _proxy_tls(exc: BaseException, proxy: ProxySettings, where: str) -> Optional[Diagnosis]:
    """TLS between us and an HTTPS proxy (urllib3 wraps it in ProxyError;
    TLS failures with the server behind a working tunnel are plain SSLError)."""
    cert_err = find(exc, ssl.SSLCertVerificationError)
    if cert_err is not None:
        d = diagnose_certificate(cert_err, proxy.host, what="the proxy", host_field="proxy_host")
        if d.code != "untrusted_certificate":
            return d
        return Diagnosis(
            "proxy_untrusted_certificate",
            f"The certificate of the HTTPS proxy {where} is not trusted: "
            f"{getattr(cert_err, 'verify_message', '') or cert_err}.",
            "If you trust this proxy, upload its certificate file (PEM, CRT or DER) and test again. "
            "It will be trusted for this connection's proxy only.",
            field="proxy_certificate",
        )
    if find(exc, ssl.SSLError) is not None:
        return Diagnosis(
            "proxy_unreachable",
            f"The secure (TLS) handshake with the proxy at {where} failed.",
            "The proxy probably speaks plain HTTP on this port: set Proxy Protocol to HTTP, "
            "or check the Proxy Port.",
            field="proxy_protocol",
        )
    return None
