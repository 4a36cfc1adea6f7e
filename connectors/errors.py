"""Failures turned into words an admin can act on at 2 a.m.

Every connector raises `ConnectorError(Diagnosis(...))`. The `code` is stable
(tests and the UI branch on it); `message` says what went wrong and `hint`
what to do. `field` names the form field the failure belongs to, so the page
can show it beside that field. Messages never contain secrets.
"""
from __future__ import annotations

import errno
import socket
import ssl
import dataclasses
from dataclasses import asdict, dataclass
from typing import Iterator, Optional


@dataclass(frozen=True)
class PresentedCertificate:
    """The certificate a server showed us, for the admin to compare and upload."""

    subject: str
    issuer: str
    not_before: str
    not_after: str
    sha256_fingerprint: str  # "AB:CD:..." as `openssl x509 -fingerprint -sha256` prints it
    pem_chain: str = ""
    self_signed: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Diagnosis:
    code: str
    message: str
    hint: str = ""
    field: Optional[str] = None
    certificate: Optional[PresentedCertificate] = None
    retry_after: Optional[float] = None  # seconds, when the server asked us to back off
    extra: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["certificate"] = self.certificate.to_dict() if self.certificate else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Diagnosis":
        d = dict(d)
        cert = d.pop("certificate", None)
        return cls(certificate=PresentedCertificate(**cert) if cert else None, **d)


class ConnectorError(Exception):
    def __init__(self, diagnosis: Diagnosis):
        super().__init__(diagnosis.message)
        self.diagnosis = diagnosis


