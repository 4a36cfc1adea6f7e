"""TLS trust for mail connections, and reading a server's certificate.

Two rules hold everywhere:

* A login is only ever sent over a verified connection. An admin's uploaded
  certificate is *added* to the trust for that one connection; host-name
  checks and expiry checks stay on.
* `probe_certificate` is the single place that connects without
  verification, and only to show the admin what the server presented (so
  they can compare fingerprints and upload it). It never logs in.
"""
from __future__ import annotations

import datetime as dt
import logging
import socket
import ssl
from typing import Optional

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs7

from .base import ProxySettings
from .errors import PresentedCertificate

log = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 64 * 1024
MAX_UPLOAD_CERTIFICATES = 20
_PEM_CERT_MARKERS = (b"-----BEGIN CERTIFICATE-----", b"-----BEGIN X509 CERTIFICATE-----",
                     b"-----BEGIN TRUSTED CERTIFICATE-----")
_NOT_A_CERT = ("This file is not a certificate (PEM, CRT or DER). Export the server's certificate "
               "(or its CA certificate) as a .pem, .crt, .cer or .der file and upload that.")


# -- trust for real connections -------------------------------------------

def client_context(trusted_pem: str = "") -> ssl.SSLContext:
    """A verifying context: the system's trusted CAs plus the certificate(s)
    the admin uploaded for this connection (a fresh context per call, so an
    upload never leaks into another connection)."""
    ctx = ssl.create_default_context()
    if ctx.cert_store_stats().get("x509_ca", 0) == 0:
        _load_certifi(ctx)  # slim containers without ca-certificates
    if trusted_pem and trusted_pem.strip():
        try:
            ctx.load_verify_locations(cadata=trusted_pem)
        except (ssl.SSLError, ValueError) as exc:
            raise ValueError("The uploaded certificate for this connection could not be read; "
                             "upload it again (PEM, CRT or DER).") from exc
    # Lets an uploaded CA-signed *leaf* (or intermediate) be the trust anchor,
    # so admins can upload the server certificate itself rather than hunting
    # for the root CA.
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _load_certifi(ctx: ssl.SSLContext) -> None:
    try:
        import certifi
    except ImportError:
        return
    ctx.load_verify_locations(cafile=certifi.where())


# -- showing what a server presents ---------------------------------------

def probe_certificate(host: str, port: int, *, starttls: Optional[str] = None,
                      timeout: float = 10, proxy: ProxySettings | None = None) -> PresentedCertificate:
    """Connect and read the certificate chain the server presents (leaf
    first). Never sends credentials to the server. `starttls="imap"`
    upgrades a plain IMAP connection first. With `proxy` (Exchange, OAuth,
    Graph behind a proxy) the probe goes through an HTTP CONNECT tunnel, the
    way the real connection does: the server may not be reachable directly
    at all. Raises OSError/ssl.SSLError when no certificate could be read."""
    if proxy is not None:
        if starttls:
            raise ValueError("STARTTLS through a proxy is not supported")
        return _probe_through_proxy(host, port, proxy, timeout)
    # Verification is off here ONLY so the admin can be shown the certificate
    # that failed verification; nothing is sent over this connection.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection((host, port), timeout=timeout) as raw:
        if starttls == "imap":
            _imap_starttls(raw)
        elif starttls:
            raise ValueError(f"unsupported starttls protocol {starttls!r}")
        with ctx.wrap_socket(raw, server_hostname=host) as tls:
            chain = _presented_chain(tls)
    if not chain:
        raise ssl.SSLError(f"{host}:{port} presented no certificate")
    return _presented(chain)


def _probe_through_proxy(host: str, port: int, proxy: ProxySettings, timeout: float) -> PresentedCertificate:
    """The proxy is verified as for a real connection (the proxy password
    goes to it); only the server's certificate inside the tunnel is read
    unverified, for the same reason as in probe_certificate: to show the
    admin the certificate that failed verification. Nothing is sent
    through the tunnel but the TLS handshake."""
    with socket.create_connection((proxy.host, proxy.port), timeout=timeout) as raw:
        sock: socket.socket = raw
        if proxy.protocol == "https":
            # Verified with the public roots plus the proxy certificate the admin uploaded.
            sock = client_context(proxy.certificate_pem).wrap_socket(raw, server_hostname=proxy.host)
        try:
            _connect_tunnel(sock, host, port, proxy)
            # Verification off ONLY to show the admin the server certificate that failed it.
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            tls = _handshake_over(sock, ctx, host)
            chain = _presented_chain(tls)
        finally:
            if sock is not raw:
                sock.close()
    if not chain:
        raise ssl.SSLError(f"{host}:{port} presented no certificate")
    return _presented(chain)


