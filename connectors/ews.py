"""Exchange Web Services (on-premises Exchange, or Exchange Online with OAuth
credentials handed in by the OAuth module), through exchangelib.

Two exchangelib properties shape this file (see the library notes):

* Its HTTP adapter class is process-global, so trust and proxy cannot be
  given per connection the normal way. One global adapter reads them per
  request from a ContextVar that every connector call sets
  (`connection_network`). The environment (REQUESTS_CA_BUNDLE, HTTPS_PROXY)
  never wins over a connection's own settings.
* It caches one Protocol per (endpoint, credentials) for the whole process,
  with its timeout and retry policy. Each connector takes its Protocol out
  of that cache at once, so nothing set for one connection reaches another.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import re
import threading
from dataclasses import dataclass, replace
from typing import BinaryIO, Iterable, Iterator, Optional
from urllib.parse import urlsplit

import requests
from exchangelib import DELEGATE, IMPERSONATION, Account, Configuration, Credentials, FailFast, FaultTolerance
from exchangelib.credentials import BaseOAuth2Credentials
from exchangelib.errors import (
    CASError,
    ErrorAccessDenied,
    ErrorFolderNotFound,
    ErrorImpersonateUserDenied,
    ErrorImpersonationFailed,
    ErrorInvalidSmtpAddress,
    ErrorItemNotFound,
    ErrorMailboxMoveInProgress,
    ErrorMailboxStoreUnavailable,
    ErrorNonExistentMailbox,
    ErrorServerBusy,
    ErrorTimeoutExpired,
    MalformedResponseError,
    RateLimitError,
    RedirectError,
    ResponseMessageError,
    SOAPError,
    TransportError,
    UnauthorizedError,
)
from exchangelib.folders import Inbox, MsgFolderRoot, Root
from exchangelib.items import Message
from exchangelib.properties import DistinguishedFolderId, Mailbox
from exchangelib.protocol import BaseProtocol, Protocol
from exchangelib.util import ParseError
from oauthlib.oauth2.rfc6749.errors import OAuth2Error

from .base import CheckResult, ConnectionSettings, Connector, Progress, RemoteMessage, _no_progress, split_mailbox
from .errors import ConnectorError, Diagnosis, find
from .http import diagnose_http, proxies_for, verify_for

log = logging.getLogger(__name__)

# Messages per FindItem page; the server caps pages at 1000 anyway.
_PAGE_SIZE = 100


# --------------------------------------------------------------------------- per-connection network


@dataclass(frozen=True)
class _Network:
    verify: "str | bool"  # CA bundle path (public roots + uploads) or True
    proxies: dict  # {} = direct, never the environment's proxy


_network: contextvars.ContextVar[Optional[_Network]] = contextvars.ContextVar("intake_ews_network", default=None)


class PerConnectionAdapter(requests.adapters.HTTPAdapter):
    """exchangelib's adapter for every Protocol in the process. It replaces
    `verify` and `proxies` on each request with those of the connection
    whose call is running, which also beats what requests took from the
    environment (REQUESTS_CA_BUNDLE, HTTPS_PROXY...)."""

    def send(self, request, stream=False, timeout=None, verify=True, cert=None, proxies=None):
        net = _network.get()
        if net is not None:
            verify, proxies = net.verify, net.proxies
        return super().send(request, stream=stream, timeout=timeout, verify=verify, cert=cert, proxies=proxies)


def install_adapter() -> None:
    """Make exchangelib use PerConnectionAdapter (done on import; idempotent).
    A ContextVar is enough because exchangelib 5.6 runs no thread pools."""
    BaseProtocol.HTTP_ADAPTER_CLS = PerConnectionAdapter


install_adapter()


@contextlib.contextmanager
def connection_network(settings: ConnectionSettings) -> Iterator[None]:
    """Run exchangelib calls with this connection's trust and proxy. Other
    modules that drive exchangelib for a connection use this too."""
    token = _network.set(_Network(verify_for(settings), proxies_for(settings)))
    try:
        yield
    finally:
        _network.reset(token)


# Account() is where exchangelib creates (and caches) the Protocol; holding
# this lock from creation to eviction means no other connector can pick up
# ours from the cache in between.
_account_lock = threading.Lock()


def _evict(protocol: Protocol) -> None:
    try:
        cached, _ = Protocol[protocol.config]
    except KeyError:
        return
    if cached is protocol:
        with contextlib.suppress(KeyError):
            del Protocol[protocol.config]


# --------------------------------------------------------------------------- the connector


class ExchangeConnector(Connector):
    protocol = "exchange"

    def __init__(self, settings: ConnectionSettings, progress: Progress = _no_progress, *,
                 credentials=None, impersonate: bool = False, max_wait: float = 0.0):
        """`credentials`: an exchangelib credentials object (e.g. OAuth tokens)
        used instead of the settings' user name and password.
        `impersonate`: open the mailbox with ApplicationImpersonation (OAuth
        app-only credentials) instead of delegate access.
        `max_wait`: 0 fails fast (Test and Save, and the default); more lets
        exchangelib ride out throttling for up to that many seconds. Note that
        exchangelib then also retries 401s as if they were throttling."""
        super().__init__(settings, progress)
        if impersonate and not isinstance(credentials, BaseOAuth2Credentials):
            raise ValueError("impersonate=True needs OAuth credentials")
        self._credentials = credentials
        self._impersonate = impersonate
        self._max_wait = max_wait
        self.login, self.mailbox = split_mailbox(settings.email_address)
        self._account: Optional[Account] = None
        self._folder = None
        self._folder_path = ""

    # ---- Connector interface
    def open(self) -> None:
        try:
            with self._calling():
                self._open()
        except BaseException:
            self.close()  # `with` does not call close() when open() fails
            raise

    def _open(self) -> None:
        self._check_settings()
        self.progress("connecting")
        account = self._make_account()
        self._account = account
        # Auth-type detection is an unauthenticated POST: TLS, proxy and
        # endpoint problems show up here, before any credentials are sent.
        account.protocol.auth_type  # noqa: B018 - property with a side effect
        self.progress("logging in")
        account.version  # noqa: B018 - first authenticated request
        self.progress("opening folder")
        self._folder, self._folder_path = self._open_folder(account)

    def close(self) -> None:
        account, self._account, self._folder = self._account, None, None
        if account is None:
            return
        try:
            with connection_network(self.settings):
                account.protocol.close()
        except Exception:  # noqa: BLE001 - close() never raises
            log.debug("closing the EWS sessions failed", exc_info=True)
        _evict(account.protocol)

    def check(self) -> CheckResult:
        folder = self._require_folder()
        with self._calling():
            folder.refresh()  # fresh unread count
            # The folder count needs only folder rights; reading one item
            # proves we may read the messages too.
            list(folder.all().only("id")[:1])
            return CheckResult(self._folder_path, int(folder.unread_count or 0),
                               detail=f"{self.mailbox} on {self._host()}")

    def list_unread(self, limit: int) -> list[RemoteMessage]:
        if limit <= 0:
            return []
        folder = self._require_folder()
        with self._calling():
            qs = (folder.filter(is_read=False).order_by("datetime_received")
                  .only("id", "changekey", "size", "datetime_received"))
            qs.page_size = min(limit, _PAGE_SIZE)
            return [self._remote(item) for item in qs[:limit]]

    def fetch_raw(self, message: RemoteMessage, dest: BinaryIO) -> int:
        folder = self._require_folder()
        with self._calling():
            ids = [(message.key, message.extra.get("changekey"))]
            item = next(iter(self._account.fetch(ids=ids, folder=folder,
                                                 only_fields=["mime_content"], chunk_size=1)), None)
            if isinstance(item, ErrorItemNotFound) or item is None:
                raise ConnectorError(self._message_gone())
            if isinstance(item, Exception):
                raise item
            data = item.mime_content
            if not data:
                raise ConnectorError(self._no_mime())
            if isinstance(data, str):
                data = data.encode("utf-8")
            # exchangelib hands over the whole decoded MimeContent; EWS has no
            # ranged GetItem, so this is as streamed as it gets.
            dest.write(data)
            return len(data)

    def mark_read(self, messages: Iterable[RemoteMessage]) -> None:
        messages = list(messages)
        if not messages:
            return
        folder = self._require_folder()
        with self._calling():
            items = [(Message(account=self._account, folder=folder, id=m.key, changekey=m.extra.get("changekey"),
                              is_read=True), ["is_read"]) for m in messages]
            # Read receipts would tell a phishing sender their mail was opened.
            results = self._account.bulk_update(items, suppress_read_receipts=True)
            for res in results:
                # A message someone else already moved or deleted needs no flag.
                if isinstance(res, Exception) and not isinstance(res, ErrorItemNotFound):
                    raise res

    # ---- opening
    def _check_settings(self) -> None:
        parts = urlsplit(self.settings.endpoint.strip())
        if parts.scheme == "http":
            raise ConnectorError(Diagnosis(
                "invalid_endpoint",
                f"The EWS address {self.settings.endpoint.strip()} is not encrypted (http://).",
                "Use the https:// address: Intake does not send Exchange passwords or tokens unencrypted.",
                field="endpoint",
            ))
        if parts.scheme != "https" or not parts.hostname:
            raise ConnectorError(Diagnosis(
                "invalid_endpoint",
                f"The EWS address {self.settings.endpoint!r} is not a web address.",
                "Enter the full EWS URL, usually https://mail.example.com/EWS/Exchange.asmx "
                "(Exchange Online: https://outlook.office365.com/EWS/Exchange.asmx).",
                field="endpoint",
            ))
        if "@" not in self.mailbox:
            raise ConnectorError(Diagnosis(
                "invalid_email",
                f"{self.mailbox!r} is not an email address.",
                "Enter the mailbox's email address. To log in as DOMAIN\\user, write "
                "DOMAIN\\user\\mailbox@example.com.",
                field="email_address",
            ))

    def _make_account(self) -> Account:
        s = self.settings
        credentials = self._credentials or Credentials(self.login, s.password)
        policy = FaultTolerance(max_wait=self._max_wait) if self._max_wait > 0 else FailFast()
        config = Configuration(service_endpoint=s.endpoint.strip(), credentials=credentials, retry_policy=policy)
        access = IMPERSONATION if self._impersonate else DELEGATE
        with _account_lock:
            account = Account(self.mailbox, config=config, autodiscover=False, access_type=access)
            _evict(account.protocol)
        # exchangelib reads protocol.TIMEOUT, so this instance gets its own.
        account.protocol.TIMEOUT = (s.connect_timeout, s.read_timeout)
        return account

    def _open_folder(self, account: Account):
        """Blank = Inbox; "Inbox/Phishing" starts at the (localised) Inbox;
        any other path starts at the top of the mailbox, as Outlook shows it.
        Navigation never touches the root folder, which a delegate may not
        be allowed to read, and walks one level at a time (no full tree)."""
        parts = [p.strip() for p in self.settings.source_folder.split("/") if p.strip()]
        root = Root(account=account, _distinguished_id=DistinguishedFolderId(
            id=Root.DISTINGUISHED_FOLDER_ID, mailbox=Mailbox(email_address=self.mailbox)))
        if not parts or parts[0].lower() == "inbox":
            folder, walked, parts = Inbox.get_distinguished(root=root), ["Inbox"], parts[1:]
        else:
            folder, walked = MsgFolderRoot.get_distinguished(root=root), []
        for part in parts:
            try:
                folder = folder // part
            except ErrorFolderNotFound:
                raise ConnectorError(self._folder_missing(part, walked)) from None
            walked.append(folder.name or part)  # as the server spells it
        return folder, "/".join(walked)

    def _require_folder(self):
        if self._account is None or self._folder is None:
            raise RuntimeError("ExchangeConnector used before open()")
        return self._folder

    @staticmethod
    def _remote(item) -> RemoteMessage:
        received = item.datetime_received.isoformat() if item.datetime_received else ""
        return RemoteMessage(key=item.id, size=item.size or 0, received=received,
                             extra={"changekey": item.changekey})

    # ---- errors
    @contextlib.contextmanager
    def _calling(self) -> Iterator[None]:
        """Every call: this connection's network settings, and failures turned
        into a Diagnosis."""
        with connection_network(self.settings):
            try:
                yield
            except ConnectorError:
                raise
            except Exception as exc:  # noqa: BLE001 - everything becomes words for the admin
                diagnosis = self._diagnose(exc)
                log.info("EWS %s: %s (%s)", self._host(), diagnosis.code, type(exc).__name__)
                raise ConnectorError(diagnosis) from exc

    def _host(self) -> str:
        return urlsplit(self.settings.endpoint.strip()).hostname or self.settings.endpoint

    def _diagnose(self, exc: BaseException) -> Diagnosis:
        for check in (self._diagnose_exchange, self._diagnose_network, self._diagnose_response):
            d = check(exc)
            if d is not None:
                return d
        return Diagnosis(
            "exchange_error",
            f"Exchange at {self._host()} failed: {_describe(exc)}.",
            "Test again. If it keeps failing, give this message to your Exchange administrator.",
        )

    def _diagnose_exchange(self, exc: BaseException) -> Optional[Diagnosis]:
        """What the server said in EWS terms (response codes, 401, throttling)."""
        host = self._host()
        if find(exc, UnauthorizedError) is not None or find(exc, OAuth2Error) is not None:
            return self._auth_failed()
        if find(exc, ErrorNonExistentMailbox) is not None or find(exc, ErrorInvalidSmtpAddress) is not None:
            return Diagnosis(
                "mailbox_not_found",
                f"Exchange at {host} has no mailbox with the address {self.mailbox}.",
                "Check the spelling of the email address. For a shared mailbox use its primary SMTP "
                "address, after your own login and a backslash: you@example.com\\shared@example.com.",
                field="email_address",
            )
        if find(exc, ErrorImpersonateUserDenied) is not None or find(exc, ErrorImpersonationFailed) is not None:
            return Diagnosis(
                "access_denied",
                f"Exchange at {host} does not let this application act as {self.mailbox} (impersonation denied).",
                "Ask your Exchange administrator to give the application the ApplicationImpersonation role "
                "(or an application access policy) covering this mailbox.",
                field="email_address",
            )
        if find(exc, ErrorAccessDenied) is not None:
            return self._access_denied()
        if find(exc, ErrorFolderNotFound) is not None:  # the Inbox or top of the mailbox itself
            return self._folder_missing("Inbox" if not self.settings.source_folder.strip() else
                                        self.settings.source_folder.strip(), [])
        busy = find(exc, ErrorServerBusy)
        if busy is not None and not _network_cause(exc):
            return self._server_busy(busy)
        if find(exc, RateLimitError) is not None:
            wait = getattr(find(exc, RateLimitError), "wait", None)
            return self._server_busy(None, wait)
        if find(exc, ErrorMailboxStoreUnavailable) is not None or find(exc, ErrorMailboxMoveInProgress) is not None:
            return Diagnosis(
                "server_busy",
                f"The mailbox {self.mailbox} is temporarily unavailable on Exchange at {host} "
                "(it is being moved or its database is offline).",
                "Nothing to change here; Intake will try again later.",
                retry_after=300.0,
            )
        return None

    def _diagnose_network(self, exc: BaseException) -> Optional[Diagnosis]:
        d = diagnose_http(exc, self.settings, self.settings.endpoint.strip(), what="the Exchange server",
                          host_field="endpoint")
        if d is None:
            if isinstance(exc, ErrorTimeoutExpired) or find(exc, ErrorTimeoutExpired) is not None:
                return Diagnosis(
                    "timeout",
                    f"Exchange at {self._host()} did not answer in time.",
                    "Try again later. If it keeps happening, check the server's load and the network "
                    "between Intake and the server.",
                    field="endpoint",
                )
            return None
        if d.code == "untrusted_certificate":
            d = replace(d, certificate=self._presented_certificate())
        return d

    def _diagnose_response(self, exc: BaseException) -> Optional[Diagnosis]:
        """Answers that are not EWS: broken XML, redirects, HTML pages."""
        host = self._host()
        redirect = find(exc, RedirectError)
        if redirect is not None:
            return Diagnosis(
                "wrong_endpoint",
                f"{self.settings.endpoint.strip()} redirects to {getattr(redirect, 'url', 'another address')} "
                "instead of answering EWS requests.",
                "Enter the EWS URL itself, usually https://mail.example.com/EWS/Exchange.asmx.",
                field="endpoint",
            )
        if any(find(exc, kind) is not None for kind in (SOAPError, ParseError, MalformedResponseError)):
            text = str(find(exc, MalformedResponseError) or "")
            if re.search(r"Code: (404|405)\b", text):
                return self._wrong_endpoint()
            return Diagnosis(
                "invalid_response",
                f"Exchange at {host} sent an answer that is not valid EWS XML.",
                "Check that the EWS URL is right (usually https://mail.example.com/EWS/Exchange.asmx) and that no "
                "proxy or firewall rewrites the traffic. If the URL is right, the Exchange server may be "
                "unhealthy: Intake will try again later.",
                field="endpoint",
            )
        if isinstance(exc, TransportError) and "auth type" in str(exc).lower():
            # exchangelib found neither a 401 naming NTLM/Basic/Digest nor a 200.
            return Diagnosis(
                "wrong_endpoint",
                f"{self.settings.endpoint.strip()} is not an EWS endpoint, or it offers no login method "
                "Intake can use (NTLM or Basic).",
                "Check the EWS URL, usually https://mail.example.com/EWS/Exchange.asmx. If it is right, ask your "
                "Exchange administrator to enable NTLM or Basic authentication on the EWS virtual directory, "
                "or use an OAuth connection.",
                field="endpoint",
            )
        cas = find(exc, CASError)
        if cas is not None:
            return Diagnosis(
                "exchange_error",
                f"Exchange at {host} failed in its front end (CAS error: {getattr(cas, 'cas_error', '')}).",
                "Give this message to your Exchange administrator.",
            )
        return None

    # ---- messages
    def _auth_failed(self) -> Diagnosis:
        if self._credentials is not None:
            return Diagnosis(
                "auth_failed",
                f"Exchange at {self._host()} rejected the access token (HTTP 401 Unauthorized).",
                "Sign in again for this connection, and check that the application has the EWS permission "
                "(EWS.AccessAsUser.All or full_access_as_app) with admin consent.",
            )
        return Diagnosis(
            "auth_failed",
            f"Exchange at {self._host()} rejected the login {self.login} or its password "
            "(HTTP 401 Unauthorized).",
            "Check the password. Log in with the email address or DOMAIN\\user. For a shared mailbox, enter your "
            "own login, a backslash and the shared address: you@example.com\\shared@example.com.",
            field="password",
        )

    def _access_denied(self) -> Diagnosis:
        if self._credentials is not None:
            return Diagnosis(
                "access_denied",
                f"The signed-in account or application has no access to the mailbox {self.mailbox}.",
                "Give the signed-in account Full Access to the mailbox, or, for an application, "
                "turn on impersonation and give it the ApplicationImpersonation role for this mailbox.",
                field="email_address",
            )
        if self.login.lower() == self.mailbox.lower():
            return Diagnosis(
                "access_denied",
                f"Exchange at {self._host()} denied {self.login} access to its own mailbox.",
                "EWS may be turned off for this user: ask your Exchange administrator "
                "(Set-CASMailbox -EwsEnabled $true), or check the Source Folder's permissions.",
                field="email_address",
            )
        return Diagnosis(
            "access_denied",
            f"{self.login} has no access to the mailbox {self.mailbox}.",
            f"Ask your Exchange administrator to give {self.login} Full Access to {self.mailbox} "
            f"(Add-MailboxPermission -Identity {self.mailbox} -User {self.login} -AccessRights FullAccess), "
            "or read and edit rights on the Source Folder.",
            field="email_address",
        )

    def _server_busy(self, busy: Optional[BaseException], wait: Optional[float] = None) -> Diagnosis:
        seconds = getattr(busy, "back_off", None) if busy is not None else wait
        after = f" and asked us to wait {seconds:g} seconds" if seconds else ""
        return Diagnosis(
            "server_busy",
            f"Exchange at {self._host()} is busy{after} (ErrorServerBusy).",
            f"Nothing to change here; Intake will try again later. If it keeps happening, ask your Exchange "
            f"administrator about the EWS throttling policy for {self.login}.",
            retry_after=float(seconds) if seconds else None,
        )

    def _folder_missing(self, part: str, walked: list[str]) -> Diagnosis:
        where = "/".join(walked) if walked else "the top of the mailbox"
        return Diagnosis(
            "folder_not_found",
            f"There is no folder {part!r} in {where} of the mailbox {self.mailbox}.",
            "Check the Source Folder: folder names as Outlook shows them, separated by '/', "
            "for example Inbox/Phishing. Leave it blank to use the Inbox.",
            field="source_folder",
        )

    def _message_gone(self) -> Diagnosis:
        return Diagnosis(
            "message_not_found",
            f"The message is no longer in {self._folder_path} of {self.mailbox}.",
            "Someone moved or deleted it after it was listed; it will not be fetched.",
        )

    def _no_mime(self) -> Diagnosis:
        return Diagnosis(
            "invalid_response",
            f"Exchange at {self._host()} returned the message without its MIME content.",
            "The item may not be an email (for example a meeting or a report). Check it in Outlook.",
        )

    def _wrong_endpoint(self) -> Diagnosis:
        return Diagnosis(
            "wrong_endpoint",
            f"{self.settings.endpoint.strip()} does not answer like an Exchange EWS endpoint.",
            "Enter the EWS URL, usually https://mail.example.com/EWS/Exchange.asmx "
            "(Exchange Online: https://outlook.office365.com/EWS/Exchange.asmx).",
            field="endpoint",
        )

    def _presented_certificate(self):
        """What the server showed, so the admin can compare and upload it.
        Through the connection's proxy when it has one: behind a proxy the
        server is often not reachable directly."""
        from .tls import probe_certificate

        parts = urlsplit(self.settings.endpoint.strip())
        try:
            return probe_certificate(parts.hostname, parts.port or 443,
                                     timeout=min(self.settings.connect_timeout, 10), proxy=self.settings.proxy)
        except (OSError, ValueError) as exc:
            log.info("could not read the certificate of %s: %s", parts.hostname, type(exc).__name__)
            return None


def _network_cause(exc: BaseException) -> bool:
    """exchangelib dresses connection errors up as throttling; those are
    network failures, not a busy server."""
    return find(exc, requests.exceptions.RequestException) is not None or find(exc, OSError) is not None


_SECRETS_IN_URL = re.compile(r"(//)[^/@\s:]+:[^/@\s]+@")


def _describe(exc: BaseException) -> str:
    """Class and first line, with credentials in URLs masked and length capped."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    if isinstance(exc, ResponseMessageError) and not text:
        text = type(exc).__name__
    text = _SECRETS_IN_URL.sub(r"\1***@", text)[:300]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
