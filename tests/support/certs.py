"""Certificates made on the fly for the test servers (Dovecot, EWS, proxies,
identity platform). Nothing is checked in; every run makes its own."""
from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID


@dataclass
class CertPair:
    cert_pem: bytes
    key_pem: bytes
    cert_path: Path
    key_path: Path

    @property
    def cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)

    @property
    def sha256_fingerprint(self) -> str:
        """As `openssl x509 -noout -fingerprint -sha256` prints it (after '=')."""
        return self.cert.fingerprint(hashes.SHA256()).hex(":").upper()

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def make_cert(directory: Path, name: str, *, hostnames=("localhost", "127.0.0.1"),
              common_name: str | None = None, days: int = 30, expired: bool = False,
              issuer: CertPair | None = None, is_ca: bool = False) -> CertPair:
    """A certificate for `hostnames` (DNS names or IPs). Self-signed unless
    `issuer` (a CA made with is_ca=True) is given."""
    directory.mkdir(parents=True, exist_ok=True)
    key = _key()
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Intake tests"),
        # A distinct subject per certificate: two self-signed certificates
        # with the same subject in one trust bundle shadow each other.
        x509.NameAttribute(NameOID.COMMON_NAME, common_name or f"{hostnames[0]} ({name})"),
    ])
    now = dt.datetime.now(dt.timezone.utc)
    if expired:
        not_before, not_after = now - dt.timedelta(days=60), now - dt.timedelta(days=1)
    else:
        not_before, not_after = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)
    if issuer is not None:
        issuer_name = issuer.cert.subject
        signing_key = serialization.load_pem_private_key(issuer.key_pem, None)
    else:
        issuer_name, signing_key = subject, key
    sans = []
    for h in hostnames:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if sans and not is_ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if is_ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True,
                          crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
    cert = builder.sign(signing_key, hashes.SHA256())
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert_pem)
    key_path.write_bytes(key_pem)
    key_path.chmod(0o600)
    return CertPair(cert_pem, key_pem, cert_path, key_path)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