def _connect_tunnel(sock: socket.socket, host: str, port: int, proxy: ProxySettings) -> None:
    """`CONNECT host:port` with Basic proxy authentication; raises OSError
    unless the proxy answers 200."""
    import base64

    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
    if proxy.username:
        token = base64.b64encode(f"{proxy.username}:{proxy.password}".encode()).decode()
        lines.append(f"Proxy-Authorization: Basic {token}")
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    reader = _LineReader(sock)
    status_line = reader.line()
    while reader.line() not in (b"\r\n", b"\n"):
        pass  # the rest of the proxy's headers
    parts = status_line.split(None, 2)
    if len(parts) < 2 or parts[1] != b"200":
        raise ConnectionRefusedError(f"the proxy refused the tunnel: {status_line.strip()[:120]!r}")


def _handshake_over(sock: socket.socket, ctx: ssl.SSLContext, host: str) -> ssl.SSLObject:
    """A TLS handshake through memory buffers over `sock`, which may itself
    be a TLS socket (an HTTPS proxy): ssl cannot wrap an SSLSocket twice."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=host)
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            pending = outgoing.read()
            if pending:
                sock.sendall(pending)
            data = sock.recv(65536)
            if not data:
                raise ConnectionResetError("the server closed the connection during the TLS handshake")
            incoming.write(data)
    pending = outgoing.read()
    if pending:
        sock.sendall(pending)
    return tls


def _imap_starttls(sock: socket.socket) -> None:
    """The IMAP STARTTLS exchange, by hand: greeting, STARTTLS, tagged OK."""
    reader = _LineReader(sock)
    greeting = reader.line()
    if not greeting.startswith(b"* OK") and not greeting.startswith(b"* PREAUTH"):
        raise ssl.SSLError(f"unexpected IMAP greeting: {greeting[:80]!r}")
    sock.sendall(b"p1 STARTTLS\r\n")
    while True:
        line = reader.line()
        if line.startswith(b"p1 "):
            break
    if not line.upper().startswith(b"P1 OK"):
        raise ssl.SSLError(f"the server refused STARTTLS: {line[:120]!r}")


class _LineReader:
    """Reads CRLF lines without reading past them (the TLS handshake must
    start right after the server's OK)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock

    def line(self, limit: int = 8192) -> bytes:
        buf = bytearray()
        while not buf.endswith(b"\n"):
            b = self.sock.recv(1)
            if not b:
                raise ConnectionResetError("the server closed the connection during STARTTLS")
            buf += b
            if len(buf) > limit:
                raise ssl.SSLError("IMAP line too long during STARTTLS")
        return bytes(buf)


def _presented_chain(tls: ssl.SSLSocket) -> list[x509.Certificate]:
    """All certificates the server sent, leaf first."""
    if hasattr(tls, "get_unverified_chain"):  # Python 3.13+: DER bytes
        ders = tls.get_unverified_chain() or []
    else:  # Python 3.10-3.12: private, returns _ssl.Certificate objects
        sslobj = getattr(tls, "_sslobj", None)
        getter = getattr(sslobj, "get_unverified_chain", None)
        certs = getter() if getter else None
        ders = [c.public_bytes(ssl._ssl.ENCODING_DER) for c in certs] if certs else []
    if not ders:
        leaf = tls.getpeercert(binary_form=True)
        ders = [leaf] if leaf else []
    return [x509.load_der_x509_certificate(d) for d in ders]


def _presented(chain: list[x509.Certificate]) -> PresentedCertificate:
    leaf = chain[0]
    info = _describe(leaf)
    return PresentedCertificate(
        pem_chain="".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in chain),
        **info,
    )


# -- uploads --------------------------------------------------------------