# Codes that mean "the credentials are wrong": the scheduler pauses a
# connection after repeated ones instead of hammering the server.
AUTH_CODES = frozenset({
    "auth_failed", "grant_expired", "oauth_invalid_client", "oauth_unknown_app", "oauth_secret_expired",
    "oauth_certificate_not_registered", "oauth_tenant_not_found", "oauth_consent_required",
    "oauth_not_multitenant", "oauth_tenant_required", "permission_denied",
})
# Codes worth retrying later with back-off.
TRANSIENT_CODES = frozenset({"timeout", "connection_refused", "server_busy", "connection_lost", "dns_not_found", "throttled"})


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """Walk __cause__/__context__ (and requests' wrapped `reason`/`args`)
    so a root cause buried under library wrappers is still found."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        e = stack.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        stack.extend([e.__cause__, e.__context__])
        reason = getattr(e, "reason", None)
        if isinstance(reason, BaseException):
            stack.append(reason)
        for a in getattr(e, "args", ()) or ():
            if isinstance(a, BaseException):
                stack.append(a)


def find(exc: BaseException, kind: type) -> Optional[BaseException]:
    for e in exception_chain(exc):
        if isinstance(e, kind):
            return e
    return None


def _text(exc: BaseException) -> str:
    return " | ".join(str(e) for e in exception_chain(exc))


def diagnose_network(exc: BaseException, host: str, port: int, *, what: str = "the mail server",
                     host_field: str = "host", port_field: str = "port") -> Optional[Diagnosis]:
    """Classify DNS, TCP and TLS failures shared by every protocol.

    Returns None when the exception is not a network/TLS failure, so the
    caller can go on with protocol-specific checks."""
    where = f"{host}:{port}" if port else host
    cert_err = find(exc, ssl.SSLCertVerificationError)
    if cert_err is not None:
        return diagnose_certificate(cert_err, host, what=what, host_field=host_field)
    if find(exc, socket.gaierror) is not None or "Name or service not known" in _text(exc) \
            or "nodename nor servname" in _text(exc) or "Failed to resolve" in _text(exc):
        return Diagnosis(
            "dns_not_found",
            f"The host name {host} could not be found (DNS).",
            "Check the spelling of the host name, or use the server's IP address. "
            "If the name is internal, make sure this server uses your internal DNS.",
            field=host_field,
        )
    refused = find(exc, ConnectionRefusedError)
    if refused is not None or "Connection refused" in _text(exc) or _errno_in(exc, errno.ECONNREFUSED):
        return Diagnosis(
            "connection_refused",
            f"{what[:1].upper() + what[1:]} at {where} refused the connection.",
            "Nothing is listening on that port. Check the port number and that the service is running, "
            "and that no firewall rejects this server.",
            field=port_field,
        )
    if find(exc, socket.timeout) is not None or find(exc, TimeoutError) is not None \
            or "timed out" in _text(exc).lower():
        return Diagnosis(
            "timeout",
            f"{what[:1].upper() + what[1:]} at {where} did not answer in time.",
            "Check the host name and port, and that a firewall is not silently dropping the connection. "
            "If the server is just slow, try again later.",
            field=host_field,
        )
    if _errno_in(exc, errno.EHOSTUNREACH) or _errno_in(exc, errno.ENETUNREACH):
        return Diagnosis(
            "host_unreachable",
            f"No network route to {where}.",
            "Check the host name or IP address and this server's network connection.",
            field=host_field,
        )
    ssl_err = find(exc, ssl.SSLError)
    if ssl_err is not None:
        return Diagnosis(
            "tls_handshake",
            f"The secure (TLS) handshake with {where} failed: {getattr(ssl_err, 'reason', None) or ssl_err}.",
            "Check that the port and encryption match what the server offers "
            "(for IMAP: SSL/TLS usually on 993, STARTTLS on 143).",
            field=port_field,
        )
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, EOFError)) or find(exc, ConnectionResetError):
        return Diagnosis(
            "connection_lost",
            f"{what[:1].upper() + what[1:]} at {where} closed the connection unexpectedly.",
            "Check that the port and encryption match what the server offers, then try again.",
            field=port_field,
        )
    return None


def _errno_in(exc: BaseException, number: int) -> bool:
    return any(getattr(e, "errno", None) == number for e in exception_chain(exc))


# OpenSSL verify codes (X509_V_ERR_*) that mean "we do not trust who signed it".
_UNTRUSTED_CODES = {18, 19, 20, 21, 2, 27, 30}
_EXPIRED_CODE = 10
_NOT_YET_VALID_CODE = 9
_HOSTNAME_MISMATCH_CODE = 62
# A server reached by IP address fails with this one instead (seen with a real
# Dovecot whose certificate names only a DNS host).
_IP_ADDRESS_MISMATCH_CODE = 64


def diagnose_certificate(err: BaseException, host: str, *, what: str = "the mail server",
                         host_field: str = "host") -> Diagnosis:
    code = getattr(err, "verify_code", None)
    message = getattr(err, "verify_message", "") or str(err)
    if code in (_HOSTNAME_MISMATCH_CODE, _IP_ADDRESS_MISMATCH_CODE) or "hostname mismatch" in message.lower() \
            or "ip address mismatch" in message.lower() or "doesn't match" in message:
        return Diagnosis(
            "hostname_mismatch",
            f"The certificate of {what} is not valid for the host name {host}.",
            "Use the host name the certificate was issued for (see the certificate's names), "
            "or ask the server's administrator for a certificate that covers this name.",
            field=host_field,
        )
    if code == _EXPIRED_CODE or "expired" in message.lower():
        return Diagnosis(
            "certificate_expired",
            f"The certificate of {what} ({host}) has expired.",
            "Ask the server's administrator to renew the certificate. "
            "Intake does not accept expired certificates, even uploaded ones.",
            field=host_field,
        )
    if code == _NOT_YET_VALID_CODE:
        return Diagnosis(
            "certificate_not_yet_valid",
            f"The certificate of {what} ({host}) is not valid yet.",
            "Check the clock of this server and of the mail server.",
            field=host_field,
        )
    return Diagnosis(
        "untrusted_certificate",
        f"The certificate of {what} ({host}) is not trusted: {message}.",
        "If you trust this server, compare the certificate below with the one your mail administrator "
        "gave you, then upload that certificate file (PEM, CRT or DER) and test again. "
        "It will be trusted for this connection only.",
        field="trusted_certificate",
    )
