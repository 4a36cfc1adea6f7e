"""IMAP connections (imapclient), for any IMAP server incl. Exchange/Office 365.

Safety rules this module keeps:

* The password (or OAuth token) is only sent over a verified TLS connection,
  unless the admin chose Encryption "None". With STARTTLS chosen and not
  offered, nothing is sent (`starttls_unavailable`): no silent downgrade.
* Nothing here marks a message read except `mark_read`: fetches use
  BODY.PEEK, so a message the job failed to store stays unread for next time.
* Memory stays bounded: large messages are fetched in 1 MiB ranges, batches of
  small ones are capped in bytes.

Message keys are "UIDVALIDITY:UID". A UID only means something together with
the folder's UIDVALIDITY; if the server resets it (folder recreated, server
migrated), old keys must not be used to fetch or flag, or we would touch the
wrong messages.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import email
import logging
from typing import BinaryIO, Callable, ContextManager, Iterable, Iterator, Optional

import imapclient
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError, LoginError

from .base import (CheckResult, ConnectionSettings, Connector, Progress, RemoteMessage, _no_progress,
                   split_mailbox)
from .errors import ConnectorError, Diagnosis, diagnose_network
from .tls import client_context, probe_certificate

log = logging.getLogger(__name__)

ENCRYPTIONS = ("ssl", "starttls", "none")
_CERT_CODES = frozenset({"untrusted_certificate", "hostname_mismatch", "certificate_expired",
                         "certificate_not_yet_valid"})
_WHAT = "the IMAP server"


class ImapConnector(Connector):
    protocol = "imap"

    #: Messages larger than this are fetched in CHUNK_SIZE ranges.
    LARGE_MESSAGE = 2 * 1024 * 1024
    CHUNK_SIZE = 1024 * 1024
    #: fetch_raw_batch: at most this many bytes / messages per UID FETCH.
    #: imaplib holds a whole FETCH response in memory, so this caps memory.
    BATCH_BYTES = 8 * 1024 * 1024
    BATCH_COUNT = 200
    #: UIDs per STORE command, to keep command lines short.
    FLAG_BATCH = 500

    def __init__(self, settings: ConnectionSettings, progress: Progress = _no_progress, *,
                 access_token: Optional[str] = None):
        super().__init__(settings, progress)
        self._access_token = access_token
        self._client: Optional[imapclient.IMAPClient] = None
        self.encryption = (settings.encryption or "ssl").strip().lower()
        self.host = (settings.host or "").strip()
        self.port = int(settings.port or (993 if self.encryption == "ssl" else 143))
        self.folder: Optional[str] = None  # the server's name for the selected folder
        self.uidvalidity: Optional[int] = None
        self._delimiter: Optional[str] = None
        self._tls_version = ""

    # -- open / close --------------------------------------------------------

    def open(self) -> None:
        try:
            with self._step("connecting", progress=True):
                self._connect()
            with self._step("logging in", progress=True):
                self._login()
            with self._step("opening folder", progress=True):
                self._select_source_folder()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        try:
            client.logout()
        except Exception:
            with contextlib.suppress(Exception):
                client.shutdown()

    def _connect(self) -> None:
        if self.encryption not in ENCRYPTIONS:
            raise ConnectorError(Diagnosis(
                "invalid_settings", f"Unknown encryption method \u201c{self.settings.encryption}\u201d.",
                "Choose SSL/TLS, STARTTLS or None.", field="encryption"))
        if not self.host:
            raise ConnectorError(Diagnosis("invalid_settings", "The IMAP server's host name is empty.",
                                           "Enter the host name or IP address of the mail server.", field="host"))
        ctx = self._tls_context() if self.encryption != "none" else None
        timeout = imapclient.SocketTimeout(connect=self.settings.connect_timeout, read=self.settings.read_timeout)
        implicit = self.encryption == "ssl"
        log.info("IMAP connecting to %s:%s (%s)", self.host, self.port, self.encryption)
        client = imapclient.IMAPClient(self.host, self.port, ssl=implicit, ssl_context=ctx if implicit else None,
                                       timeout=timeout)
        self._client = client
        client.normalise_times = False  # keep the server's time zone; we convert to UTC
        _quiet_imaplib(client)
        if self.encryption == "starttls":
            # The capability list from the greeting, before anything is sent.
            if not client.has_capability("STARTTLS"):
                raise ConnectorError(self._starttls_unavailable())
            client.starttls(ctx)
        sock = client.socket()
        self._tls_version = sock.version() if hasattr(sock, "version") else ""

    def _tls_context(self):
        try:
            return client_context(self.settings.trusted_cert_pem)
        except ValueError as exc:
            raise ConnectorError(Diagnosis(
                "invalid_certificate_upload", str(exc),
                "Remove the uploaded certificate and upload the server's certificate again.",
                field="trusted_certificate")) from exc

    def _login(self) -> None:
        client, s = self._client, self.settings
        if s.oauth is not None:
            if not self._access_token:
                raise ConnectorError(Diagnosis(
                    "unexpected", "No OAuth access token was available for the IMAP sign-in.",
                    "Sign in with Microsoft again on the connection page, then test again."))
            # XOAUTH2 names the mailbox to open; for a shared mailbox that is
            # the shared address, used with the delegate's token.
            _, mailbox = split_mailbox(s.email_address)
            log.info("IMAP XOAUTH2 login to %s:%s as %s", self.host, self.port, mailbox)
            client.oauth2_login(mailbox, self._access_token)
            return
        if self.encryption == "none" and client.has_capability("LOGINDISABLED"):
            raise ConnectorError(self._encryption_required())
        # The address goes to LOGIN exactly as typed, shared-mailbox form
        # included: Exchange's IMAP takes "user@dom\shared" as one login name
        # and opens the shared mailbox, Dovecot master users have their own
        # syntax. Splitting it and logging in as the primary would silently
        # open the wrong mailbox.
        login = s.email_address.strip()
        log.info("IMAP login to %s:%s as %s", self.host, self.port, login)
        client.login(login, s.password)

    # -- folders -------------------------------------------------------------

    @property
    def folder_path(self) -> str:
        """The selected folder as the admin types it ("/" between levels)."""
        if self.folder is None:
            return ""
        return self.folder.replace(self._delimiter, "/") if self._delimiter else self.folder

    def _select_source_folder(self) -> None:
        typed = (self.settings.source_folder or "").strip().strip("/")
        if not typed or typed.upper() == "INBOX":
            name = "INBOX"
        else:
            name = self._server_name(typed)
        try:
            info = self._client.select_folder(name, readonly=False)
        except IMAPClientAbortError:
            raise
        except IMAPClientError as exc:
            # Not under the translated name: maybe a literal "/" in a name, or
            # different capitalisation ("inbox/Phishing" for "INBOX.Phishing").
            match = self._find_folder(typed or "INBOX", name)
            if match is None:
                raise ConnectorError(self._folder_not_found(typed or "INBOX", str(exc))) from exc
            name, info = match, self._client.select_folder(match, readonly=False)
        # Read-write on purpose: on a read-only (EXAMINE) folder, servers
        # silently ignore the \Seen flag mark_read sets.
        self.folder = name
        self.uidvalidity = int(info[b"UIDVALIDITY"])
        log.info("IMAP %s:%s opened %r (UIDVALIDITY %s)", self.host, self.port, name, self.uidvalidity)

    def _hierarchy_delimiter(self) -> Optional[str]:
        if self._delimiter is None:
            # LIST "" "" returns just the delimiter (RFC 3501 6.3.8).
            rows = self._client.list_folders("", "")
            delim = rows[0][1] if rows else None
            self._delimiter = delim.decode() if isinstance(delim, bytes) else delim
        return self._delimiter

    def _server_name(self, typed: str) -> str:
        delim = self._hierarchy_delimiter()
        return typed.replace("/", delim) if delim else typed

    def _find_folder(self, typed: str, translated: str) -> Optional[str]:
        names = self._selectable_folders()
        for candidate in (translated, typed):
            if candidate in names:
                return candidate
        lowered = {translated.lower(), typed.lower()}
        matches = [n for n in names if n.lower() in lowered]
        return matches[0] if len(matches) == 1 else None

    def _selectable_folders(self) -> list[str]:
        return [name for flags, _delim, name in self._client.list_folders()
                if b"\\Noselect" not in flags and b"\\NonExistent" not in flags]

    def _folder_not_found(self, typed: str, server_says: str) -> Diagnosis:
        try:
            names = sorted(self._selectable_folders(), key=lambda n: (n.upper() != "INBOX", n.lower()))
        except Exception:  # the hint is a nicety; the diagnosis is what matters
            names = []
        delim = self._delimiter
        shown = [n.replace(delim, "/") if delim else n for n in names[:10]]
        more = f" and {len(names) - 10} more" if len(names) > 10 else ""
        hint = "Type the folder path with \u201c/\u201d between levels (for example Inbox/Phishing), " \
               "or leave Source Folder blank to use the Inbox."
        if shown:
            hint = f"Folders in this mailbox include: {', '.join(shown)}{more}. " + hint
        return Diagnosis(
            "folder_not_found",
            f"The folder \u201c{typed}\u201d was not found in the mailbox {self.settings.email_address.strip()}.",
            hint, field="source_folder", extra={"server_response": self._redact(server_says)})

    # -- Connector API ---------------------------------------------------------

    def check(self) -> CheckResult:
        with self._step("reading"):
            unread = len(self._unseen_uids())
        how = {"ssl": "SSL/TLS", "starttls": "STARTTLS", "none": "no encryption"}[self.encryption]
        detail = f"Connected with {how}" + (f" ({self._tls_version})" if self._tls_version else "")
        return CheckResult(folder=self.folder_path, unread=unread, detail=detail)

    def list_unread(self, limit: int) -> list[RemoteMessage]:
        """Oldest first (ascending UID), at most `limit`, metadata in one FETCH."""
        if limit <= 0:
            return []
        with self._step("reading"):
            uids = self._unseen_uids()[:limit]
            if not uids:
                return []
            data = self._client.fetch(uids, [b"RFC822.SIZE", b"INTERNALDATE",
                                             b"BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"])
        messages = []
        for uid in uids:
            item = data.get(uid)
            if item is None:  # expunged between SEARCH and FETCH
                continue
            messages.append(RemoteMessage(
                key=f"{self.uidvalidity}:{uid}",
                size=int(item.get(b"RFC822.SIZE") or 0),
                received=_iso_utc(item.get(b"INTERNALDATE")),
                message_id=_message_id(_find_item(item, b"BODY[HEADER")),
                extra={"uid": uid, "folder": self.folder},
            ))
        return messages

    def fetch_raw(self, message: RemoteMessage, dest: BinaryIO) -> int:
        """Write the message to `dest` without setting \\Seen. Messages above
        LARGE_MESSAGE are fetched in CHUNK_SIZE ranges (BODY.PEEK[]<off.len>),
        so memory stays at about one chunk. Raises ConnectorError
        `uidvalidity_changed` or `message_not_found`; after a failure `dest`
        may hold part of the message and must be discarded."""
        uid = self._uid(message)
        with self._step("reading"):
            size = message.size or self._size_of(uid)
            if size > self.LARGE_MESSAGE:
                return self._fetch_chunked(uid, dest)
            item = self._client.fetch([uid], [b"BODY.PEEK[]"]).get(uid)
            body = item.get(b"BODY[]") if item else None
            if body is None:
                raise ConnectorError(self._message_gone(message))
            dest.write(body)
            return len(body)

    def fetch_raw_batch(self, messages: Iterable[RemoteMessage],
                        dest_factory: Callable[[RemoteMessage], ContextManager[BinaryIO]]) -> dict[str, int]:
        """Fetch many messages with few round trips; returns {key: bytes written}.

        Consecutive small messages share one `UID FETCH ... BODY.PEEK[]`
        (up to BATCH_COUNT messages / BATCH_BYTES), large ones are fetched in
        chunks as in `fetch_raw`. For each message, `dest_factory(message)`
        must return a context manager giving a writable binary file (e.g.
        `lambda m: open(path_for(m), "wb")`); it is entered, written and
        exited (closed) here. Messages already gone from the server are left
        out of the result (for a large one, its destination may have been
        opened and be empty). Nothing is marked read. Raises
        `uidvalidity_changed` before fetching anything if any key is stale."""
        messages = list(messages)
        uids = {m.key: self._uid(m) for m in messages}
        written: dict[str, int] = {}
        bundle: list[RemoteMessage] = []
        bundle_bytes = 0
        for m in messages:
            small = 0 < m.size <= self.LARGE_MESSAGE
            if bundle and (not small or len(bundle) >= self.BATCH_COUNT
                           or bundle_bytes + m.size > self.BATCH_BYTES):
                self._fetch_bundle(bundle, uids, dest_factory, written)
                bundle, bundle_bytes = [], 0
            if small:
                bundle.append(m)
                bundle_bytes += m.size
                continue
            try:  # large, or size unknown: fetch_raw decides on chunking
                with dest_factory(m) as dest:
                    written[m.key] = self.fetch_raw(m, dest)
            except ConnectorError as exc:
                if exc.diagnosis.code != "message_not_found":
                    raise
                log.info("IMAP message %s is gone from the server; skipped", m.key)
        if bundle:
            self._fetch_bundle(bundle, uids, dest_factory, written)
        return written

    def _fetch_bundle(self, bundle, uids, dest_factory, written) -> None:
        with self._step("reading"):
            data = self._client.fetch([uids[m.key] for m in bundle], [b"BODY.PEEK[]"])
        for m in bundle:
            body = (data.get(uids[m.key]) or {}).get(b"BODY[]")
            if body is None:
                log.info("IMAP message %s is gone from the server; skipped", m.key)
                continue
            with dest_factory(m) as dest:
                dest.write(body)
            written[m.key] = len(body)

    def mark_read(self, messages: Iterable[RemoteMessage]) -> None:
        """Set \\Seen. Keys from an older UIDVALIDITY are skipped (their UIDs
        may now name other messages)."""
        uids = []
        for m in messages:
            uv, uid = _parse_key(m.key)
            if uv != self.uidvalidity:
                log.warning("IMAP not marking %s read: folder UIDVALIDITY is now %s", m.key, self.uidvalidity)
                continue
            uids.append(uid)
        with self._step("reading"):
            for i in range(0, len(uids), self.FLAG_BATCH):
                self._client.add_flags(uids[i:i + self.FLAG_BATCH], [imapclient.SEEN], silent=True)

    # -- helpers ---------------------------------------------------------------

    def _unseen_uids(self) -> list[int]:
        # UNDELETED: a message flagged for deletion is on its way out.
        return sorted(int(u) for u in self._client.search(["UNSEEN", "UNDELETED"]))

    def _size_of(self, uid: int) -> int:
        item = self._client.fetch([uid], [b"RFC822.SIZE"]).get(uid)
        if item is None:
            raise ConnectorError(self._message_gone(RemoteMessage(key=f"{self.uidvalidity}:{uid}")))
        return int(item.get(b"RFC822.SIZE") or 0)

    def _fetch_chunked(self, uid: int, dest: BinaryIO) -> int:
        # Read until a short chunk rather than trusting RFC822.SIZE, which
        # some servers (Exchange) only approximate.
        offset = 0
        while True:
            item = self._client.fetch([uid], [f"BODY.PEEK[]<{offset}.{self.CHUNK_SIZE}>".encode()]).get(uid)
            if item is None:
                raise ConnectorError(self._message_gone(RemoteMessage(key=f"{self.uidvalidity}:{uid}")))
            chunk = _find_item(item, b"BODY[]<") or b""
            dest.write(chunk)
            offset += len(chunk)
            if len(chunk) < self.CHUNK_SIZE:
                return offset

    def _uid(self, message: RemoteMessage) -> int:
        uv, uid = _parse_key(message.key)
        if uv != self.uidvalidity:
            raise ConnectorError(Diagnosis(
                "uidvalidity_changed",
                f"The folder {self.folder_path or 'INBOX'} was reset on the server (its UIDVALIDITY changed "
                f"from {uv} to {self.uidvalidity}), so messages listed earlier can no longer be identified "
                "safely.",
                "Nothing to do: Intake lists the folder again on the next run. This happens when a "
                "folder is deleted and recreated or the mailbox is moved to another server."))
        return uid

    def _message_gone(self, message: RemoteMessage) -> Diagnosis:
        return Diagnosis(
            "message_not_found",
            f"Message {message.key} is no longer in the folder {self.folder_path}.",
            "It was probably moved or deleted by someone else; nothing to do.")

    @contextlib.contextmanager
    def _step(self, stage: str, *, progress: bool = False) -> Iterator[None]:
        """Report `stage` and turn any failure inside into a ConnectorError."""
        if progress:
            self.progress(stage)
        try:
            yield
        except ConnectorError:
            raise
        except Exception as exc:
            diagnosis = self._diagnose(exc, stage)
            log.warning("IMAP %s:%s failed while %s: %s (%s)", self.host, self.port, stage,
                        diagnosis.code, type(exc).__name__)
            raise ConnectorError(diagnosis) from exc

    # -- diagnosis -------------------------------------------------------------

    def _diagnose(self, exc: BaseException, stage: str) -> Diagnosis:
        d = diagnose_network(exc, self.host, self.port, what=_WHAT)
        if d is not None:
            if d.code in _CERT_CODES:
                d = dataclasses.replace(d, certificate=self._probe())
            elif d.code == "timeout" and stage == "connecting" and self.encryption != "ssl":
                d = dataclasses.replace(d, hint=d.hint + " If this port expects SSL/TLS from the start "
                                        "(usually 993), choose SSL/TLS encryption.")
            return d
        if isinstance(exc, LoginError):
            return self._login_failed(exc)
        if isinstance(exc, IMAPClientAbortError):
            return Diagnosis(
                "connection_lost", f"The IMAP server at {self.host}:{self.port} closed the connection "
                f"while {stage}.", "Try again. If it keeps happening, check the server's logs and limits.",
                extra={"server_response": self._redact(str(exc))})
        if stage == "opening folder" and isinstance(exc, IMAPClientError):
            return self._folder_not_found((self.settings.source_folder or "INBOX").strip(), str(exc))
        return Diagnosis(
            "unexpected",
            f"Unexpected error while {stage} ({type(exc).__name__}: {self._redact(str(exc))[:300]}).",
            "Try again. If it keeps happening, send this message and the worker log to your Intake administrator.")

    def _login_failed(self, exc: BaseException) -> Diagnosis:
        said = self._redact(str(exc))
        extra = {"server_response": said}
        if "UNAVAILABLE" in said:
            return Diagnosis("server_busy", f"The IMAP server could not check the login right now.",
                             "This is temporary on the server's side; try again in a few minutes.", extra=extra)
        if "PRIVACYREQUIRED" in said:
            return self._encryption_required()
        if self.settings.oauth is not None:
            return Diagnosis(
                "auth_failed",
                f"The IMAP server rejected the OAuth sign-in for {split_mailbox(self.settings.email_address)[1]}.",
                "Check that the app has the IMAP permission (IMAP.AccessAsUser.All or IMAP.AccessAsApp), that "
                "IMAP is enabled for the mailbox, and that the account may open it; then sign in again.",
                field="email_address", extra=extra)
        return Diagnosis(
            "auth_failed",
            f"The IMAP server rejected the email address or password for "
            f"{self.settings.email_address.strip()}.",
            "Check the password and the email address. For a shared mailbox use "
            "primary@domain\\shared@domain with the primary account's password. Microsoft 365 and Gmail "
            "refuse passwords over IMAP: use OAuth or an app password there.",
            field="password", extra=extra)

    def _starttls_unavailable(self) -> Diagnosis:
        return Diagnosis(
            "starttls_unavailable",
            f"The IMAP server at {self.host}:{self.port} does not offer STARTTLS, so Intake did not "
            "send the password.",
            "Choose SSL/TLS if the server supports it (usually port 993), or ask the mail administrator to "
            "enable STARTTLS. Choose None only on a network you trust: the password would travel unencrypted.",
            field="encryption")

    def _encryption_required(self) -> Diagnosis:
        return Diagnosis(
            "encryption_required",
            f"The IMAP server at {self.host}:{self.port} does not accept passwords without encryption.",
            "Choose STARTTLS (usually port 143) or SSL/TLS (usually port 993).", field="encryption")

    def _probe(self):
        """The certificate the server presents, to show beside a TLS failure."""
        try:
            return probe_certificate(self.host, self.port,
                                     starttls="imap" if self.encryption == "starttls" else None,
                                     timeout=self.settings.connect_timeout)
        except Exception as exc:  # the diagnosis stands without the certificate
            log.info("IMAP could not read the certificate of %s:%s: %s", self.host, self.port, exc)
            return None

    def _redact(self, text: str) -> str:
        for secret in (self.settings.password, self._access_token):
            if secret and len(secret) >= 3:
                text = text.replace(secret, "***")
        return text


def _quiet_imaplib(client: imapclient.IMAPClient) -> None:
    """imapclient sets imaplib's debug level to 5 and routes it to the
    "imapclient.imaplib" logger. At that level imaplib formats a repr of every
    response it keeps, message bodies included, before the logger drops it:
    a 1 MiB chunk or an 8 MiB batch costs several times its size in CPU and
    memory for nothing. Keep that output only when the logger would print it."""
    if not logging.getLogger("imapclient.imaplib").isEnabledFor(logging.DEBUG):
        client._imap.debug = 0


def _parse_key(key: str) -> tuple[int, int]:
    uv, _, uid = key.partition(":")
    return int(uv), int(uid)


def _find_item(item: dict, prefix: bytes):
    """A FETCH item by key prefix: servers echo section names differently
    (e.g. `BODY[HEADER.FIELDS ("Message-ID")]`, `BODY[]<1048576>`)."""
    for k, v in item.items():
        if isinstance(k, bytes) and k.upper().startswith(prefix):
            return v
    return None


def _message_id(header: Optional[bytes]) -> str:
    if not header:
        return ""
    value = email.message_from_bytes(header).get("Message-ID")
    return " ".join(str(value).split()) if value else ""


def _iso_utc(value) -> str:
    if not isinstance(value, dt.datetime):
        return ""
    if value.tzinfo is None:  # should not happen with normalise_times off
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.astimezone(dt.timezone.utc).isoformat()