def load_certificate_upload(data: bytes) -> str:
    """Turn an uploaded file (PEM with one or more certificates, CRT, CER,
    DER, or a PKCS#7 .p7b bundle) into PEM text. Raises ValueError with a
    message meant for the admin."""
    if not data or not data.strip():
        raise ValueError("The file is empty. Upload the server's certificate (PEM, CRT or DER).")
    if len(data) > MAX_UPLOAD_BYTES:
        raise ValueError(f"The file is {len(data) // 1024} KiB; a certificate file is much smaller "
                         f"(at most {MAX_UPLOAD_BYTES // 1024} KiB). Upload only the certificate.")
    if b"PRIVATE KEY-----" in data or _is_der_private_key(data):
        raise ValueError("The file contains a private key; upload only the certificate. "
                         "Never share the server's private key.")
    certs = _parse_certificates(data)
    if not certs:
        raise ValueError(_NOT_A_CERT)
    if len(certs) > MAX_UPLOAD_CERTIFICATES:
        raise ValueError(f"The file contains {len(certs)} certificates; upload at most "
                         f"{MAX_UPLOAD_CERTIFICATES} (the server certificate and its CA chain).")
    now = dt.datetime.now(dt.timezone.utc)
    for cert in certs:
        if cert.not_valid_after_utc < now:
            raise ValueError(
                f"The certificate \u201c{cert.subject.rfc4514_string()}\u201d expired on "
                f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC. Ask the mail server's administrator "
                "for the renewed certificate; expired certificates are never trusted.")
    unique = {c.fingerprint(hashes.SHA256()): c for c in certs}
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in unique.values())


def add_certificates(stored_pem: str, new_pem: str) -> str:
    """The connection's trusted certificates plus a new upload. One
    connection can need several: an OAuth connection talks to the sign-in
    service and to Exchange or Graph, each maybe with its own certificate.
    Duplicates and expired ones are dropped; the newest uploads are kept
    when there are too many."""
    now = dt.datetime.now(dt.timezone.utc)
    certs = _parse_certificates((stored_pem or "").encode()) + _parse_certificates(new_pem.encode())
    unique = {c.fingerprint(hashes.SHA256()): c for c in certs if c.not_valid_after_utc >= now}
    kept = list(unique.values())[-MAX_UPLOAD_CERTIFICATES:]
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in kept)


def _parse_certificates(data: bytes) -> list[x509.Certificate]:
    if any(m in data for m in _PEM_CERT_MARKERS):
        # Normalise the legacy markers some tools write.
        text = data.replace(b"X509 CERTIFICATE", b"CERTIFICATE").replace(b"TRUSTED CERTIFICATE", b"CERTIFICATE")
        try:
            return x509.load_pem_x509_certificates(text)
        except ValueError:
            return []
    if b"-----BEGIN PKCS7-----" in data:
        try:
            return pkcs7.load_pem_pkcs7_certificates(data)
        except ValueError:
            return []
    for loader in (lambda d: [x509.load_der_x509_certificate(d)], pkcs7.load_der_pkcs7_certificates):
        try:
            return loader(data)
        except ValueError:
            continue
    return []


def _is_der_private_key(data: bytes) -> bool:
    try:
        serialization.load_der_private_key(data, password=None)
        return True
    except TypeError:  # an encrypted key: still a key
        return True
    except Exception:  # not a key (ValueError, UnsupportedAlgorithm...)
        return False


def describe_certificates(pem: str) -> list[dict]:
    """What to show about stored (uploaded) certificates, in file order."""
    if not pem or not pem.strip():
        return []
    return [_describe(c) for c in x509.load_pem_x509_certificates(pem.encode())]


def _describe(cert: x509.Certificate) -> dict:
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        # As `openssl x509 -noout -fingerprint -sha256` prints it after "=".
        "sha256_fingerprint": cert.fingerprint(hashes.SHA256()).hex(":").upper(),
        "self_signed": _self_signed(cert),
    }


def _self_signed(cert: x509.Certificate) -> bool:
    if cert.subject != cert.issuer:
        return False
    try:
        cert.verify_directly_issued_by(cert)
        return True
    except Exception:  # wrong signature or unsupported key type
        return False
