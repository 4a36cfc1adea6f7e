"""The one interface every mail protocol implements.

Jobs build a `ConnectionSettings` from a stored connection (secrets already
decrypted, in memory only) and talk to the server through a `Connector`.
Connectors never import models: they get plain data in and give plain data
back, so a protocol is one file and can be tested against a server alone.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Iterable, Optional

# Progress callback: the job turns these into the live status the admin sees
# ("connecting", "logging in", "opening folder"...).
Progress = Callable[[str], None]


def _no_progress(_step: str) -> None:
    pass


@dataclass(frozen=True)
class ProxySettings:
    protocol: str  # "http" or "https"
    host: str
    port: int
    username: str = ""
    password: str = ""
    # PEM the admin uploaded for an HTTPS proxy whose certificate is not
    # publicly trusted. Trusted for this connection's proxy only.
    certificate_pem: str = ""


@dataclass(frozen=True)
class OAuthSettings:
    client_id: str
    tenant_id: str = ""  # blank = multi-tenant ("organizations")
    client_auth: str = "secret"  # "secret" or "certificate"
    client_secret: str = ""
    certificate_pem: str = ""  # public certificate (PEM)
    private_key_pem: str = ""
    authority_host: str = "https://login.microsoftonline.com"
    graph_endpoint: str = "https://graph.microsoft.com"
    token_cache: str = ""  # serialized msal cache (decrypted)
    account_username: str = ""  # the signed-in account for delegated access


@dataclass(frozen=True)
class ConnectionSettings:
    protocol: str  # "imap", "exchange", "oauth", "graph"
    email_address: str = ""
    password: str = ""
    source_folder: str = ""  # blank = Inbox
    # IMAP
    host: str = ""
    port: int = 0
    encryption: str = "ssl"  # "ssl", "starttls", "none"
    # Exchange / OAuth
    endpoint: str = ""
    # PEM of the certificate(s) the admin uploaded for this server; trusted
    # for this connection only, with host-name checks still on.
    trusted_cert_pem: str = ""
    proxy: Optional[ProxySettings] = None
    oauth: Optional[OAuthSettings] = None
    connect_timeout: float = 10.0
    read_timeout: float = 60.0


@dataclass(frozen=True)
class CheckResult:
    folder: str
    unread: int
    detail: str = ""


@dataclass(frozen=True)
class RemoteMessage:
    """One unread message as the server lists it, before it is fetched."""

    key: str  # unique per connection: IMAP "UIDVALIDITY:UID", EWS item id, Graph id
    size: int = 0
    received: str = ""  # ISO 8601 when known
    message_id: str = ""  # RFC 5322 Message-ID when cheaply known
    extra: dict = field(default_factory=dict, compare=False, hash=False)


class Connector(abc.ABC):
    """Open with `with Connector(settings) as c:`; every method may raise
    `connectors.errors.ConnectorError` carrying a `Diagnosis`."""

    protocol: str = ""

    def __init__(self, settings: ConnectionSettings, progress: Progress = _no_progress):
        self.settings = settings
        self.progress = progress

    def __enter__(self) -> "Connector":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @abc.abstractmethod
    def open(self) -> None:
        """Connect, verify TLS, log in and select the source folder."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the connection; never raises."""

    @abc.abstractmethod
    def check(self) -> CheckResult:
        """What Test and Save runs after `open()`: the folder is usable."""

    @abc.abstractmethod
    def list_unread(self, limit: int) -> list[RemoteMessage]:
        """Unread messages in the source folder, oldest first, at most `limit`."""

    @abc.abstractmethod
    def fetch_raw(self, message: RemoteMessage, dest: BinaryIO) -> int:
        """Write the full RFC 822 bytes to `dest` (streamed where the protocol
        allows) without marking it read. Returns the number of bytes written."""

    @abc.abstractmethod
    def mark_read(self, messages: Iterable[RemoteMessage]) -> None:
        """Mark the messages read on the server. Called only after they are
        durably stored."""


def split_mailbox(address: str) -> tuple[str, str]:
    """Split the seed's shared-mailbox forms into (login, mailbox).

    `primary@x.com\\shared@x.com` -> ("primary@x.com", "shared@x.com")
    `domain\\user\\shared@x.com`   -> ("domain\\user", "shared@x.com")
    `user@x.com`                  -> ("user@x.com", "user@x.com")
    """
    address = address.strip()
    if "\\" not in address:
        return address, address
    login, _, mailbox = address.rpartition("\\")
    return login, mailbox
