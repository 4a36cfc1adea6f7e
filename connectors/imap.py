"""IMAP connections (imapclient), for any IMAP server incl. Exchange/Office 365.

Safety rules this module keeps:

* The password (or OAuth token) is only sent over a verified TLS connection,
  unless the admin chose Encryption "None". With STARTTLS chosen and not
  offered, nothing is sent (`starttls_unavailable`): no silent downgrade.
* Nothing here marks a message read except `mark_read`: fetches use
  BODY.PEEK, so a message the job failed to store stays unread for next time.
* Memory stays bounded: `fetch_raw` fetches large messages in 1 MiB ranges;
  `fetch_raw_batch` streams every body off the socket in pieces of 1 MiB at
  most, whatever its size.

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
import functools
import logging
import re
from typing import BinaryIO, Callable, ContextManager, Iterable, Iterator, Optional

import imapclient
import imapclient.datetime_util
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

    #: fetch_raw: messages larger than this are fetched in CHUNK_SIZE ranges.
    LARGE_MESSAGE = 2 * 1024 * 1024
    #: The most of one message held in memory at once (a range in fetch_raw,
    #: a piece of a streamed body in fetch_raw_batch).
    CHUNK_SIZE = 1024 * 1024
    #: Messages per UID FETCH (list_unread, fetch_raw_batch). Memory does not
    #: depend on it (bodies are streamed); it keeps the command line short.
    BATCH_COUNT = 500
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
        """Oldest first (ascending UID), at most `limit`, metadata in one FETCH
        per BATCH_COUNT messages."""
        if limit <= 0:
            return []
        with self._step("reading"):
            uids = self._unseen_uids()[:limit]
            items: dict[int, RemoteMessage] = {}
            for i in range(0, len(uids), self.BATCH_COUNT):
                self._list_part(uids[i:i + self.BATCH_COUNT], items)
        # A UID missing from the answer was expunged between SEARCH and FETCH.
        return [items[uid] for uid in uids if uid in items]

    def _list_part(self, uids: list[int], items: dict[int, RemoteMessage]) -> None:
        """The FETCH is read directly off the socket (`_fetch_responses`) and
        picked apart with a few regular expressions: imapclient's general
        parser cost more than the rest of the listing."""
        imap = self._client._imap
        wanted = set(uids)

        def literal(text: bytes, size: int):
            # The Message-ID header; anything else (unsolicited) is dropped.
            header = _HEADER_LITERAL.search(text) is not None
            value = _read_literal(imap, size, keep=64 * 1024 if header else 0)
            return value if header and value is not _TOO_LARGE else None

        for text, values in self._fetch_responses(
                _uid_set(uids), b"(UID RFC822.SIZE INTERNALDATE BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])", literal):
            uid = _fetch_uid(text)
            if uid not in wanted or uid in items:
                continue
            size = _RFC822_SIZE.search(text)
            date = _INTERNALDATE.search(text)
            header = next((v for v in values if v is not None), None)
            items[uid] = RemoteMessage(
                key=f"{self.uidvalidity}:{uid}",
                size=int(size.group(1)) if size else 0,
                received=_received(date.group(1)) if date else "",
                message_id=_message_id(header),
                extra={"uid": uid, "folder": self.folder},
            )

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

        One `UID FETCH <uids> (UID BODY.PEEK[])` per BATCH_COUNT messages,
        whatever their sizes, read straight off the socket: each message is
        copied to its destination in pieces of at most CHUNK_SIZE as it
        arrives, so memory stays at about one piece even for a 50 MB message
        (imaplib would hold a whole response, and imapclient's parser would
        walk it; ranged fetches would cost a round trip per piece). For each
        message, `dest_factory(message)` must return a context manager giving
        a writable binary file (e.g. `lambda m: open(path_for(m), "wb")`); it
        is entered, written and exited (closed) here, and exited with the
        exception if the message could not be read completely. Messages
        already gone from the server are left out of the result. Nothing is
        marked read. Raises `uidvalidity_changed` before fetching anything if
        any key is stale."""
        by_uid = {self._uid(m): m for m in messages}
        written: dict[str, int] = {}
        uids = sorted(by_uid)
        for i in range(0, len(uids), self.BATCH_COUNT):
            part = uids[i:i + self.BATCH_COUNT]
            retry = self._stream_bodies(part, by_uid, dest_factory, written)
            for uid in retry:  # the server sent the body before the UID: fetch it alone
                m = by_uid[uid]
                try:
                    with dest_factory(m) as dest:
                        written[m.key] = self.fetch_raw(m, dest)
                except ConnectorError as exc:
                    if exc.diagnosis.code != "message_not_found":
                        raise
        for m in by_uid.values():
            if m.key not in written:
                log.info("IMAP message %s is gone from the server; skipped", m.key)
        return written

    def _stream_bodies(self, uids: list[int], by_uid: dict[int, RemoteMessage], dest_factory,
                       written: dict[str, int]) -> list[int]:
        """One streamed UID FETCH of whole bodies (see fetch_raw_batch).
        Returns the UIDs whose body came before their UID in a response and
        was too large to hold until the UID was known (fetch those alone)."""
        imap = self._client._imap
        retry: list[int] = []

        def literal(text: bytes, size: int):
            if not _BODY_LITERAL.search(text):
                _read_literal(imap, size, keep=0)  # not asked for (unsolicited): dropped
                return None
            uid = _fetch_uid(text)
            if uid is None:
                # The UID comes later in this response (servers choose the
                # order). Hold a small body until then; a large one is dropped
                # and fetched again on its own.
                return _read_literal(imap, size, keep=self.CHUNK_SIZE)
            m = by_uid.get(uid)
            if m is None or m.key in written:
                _read_literal(imap, size, keep=0)
                return None
            with dest_factory(m) as dest:
                _copy_literal(imap, size, dest, self.CHUNK_SIZE)
            written[m.key] = size
            return None

        with self._step("reading"):
            for text, values in self._fetch_responses(_uid_set(uids), b"(UID BODY.PEEK[])", literal):
                body = next((v for v in values if v is not None), None)
                if body is None:
                    continue
                uid = _fetch_uid(text)
                m = by_uid.get(uid)
                if m is None or m.key in written:
                    continue
                if body is _TOO_LARGE:
                    retry.append(uid)
                    continue
                with dest_factory(m) as dest:
                    dest.write(body)
                written[m.key] = len(body)
        return retry

    def _fetch_responses(self, uid_set: bytes, items: bytes, literal) -> Iterator[tuple[bytes, list]]:
        """Send `UID FETCH uid_set items` and yield (text, literal values) for
        each FETCH response, reading the socket directly.

        `literal(text, size)` is called when a literal begins, with the
        response text so far (ending in `{size}`); it must consume exactly
        `size` bytes from the connection and returns the value to keep for
        it. `text` is the whole response with the literals cut out. Other
        untagged responses (EXISTS, EXPUNGE, ...) are skipped. A NO from the
        server (some messages could not be fetched) ends the responses;
        those messages are simply missing. If reading stops half way, the
        connection is unusable and is shut down."""
        imap = self._client._imap
        tag = imap._command("UID", "FETCH", uid_set, items)
        done = False
        try:
            while True:
                line = _read_line(imap)
                if line.startswith(tag + b" "):
                    done = True
                    status = line[len(tag) + 1:].split(b" ", 1)[0].upper()
                    if status == b"BAD":
                        raise IMAPClientError(f"fetch failed: {line.decode('ascii', 'replace')}")
                    if status != b"OK":
                        log.info("IMAP %s:%s FETCH: %s", self.host, self.port, line.decode("ascii", "replace"))
                    return
                parts, values = [line], []
                while (lit := _LITERAL_AT_END.search(line)) is not None:
                    values.append(literal(b"".join(parts), int(lit.group(1))))
                    line = _read_line(imap)
                    parts.append(line)
                if line.startswith(b"* BYE"):
                    raise IMAPClientAbortError(line.decode("ascii", "replace"))
                if _FETCH_RESPONSE.match(parts[0]):
                    yield b"".join(parts), values
        finally:
            imap.tagged_commands.pop(tag, None)
            if not done:
                # Stopped inside the response: what is left of it would be
                # read as the answer to the next command.
                with contextlib.suppress(Exception):
                    self._client.shutdown()

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
            return Diagnosis("server_busy", "The IMAP server could not check the login right now.",
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


#: A line that ends in a literal's announcement: `{size}` (CRLF already cut).
_LITERAL_AT_END = re.compile(rb"\{(\d+)\}\Z")
_FETCH_RESPONSE = re.compile(rb"\* \d+ FETCH ", re.IGNORECASE)
#: The literal about to be read is the whole body, `BODY[] {size}`.
_BODY_LITERAL = re.compile(rb"[( ]BODY\[\] \{\d+\}\Z", re.IGNORECASE)
_UID_ITEM = re.compile(rb"[( ]UID (\d+)", re.IGNORECASE)
_RFC822_SIZE = re.compile(rb"[( ]RFC822\.SIZE (\d+)", re.IGNORECASE)
_INTERNALDATE = re.compile(rb'[( ]INTERNALDATE "([^"]*)"', re.IGNORECASE)
#: The literal about to be read is the header section asked for (servers echo
#: the field list differently, e.g. `BODY[HEADER.FIELDS ("Message-ID")]`).
_HEADER_LITERAL = re.compile(rb"[( ]BODY\[HEADER[^\]]*\] \{\d+\}\Z", re.IGNORECASE)
#: _read_literal's answer for a literal larger than it may keep (it was read and dropped).
_TOO_LARGE = object()


def _read_line(imap) -> bytes:
    """imaplib's _get_line without its debug log, which formats a repr of
    every line (thousands per fetch) into a ring buffer nobody reads."""
    line = imap.readline()
    if not line.endswith(b"\r\n"):
        raise IMAPClientAbortError(f"socket error: unterminated line: {line[:80]!r}" if line else "socket error: EOF")
    return line[:-2]


def _fetch_uid(text: bytes) -> Optional[int]:
    """The UID in a FETCH response's text (literals cut out), if it came yet."""
    m = _UID_ITEM.search(text)
    return int(m.group(1)) if m else None


def _uid_set(uids: list[int]) -> bytes:
    """`1:3,7,9:10` for [1, 2, 3, 7, 9, 10]: runs of consecutive UIDs become
    ranges (they hold exactly the listed UIDs), so the command stays short."""
    out, i = [], 0
    while i < len(uids):
        j = i
        while j + 1 < len(uids) and uids[j + 1] == uids[j] + 1:
            j += 1
        out.append(f"{uids[i]}:{uids[j]}" if j > i else str(uids[i]))
        i = j + 1
    return ",".join(out).encode()


def _read_literal(imap, size: int, keep: int):
    """Read a literal of `size` bytes; returns it if it is at most `keep`
    bytes, else drops it piece by piece and returns _TOO_LARGE."""
    if size <= keep:
        data = imap.read(size)
        if len(data) != size:
            raise IMAPClientAbortError("socket error: EOF inside a literal")
        return data
    _copy_literal(imap, size, None, 1024 * 1024)
    return _TOO_LARGE


def _copy_literal(imap, size: int, dest: Optional[BinaryIO], piece: int) -> None:
    """Copy a literal of `size` bytes to `dest` (None: drop it) in pieces of
    at most `piece` bytes: memory stays at one piece whatever the size."""
    left = size
    while left:
        data = imap.read(min(left, piece))
        if not data:
            raise IMAPClientAbortError("socket error: EOF inside a literal")
        if dest is not None:
            dest.write(data)
        left -= len(data)


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


#: The usual Message-ID header: one line, ASCII, not folded.
_SIMPLE_MESSAGE_ID = re.compile(rb"Message-ID:[ \t]*([\x21-\x7e][\x20-\x7e]*)\r?\n(?![ \t])", re.IGNORECASE)


def _message_id(header: Optional[bytes]) -> str:
    if not header:
        return ""
    simple = _SIMPLE_MESSAGE_ID.match(header)
    if simple:  # what the email parser below gives for it, a hundred times faster
        return " ".join(simple.group(1).decode("ascii").split())
    value = email.message_from_bytes(header).get("Message-ID")
    return " ".join(str(value).split()) if value else ""


#: RFC 3501 date-time, e.g. ` 7-Feb-2026 09:41:03 +0100` (the day may be space-padded).
_INTERNALDATE_FORMAT = re.compile(rb" ?(\d{1,2})-([A-Za-z]{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)\Z")
_MONTHS = {m: i for i, m in enumerate(
    (b"jan", b"feb", b"mar", b"apr", b"may", b"jun", b"jul", b"aug", b"sep", b"oct", b"nov", b"dec"), 1)}


@functools.lru_cache(maxsize=1024)
def _received(internaldate: bytes) -> str:
    """INTERNALDATE as ISO 8601 UTC. Cached: mail arrives in bursts, and a
    listing of hundreds of messages often holds the same second many times."""
    return _iso_utc(_parse_internaldate(internaldate))


def _parse_internaldate(value: bytes):
    m = _INTERNALDATE_FORMAT.match(value)
    month = _MONTHS.get(m.group(2).lower()) if m else None
    if month:  # the format servers send: read here (imapclient's general parser is slow)
        try:
            offset = dt.timedelta(hours=int(m.group(8)), minutes=int(m.group(9)))
            return dt.datetime(int(m.group(3)), month, int(m.group(1)), int(m.group(4)), int(m.group(5)),
                               int(m.group(6)), tzinfo=dt.timezone(-offset if m.group(7) == b"-" else offset))
        except ValueError:
            pass
    try:
        return imapclient.datetime_util.parse_to_datetime(value, normalise=False)
    except ValueError:
        log.info("IMAP unreadable INTERNALDATE %r", value)
        return None


def _iso_utc(value) -> str:
    if not isinstance(value, dt.datetime):
        return ""
    if value.tzinfo is None:  # should not happen with normalise_times off
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.astimezone(dt.timezone.utc).isoformat()
