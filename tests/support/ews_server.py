"""A local HTTPS Exchange Web Services server for the connector tests.

It speaks enough real EWS for exchangelib: auth-type detection (an
unauthenticated POST answered 401 with `WWW-Authenticate: NTLM` and `Basic`),
version detection (ConvertId, answered with an Exchange 2016
ServerVersionInfo header), GetFolder, FindFolder, FindItem, GetItem with
MimeContent and UpdateItem. Response shapes follow captured Exchange
responses (Viewpoint, ews-java-api, exchangelib test data).

NTLM is checked for real by pyspnego's acceptor, which reads the users from
the file named by NTLM_USER_FILE; Basic and Bearer tokens are checked here.
Like IIS, NTLM authenticates the TCP connection, not each request.

Mailboxes live in memory. Tests make their own accounts (unique addresses)
so one session-scoped server serves every test:

    acct = ews_server.new_account()
    item_id = ews_server.put(acct.address, raw_bytes, folder="Inbox/Phishing")
    ews_server.grant(shared, acct.login)                   # full access (delegate)
    ews_server.grant(shared, acct.login, folder="Inbox")   # rights on the Inbox only
    ews_server.fail(acct.address, "server_busy", back_off_ms=30000)
    assert ews_server.message(item_id).is_read

Fixtures: `ews_server` (session), `make_ews_server` (a second server with a
different certificate or host names).
"""
from __future__ import annotations

import base64
import datetime as dt
import email.parser
import email.policy
import itertools
import os
import secrets
import shutil
import socket
import ssl
import tempfile
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterable, Optional
from xml.sax.saxutils import escape, quoteattr

import pytest
import spnego

from .certs import CertPair, make_cert

SOAP = "http://schemas.xmlsoap.org/soap/envelope/"
MNS = "http://schemas.microsoft.com/exchange/services/2006/messages"
TNS = "http://schemas.microsoft.com/exchange/services/2006/types"
ENS = "http://schemas.microsoft.com/exchange/services/2006/errors"
S, M, T = f"{{{SOAP}}}", f"{{{MNS}}}", f"{{{TNS}}}"

EWS_PATH = "/EWS/Exchange.asmx"
DOMAIN = "intake.test"
# What an Exchange 2016 CU answers: exchangelib reads the build (15.1) and,
# since "V2017_07_11" is not a usable request version, keeps the one it asked with.
SERVER_VERSION = ('<h:ServerVersionInfo xmlns:h="%s" MajorVersion="15" MinorVersion="1" '
                  'MajorBuildNumber="2507" MinorBuildNumber="6" Version="V2017_07_11"/>' % TNS)
# Distinguished folders the server knows, and their display names.
WELL_KNOWN = {"root": "", "msgfolderroot": "Top of Information Store", "inbox": "Inbox"}


# --------------------------------------------------------------------------- state


@dataclass
class StoredMessage:
    id: str
    changekey: str
    mime: bytes
    folder_id: str
    mailbox: str
    received: dt.datetime
    is_read: bool = False
    subject: str = ""
    message_id: str = ""


@dataclass
class StoredFolder:
    id: str
    changekey: str
    name: str
    mailbox: str
    parent_id: Optional[str]
    distinguished: Optional[str] = None
    folder_class: str = "IPF.Note"


@dataclass
class Mailbox:
    address: str
    owner: Optional[str]  # login that owns it; None for a shared mailbox
    folders: dict = field(default_factory=dict)  # id -> StoredFolder
    delegates: set = field(default_factory=set)  # logins with full access
    folder_grants: dict = field(default_factory=dict)  # login -> ids of folders shared with it (and below)
    fault: Optional[dict] = None

    def distinguished(self, name: str) -> Optional[StoredFolder]:
        for f in self.folders.values():
            if f.distinguished == name:
                return f
        return None

    def children(self, folder_id: str) -> list[StoredFolder]:
        return [f for f in self.folders.values() if f.parent_id == folder_id]


@dataclass(frozen=True)
class EwsAccount:
    address: str  # the mailbox's SMTP address
    login: str  # what the user logs in with: the address or DOMAIN\user
    password: str


class EwsError(Exception):
    """One response message in error (ResponseClass="Error")."""

    def __init__(self, code: str, text: str, value_name: str = "", value: str = ""):
        super().__init__(text)
        self.code, self.text, self.value_name, self.value = code, text, value_name, value


class Fault(Exception):
    """The whole request fails: the body is already made."""

    def __init__(self, status: int, body: bytes):
        super().__init__(status)
        self.status, self.body = status, body


def _new_id(kind: bytes) -> str:
    # EWS ids are opaque base64; keep a recognisable prefix for debugging.
    return base64.b64encode(b"INTK" + kind + secrets.token_bytes(18)).decode()


def _new_changekey() -> str:
    return base64.b64encode(b"CQAAABYAAA" + secrets.token_bytes(9)).decode()


class _NtlmUsers:
    """pyspnego's NTLM acceptor finds passwords only through the file named by
    NTLM_USER_FILE, a process-wide setting. Every server in this process
    shares one file so they cannot clobber each other."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str], str] = {}
        self._dir: Optional[Path] = None  # exists while a server runs
        self._saved_env: Optional[str] = None
        self._users = 0

    def add(self, login: str, password: str) -> None:
        domain, _, user = login.rpartition("\\")
        key = (domain.lower(), user.lower())
        with self._lock:
            if self._entries.get(key, password) != password:
                raise ValueError(f"NTLM user {login} already exists with another password")
            self._entries[key] = password
            self._write()

    def _write(self) -> None:
        if self._dir is None:
            return
        path = self._dir / "ntlm_users"
        tmp = self._dir / "ntlm_users.tmp"
        tmp.write_text("".join(f"{d}:{u}:{p}\n" for (d, u), p in self._entries.items()))
        tmp.chmod(0o600)
        tmp.replace(path)  # atomic: an acceptor never reads half a file

    def acquire(self) -> None:
        with self._lock:
            if self._users == 0:
                self._dir = Path(tempfile.mkdtemp(prefix="intake-ntlm-"))
                self._write()
                self._saved_env = os.environ.get("NTLM_USER_FILE")
                os.environ["NTLM_USER_FILE"] = str(self._dir / "ntlm_users")
            self._users += 1

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users:
                return
            if self._saved_env is None:
                os.environ.pop("NTLM_USER_FILE", None)
            else:
                os.environ["NTLM_USER_FILE"] = self._saved_env
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


_NTLM = _NtlmUsers()
_COUNTER = itertools.count(1)


class EwsState:
    """Users, mailboxes, folders and messages; thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.users: dict[str, str] = {}  # login (lower) -> password
        self.tokens: dict[str, str] = {}  # bearer token -> login (lower)
        self.impersonators: set[str] = set()
        self.mailboxes: dict[str, Mailbox] = {}  # address (lower) -> Mailbox
        self.folders: dict[str, StoredFolder] = {}
        self.messages: dict[str, StoredMessage] = {}
        # (operation, principal, mailbox) per handled mailbox operation, for assertions.
        self.log: list[tuple[str, str, str]] = []
        self.logins: list[tuple[str, str]] = []  # (scheme, principal) per successful authentication
        self._last_received = dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)

    # ---- setup API
    def add_user(self, login: str, password: str) -> None:
        with self.lock:
            self.users[login.lower()] = password
        _NTLM.add(login, password)

    def add_mailbox(self, address: str, owner: Optional[str] = None) -> Mailbox:
        with self.lock:
            key = address.lower()
            if key in self.mailboxes:
                raise ValueError(f"mailbox {address} exists")
            mb = Mailbox(address=address, owner=owner.lower() if owner else None)
            self.mailboxes[key] = mb
            root = self._add_folder(mb, WELL_KNOWN["root"], None, "root", folder_class="")
            top = self._add_folder(mb, WELL_KNOWN["msgfolderroot"], root.id, "msgfolderroot", folder_class="")
            self._add_folder(mb, "Inbox", top.id, "inbox")
            return mb

    def _add_folder(self, mb: Mailbox, name: str, parent_id: Optional[str], distinguished: Optional[str] = None,
                    folder_class: str = "IPF.Note") -> StoredFolder:
        f = StoredFolder(_new_id(b"F"), _new_changekey(), name, mb.address, parent_id, distinguished, folder_class)
        mb.folders[f.id] = f
        self.folders[f.id] = f
        return f

    def mailbox(self, address: str) -> Mailbox:
        mb = self.mailboxes.get(address.lower())
        if mb is None:
            raise KeyError(f"no mailbox {address} on this test server")
        return mb

    def folder_by_path(self, address: str, path: str, *, create: bool = False) -> StoredFolder:
        """"Inbox/Phishing" from the inbox; anything else from the top of the
        information store, as Outlook shows it."""
        with self.lock:
            mb = self.mailbox(address)
            parts = [p for p in path.strip("/").split("/") if p]
            if parts and parts[0].lower() == "inbox":
                current, parts = mb.distinguished("inbox"), parts[1:]
            else:
                current = mb.distinguished("msgfolderroot")
            for part in parts:
                match = [f for f in mb.children(current.id) if f.name.lower() == part.lower()]
                if match:
                    current = match[0]
                elif create:
                    current = self._add_folder(mb, part, current.id)
                else:
                    raise KeyError(f"no folder {path} in {address}")
            return current

    def put(self, address: str, raw: bytes, folder: str = "Inbox", *, received: Optional[dt.datetime] = None,
            is_read: bool = False) -> str:
        with self.lock:
            f = self.folder_by_path(address, folder, create=True)
            if received is None:
                # Strictly increasing, so "oldest first" is well defined.
                received = max(dt.datetime.now(dt.timezone.utc).replace(microsecond=0),
                               self._last_received + dt.timedelta(seconds=1))
            self._last_received = max(self._last_received, received)
            headers = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(raw)
            msg = StoredMessage(
                id=_new_id(b"M"), changekey=_new_changekey(), mime=raw, folder_id=f.id, mailbox=f.mailbox,
                received=received, is_read=is_read, subject=str(headers.get("Subject", "") or ""),
                message_id=str(headers.get("Message-ID", "") or ""),
            )
            self.messages[msg.id] = msg
            return msg.id

    # ---- helpers for the protocol side
    def mailbox_of_login(self, login: str) -> Optional[Mailbox]:
        login = login.lower()
        for mb in self.mailboxes.values():
            if mb.owner == login:
                return mb
        return None

    def folder_messages(self, folder_id: str) -> list[StoredMessage]:
        return [m for m in self.messages.values() if m.folder_id == folder_id]


# --------------------------------------------------------------------------- SOAP


def envelope(body: str, *, header: bool = True) -> bytes:
    head = f"<s:Header>{SERVER_VERSION}</s:Header>" if header else ""
    return ('<?xml version="1.0" encoding="utf-8"?>'
            f'<s:Envelope xmlns:s="{SOAP}">{head}'
            '<s:Body xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
            f'xmlns:xsd="http://www.w3.org/2001/XMLSchema">{body}</s:Body></s:Envelope>').encode()


def soap_fault(code: str, text: str, detail_xml: str = "") -> bytes:
    """A SOAP-level fault, as Exchange sends for ErrorServerBusy (HTTP 500)."""
    return envelope(
        "<s:Fault>"
        f'<faultcode xmlns:a="{TNS}">a:{code}</faultcode>'
        f'<faultstring xml:lang="en-US">{escape(text)}</faultstring>'
        "<detail>"
        f'<e:ResponseCode xmlns:e="{ENS}">{code}</e:ResponseCode>'
        f'<e:Message xmlns:e="{ENS}">{escape(text)}</e:Message>'
        f"{detail_xml}</detail></s:Fault>",
        header=False,
    )


def _response(op: str, messages: Iterable[str]) -> str:
    return (f'<m:{op}Response xmlns:m="{MNS}" xmlns:t="{TNS}"><m:ResponseMessages>'
            f'{"".join(messages)}</m:ResponseMessages></m:{op}Response>')


def _ok(op: str, inner: str) -> str:
    return (f'<m:{op}ResponseMessage ResponseClass="Success"><m:ResponseCode>NoError</m:ResponseCode>'
            f'{inner}</m:{op}ResponseMessage>')


def _error(op: str, e: EwsError) -> str:
    xml = ""
    if e.value_name:
        xml = f'<m:MessageXml><t:Value Name={quoteattr(e.value_name)}>{escape(e.value)}</t:Value></m:MessageXml>'
    return (f'<m:{op}ResponseMessage ResponseClass="Error"><m:MessageText>{escape(e.text)}</m:MessageText>'
            f'<m:ResponseCode>{e.code}</m:ResponseCode><m:DescriptiveLinkKey>0</m:DescriptiveLinkKey>{xml}'
            f'</m:{op}ResponseMessage>')


def _folder_xml(state: EwsState, f: StoredFolder) -> str:
    parent = state.folders.get(f.parent_id) if f.parent_id else None
    msgs = state.folder_messages(f.id)
    mb = state.mailboxes[f.mailbox.lower()]
    parts = [f'<t:FolderId Id="{f.id}" ChangeKey="{f.changekey}"/>']
    if parent is not None:
        parts.append(f'<t:ParentFolderId Id="{parent.id}" ChangeKey="{parent.changekey}"/>')
    if f.folder_class:
        parts.append(f"<t:FolderClass>{escape(f.folder_class)}</t:FolderClass>")
    parts += [
        f"<t:DisplayName>{escape(f.name)}</t:DisplayName>",
        f"<t:TotalCount>{len(msgs)}</t:TotalCount>",
        f"<t:ChildFolderCount>{len(mb.children(f.id))}</t:ChildFolderCount>",
        f"<t:UnreadCount>{sum(1 for m in msgs if not m.is_read)}</t:UnreadCount>",
    ]
    return f"<t:Folder>{''.join(parts)}</t:Folder>"


def _ts(d: dt.datetime) -> str:
    return d.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# Item properties in EWS schema order; value renderers.
_ITEM_FIELDS: list[tuple[str, Optional[Callable[[StoredMessage], str]]]] = [
    ("item:MimeContent", lambda m: f'<t:MimeContent CharacterSet="UTF-8">{base64.b64encode(m.mime).decode()}'
                                   "</t:MimeContent>"),
    ("item:ItemId", lambda m: f'<t:ItemId Id="{m.id}" ChangeKey="{m.changekey}"/>'),
    ("item:ParentFolderId", None),  # filled in by _item_xml (needs the folder)
    ("item:ItemClass", lambda m: "<t:ItemClass>IPM.Note</t:ItemClass>"),
    ("item:Subject", lambda m: f"<t:Subject>{escape(m.subject)}</t:Subject>"),
    ("item:DateTimeReceived", lambda m: f"<t:DateTimeReceived>{_ts(m.received)}</t:DateTimeReceived>"),
    ("item:Size", lambda m: f"<t:Size>{len(m.mime)}</t:Size>"),
    ("message:InternetMessageId", lambda m: f"<t:InternetMessageId>{escape(m.message_id)}</t:InternetMessageId>"),
    ("message:IsRead", lambda m: f"<t:IsRead>{'true' if m.is_read else 'false'}</t:IsRead>"),
]


def _item_xml(state: EwsState, m: StoredMessage, fields: set[str]) -> str:
    parts = []
    for uri, render in _ITEM_FIELDS:
        if uri == "item:ItemId":
            parts.append(render(m))
        elif uri == "item:ParentFolderId" and uri in fields:
            f = state.folders[m.folder_id]
            parts.append(f'<t:ParentFolderId Id="{f.id}" ChangeKey="{f.changekey}"/>')
        elif uri in fields and render is not None:
            parts.append(render(m))
    return f"<t:Message>{''.join(parts)}</t:Message>"


def _requested_fields(shape: Optional[ET.Element]) -> set[str]:
    if shape is None:
        return set()
    fields = {e.get("FieldURI") for e in shape.iter(f"{T}FieldURI")}
    base = shape.findtext(f"{T}BaseShape") or "IdOnly"
    if base in ("Default", "AllProperties"):
        fields |= {"item:Subject", "item:DateTimeReceived", "item:Size", "message:IsRead",
                   "message:InternetMessageId", "item:ItemClass", "item:ParentFolderId"}
    return {f for f in fields if f}


# ---- restrictions: the subset exchangelib emits for our queries


def _constant(cond: ET.Element) -> str:
    c = cond.find(f"{T}FieldURIOrConstant/{T}Constant")
    return c.get("Value", "") if c is not None else ""


def _message_value(m: StoredMessage, uri: str):
    return {
        "message:IsRead": "true" if m.is_read else "false",
        "item:Subject": m.subject,
        "item:DateTimeReceived": _ts(m.received),
    }.get(uri)


_XSD_BOOLEAN = {"1": "true", "0": "false"}  # xsd:boolean allows both spellings


def _matches(cond: ET.Element, value_of: Callable[[str], Optional[str]]) -> bool:
    tag = cond.tag.replace(T, "")
    if tag == "And":
        return all(_matches(c, value_of) for c in cond)
    if tag == "Or":
        return any(_matches(c, value_of) for c in cond)
    if tag == "Not":
        return not _matches(cond[0], value_of)
    if tag in ("IsEqualTo", "IsNotEqualTo"):
        uri = cond.find(f"{T}FieldURI").get("FieldURI")
        value, constant = value_of(uri), _constant(cond).lower()
        constant = _XSD_BOOLEAN.get(constant, constant) if value in ("true", "false") else constant
        equal = value is not None and value.lower() == constant  # EWS compares strings case-insensitively
        return equal if tag == "IsEqualTo" else not equal
    raise EwsError("ErrorUnsupportedQueryFilter", f"The test EWS server does not support the restriction {tag}.")


def _restriction(req: ET.Element) -> Optional[ET.Element]:
    r = req.find(f"{M}Restriction")
    return r[0] if r is not None and len(r) else None


def _paging(req: ET.Element, view_tag: str) -> tuple[int, Optional[int]]:
    view = req.find(f"{M}{view_tag}")
    if view is None:
        return 0, None
    offset = int(view.get("Offset", "0"))
    if view.get("BasePoint", "Beginning") != "Beginning":
        raise EwsError("ErrorInvalidIndexedPagingParameters", "Only BasePoint=Beginning is supported here.")
    limit = view.get("MaxEntriesReturned")
    return offset, int(limit) if limit else None


# --------------------------------------------------------------------------- operations


class EwsProtocol:
    """Answers one SOAP request for an authenticated principal."""

    def __init__(self, state: EwsState):
        self.state = state

    def handle(self, principal: str, body: bytes) -> tuple[int, bytes]:
        try:
            root = ET.fromstring(body)
        except ET.ParseError:
            return 500, soap_fault("ErrorSchemaValidation", "The request failed schema validation.")
        req_body = root.find(f"{S}Body")
        if req_body is None or not len(req_body):
            return 500, soap_fault("ErrorInvalidRequest", "The request is invalid.")
        request = req_body[0]
        op = request.tag.replace(M, "")
        header = root.find(f"{S}Header")
        handler = getattr(self, f"op_{op}", None)
        if handler is None:
            return 500, soap_fault("ErrorInvalidRequest", f"The test EWS server does not implement {op}.")
        try:
            acting = self._acting_as(principal, header)
            with self.state.lock:
                return 200, envelope(handler(acting, request))
        except Fault as f:
            return f.status, f.body
        except EwsError as e:
            return 200, envelope(_response(op, [_error(op, e)]))

    # ---- identity and access
    def _acting_as(self, principal: str, header: Optional[ET.Element]) -> tuple[str, Optional[str]]:
        """(principal, impersonated address or None)."""
        imp = header.find(f"{T}ExchangeImpersonation") if header is not None else None
        if imp is None:
            return principal, None
        sid = imp.find(f"{T}ConnectingSID")
        address = next((e.text for e in sid if e.text), "") if sid is not None else ""
        if principal not in self.state.impersonators:
            raise EwsError("ErrorImpersonateUserDenied",
                           "The account does not have permission to impersonate the requested user.")
        if address.lower() not in self.state.mailboxes:
            raise EwsError("ErrorNonExistentMailbox", "The SMTP address has no mailbox associated with it.",
                           "SmtpAddress", address)
        return principal, address.lower()

    def _open_mailbox(self, acting: tuple[str, Optional[str]], address: Optional[str], op: str) -> Mailbox:
        principal, impersonated = acting
        if not address:
            mb = self.state.mailboxes.get(impersonated) if impersonated else self.state.mailbox_of_login(principal)
            if mb is None:
                raise EwsError("ErrorNonExistentMailbox", "The user has no mailbox on this server.")
        else:
            mb = self.state.mailboxes.get(address.lower())
            if mb is None:
                raise EwsError("ErrorNonExistentMailbox", "The SMTP address has no mailbox associated with it.",
                               "SmtpAddress", address)
        self._apply_fault(mb, op)
        if not (self._full_access(acting, mb) or principal in mb.folder_grants):
            raise EwsError("ErrorAccessDenied", "Access is denied. Check credentials and try again.")
        self.state.log.append((op, principal, mb.address.lower()))
        return mb

    @staticmethod
    def _full_access(acting, mb: Mailbox) -> bool:
        principal, impersonated = acting
        return (mb.owner == principal or principal in mb.delegates
                or (impersonated is not None and impersonated == mb.address.lower()))

    def _check_folder_access(self, acting, mb: Mailbox, f: StoredFolder) -> None:
        """A delegate with folder permissions only sees those folders and
        their subfolders; the root above them stays closed."""
        if self._full_access(acting, mb):
            return
        granted = mb.folder_grants.get(acting[0], set())
        node: Optional[StoredFolder] = f
        while node is not None:
            if node.id in granted:
                return
            node = self.state.folders.get(node.parent_id) if node.parent_id else None
        raise EwsError("ErrorAccessDenied", "Access is denied. Check credentials and try again.")

    def _apply_fault(self, mb: Mailbox, op: str) -> None:
        fault = mb.fault
        if not fault or (fault.get("ops") and op not in fault["ops"]):
            return
        if fault["kind"] == "server_busy":
            detail = (f'<t:MessageXml xmlns:t="{TNS}"><t:Value Name="BackOffMilliseconds">'
                      f'{int(fault.get("back_off_ms", 30000))}</t:Value></t:MessageXml>')
            raise Fault(500, soap_fault("ErrorServerBusy",
                                        "The server cannot service this request right now. Try again later.",
                                        detail))
        if fault["kind"] == "invalid_xml":
            # Cut off mid-element, as a proxy or crashed front end does; no
            # XML parser, however forgiving, finds a SOAP Body in it.
            raise Fault(200, b'<?xml version="1.0" encoding="utf-8"?><html><head><title>\x00\x01 Service')
        raise AssertionError(f"unknown fault {fault['kind']}")

    def _folder_ref(self, acting, ref: ET.Element, op: str) -> StoredFolder:
        if ref.tag == f"{T}DistinguishedFolderId":
            name = ref.get("Id", "")
            email_el = ref.find(f"{T}Mailbox/{T}EmailAddress")
            mb = self._open_mailbox(acting, email_el.text if email_el is not None else None, op)
            f = mb.distinguished(name)
            if f is None:
                raise EwsError("ErrorFolderNotFound", "The specified folder could not be found in the store.")
        else:
            f = self.state.folders.get(ref.get("Id", ""))
            if f is None:
                raise EwsError("ErrorFolderNotFound", "The specified folder could not be found in the store.")
            mb = self._open_mailbox(acting, f.mailbox, op)
        self._check_folder_access(acting, mb, f)
        return f

    def _item_ref(self, acting, ref: ET.Element, op: str) -> StoredMessage:
        m = self.state.messages.get(ref.get("Id", ""))
        if m is None:
            raise EwsError("ErrorItemNotFound", "The specified object was not found in the store.")
        mb = self._open_mailbox(acting, m.mailbox, op)
        self._check_folder_access(acting, mb, self.state.folders[m.folder_id])
        return m

    def _each(self, op: str, refs: Iterable[ET.Element], render: Callable[[ET.Element], str]) -> str:
        """One response message per requested id; errors stay per message."""
        out = []
        for ref in refs:
            try:
                out.append(_ok(op, render(ref)))
            except EwsError as e:
                out.append(_error(op, e))
        return _response(op, out)

    # ---- operations
    def op_ConvertId(self, acting, request) -> str:
        # exchangelib sends a dummy ConvertId to learn the server version;
        # Exchange answers this error (with the version header).
        return _response("ConvertId", [_error("ConvertId", EwsError(
            "ErrorInvalidSmtpAddress", "The SMTP address format is invalid."))])

    def op_GetFolder(self, acting, request) -> str:
        refs = list(request.find(f"{M}FolderIds"))
        return self._each("GetFolder", refs, lambda ref: (
            f"<m:Folders>{_folder_xml(self.state, self._folder_ref(acting, ref, 'GetFolder'))}</m:Folders>"))

    def op_FindFolder(self, acting, request) -> str:
        if request.get("Traversal", "Shallow") != "Shallow":
            raise EwsError("ErrorInvalidOperation", "The test EWS server supports only shallow FindFolder.")
        refs = list(request.find(f"{M}ParentFolderIds"))
        cond = _restriction(request)
        offset, limit = _paging(request, "IndexedPageFolderView")

        def render(ref):
            parent = self._folder_ref(acting, ref, "FindFolder")
            mb = self.state.mailboxes[parent.mailbox.lower()]
            found = [f for f in mb.children(parent.id)
                     if cond is None or _matches(cond, lambda uri, f=f: f.name if uri == "folder:DisplayName" else None)]
            return self._page("t:Folders", found, offset, limit, lambda f: _folder_xml(self.state, f))

        return self._each("FindFolder", refs, render)

    def op_FindItem(self, acting, request) -> str:
        if request.get("Traversal", "Shallow") != "Shallow":
            raise EwsError("ErrorInvalidOperation", "The test EWS server supports only shallow FindItem.")
        refs = list(request.find(f"{M}ParentFolderIds"))
        fields = _requested_fields(request.find(f"{M}ItemShape"))
        cond = _restriction(request)
        offset, limit = _paging(request, "IndexedPageItemView")
        order = request.find(f"{M}SortOrder")

        def render(ref):
            folder = self._folder_ref(acting, ref, "FindItem")
            found = [m for m in self.state.folder_messages(folder.id)
                     if cond is None or _matches(cond, lambda uri, m=m: _message_value(m, uri))]
            found = self._sort(found, order)
            return self._page("t:Items", found, offset, limit, lambda m: _item_xml(self.state, m, fields))

        return self._each("FindItem", refs, render)

    @staticmethod
    def _sort(found: list[StoredMessage], order: Optional[ET.Element]) -> list[StoredMessage]:
        # Exchange's default view is newest first.
        found = sorted(found, key=lambda m: m.received, reverse=True)
        if order is None:
            return found
        for fo in reversed(list(order)):
            uri = fo.find(f"{T}FieldURI").get("FieldURI")
            desc = fo.get("Order", "Ascending") == "Descending"
            key = {"item:DateTimeReceived": lambda m: m.received, "item:Subject": lambda m: m.subject.lower(),
                   "item:Size": lambda m: len(m.mime)}.get(uri)
            if key is None:
                raise EwsError("ErrorInvalidPropertyForSortBy", f"Sorting by {uri} is not supported here.")
            found = sorted(found, key=key, reverse=desc)
        return found

    @staticmethod
    def _page(tag: str, found: list, offset: int, limit: Optional[int], render) -> str:
        page = found[offset:offset + limit] if limit is not None else found[offset:]
        end = offset + len(page)
        last = "true" if end >= len(found) else "false"
        return (f'<m:RootFolder IndexedPagingOffset="{end}" TotalItemsInView="{len(found)}" '
                f'IncludesLastItemInRange="{last}"><{tag}>{"".join(render(x) for x in page)}</{tag}></m:RootFolder>')

    def op_GetItem(self, acting, request) -> str:
        fields = _requested_fields(request.find(f"{M}ItemShape"))
        refs = list(request.find(f"{M}ItemIds"))
        return self._each("GetItem", refs, lambda ref: (
            f"<m:Items>{_item_xml(self.state, self._item_ref(acting, ref, 'GetItem'), fields)}</m:Items>"))

    def op_UpdateItem(self, acting, request) -> str:
        changes = list(request.find(f"{M}ItemChanges"))

        def render(change):
            m = self._item_ref(acting, change.find(f"{T}ItemId"), "UpdateItem")
            for upd in change.find(f"{T}Updates"):
                uri_el = upd.find(f"{T}FieldURI")
                uri = uri_el.get("FieldURI") if uri_el is not None else ""
                if uri != "message:IsRead" or upd.tag != f"{T}SetItemField":
                    raise EwsError("ErrorInvalidPropertySet", f"The test EWS server can only set message:IsRead, "
                                                              f"not {uri}.")
                m.is_read = (upd.findtext(f".//{T}IsRead") or "").strip().lower() in ("true", "1")
            m.changekey = _new_changekey()
            return (f'<m:Items><t:Message><t:ItemId Id="{m.id}" ChangeKey="{m.changekey}"/></t:Message></m:Items>'
                    "<m:ConflictResults><t:Count>0</t:Count></m:ConflictResults>")

        return self._each("UpdateItem", changes, render)


# --------------------------------------------------------------------------- HTTP


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: NTLM authenticates the connection
    server_version = "Microsoft-IIS/10.0"
    sys_version = ""
    timeout = 30  # idle keep-alive connections end on their own

    server: "_HttpServer"

    def setup(self) -> None:
        super().setup()
        self._ntlm = None
        self._principal: Optional[str] = None

    def log_message(self, fmt, *args) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        self._send(405, b"", "text/plain")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.path.split("?")[0].lower() != EWS_PATH.lower():
            self._send(404, b"Not Found", "text/plain")
            return
        principal = self._authenticate()
        if principal is None:
            return
        status, payload = self.server.ews.protocol.handle(principal, body)
        self._send(status, payload)

    # ---- auth
    def _authenticate(self) -> Optional[str]:
        auth = self.headers.get("Authorization", "")
        scheme, _, value = auth.partition(" ")
        scheme = scheme.lower()
        if not auth:
            if self._principal is not None:  # an NTLM-authenticated connection
                return self._principal
            self._challenge()
            return None
        if scheme == "basic" and "basic" in self.server.ews.auth_schemes:
            return self._basic(value.strip())
        if scheme == "ntlm" and "ntlm" in self.server.ews.auth_schemes:
            return self._ntlm_step(value.strip())
        if scheme == "bearer":
            login = self.server.ews.state.tokens.get(value.strip())
            if login is None:
                self._challenge()
            else:
                self.server.ews.state.logins.append(("bearer", login))
            return login
        self._challenge()
        return None

    def _basic(self, value: str) -> Optional[str]:
        try:
            login, _, password = base64.b64decode(value).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            login, password = "", ""
        expected = self.server.ews.state.users.get(login.lower())
        if expected is None or not secrets.compare_digest(expected, password):
            self._challenge()
            return None
        self.server.ews.state.logins.append(("basic", login.lower()))
        return login.lower()

    def _ntlm_step(self, value: str) -> Optional[str]:
        token = base64.b64decode(value)
        if self._ntlm is None or token[8:12] == b"\x01\x00\x00\x00":  # a new NEGOTIATE message
            self._ntlm = spnego.server(protocol="ntlm", service="HTTP")
        try:
            out = self._ntlm.step(token)
        except Exception:  # noqa: BLE001 - any acceptor failure is "wrong credentials"
            self._ntlm = None
            self._challenge()
            return None
        if not self._ntlm.complete:
            self._send(401, b"", "text/plain", [("WWW-Authenticate", "NTLM " + base64.b64encode(out).decode())])
            return None
        self._principal = (self._ntlm.client_principal or "").lower()
        self._ntlm = None
        self.server.ews.state.logins.append(("ntlm", self._principal))
        return self._principal

    def _challenge(self) -> None:
        headers = []
        if "ntlm" in self.server.ews.auth_schemes:
            headers.append(("WWW-Authenticate", "NTLM"))
        if "basic" in self.server.ews.auth_schemes:
            headers.append(("WWW-Authenticate", 'Basic realm="127.0.0.1"'))
        self._send(401, b"401 - Unauthorized: Access is denied due to invalid credentials.", "text/html", headers)

    def _send(self, status: int, body: bytes, ctype: str = "text/xml; charset=utf-8",
              headers: Iterable[tuple[str, str]] = ()) -> None:
        # Never "Connection: close" on errors: exchangelib reads that as "server busy".
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    ews: "EwsServer"

    def __init__(self, addr, ctx: ssl.SSLContext):
        self.ssl_context = ctx
        super().__init__(addr, _Handler)

    def finish_request(self, request, client_address) -> None:
        # TLS handshake in the connection's own thread: a client that never
        # finishes it (a certificate probe, a rejected certificate) must not
        # stall the accept loop.
        request.settimeout(10)
        # Headers and body go out as separate writes; without this, Nagle and
        # the client's delayed ACK add ~40 ms to every response.
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            tls = self.ssl_context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return
        try:
            super().finish_request(tls, client_address)
        finally:
            try:
                tls.close()
            except OSError:
                pass

    def handle_error(self, request, client_address) -> None:
        pass  # disconnects mid-request are normal in failure tests


class EwsServer:
    def __init__(self, cert: CertPair, *, host: str = "127.0.0.1", auth_schemes=("ntlm", "basic")):
        self.cert = cert
        self.host = host
        self.auth_schemes = tuple(s.lower() for s in auth_schemes)
        self.state = EwsState()
        self.protocol = EwsProtocol(self.state)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert.cert_path, cert.key_path)
        self._http = _HttpServer((host, 0), ctx)
        self._http.ews = self
        self.port = self._http.server_address[1]
        # A short poll interval keeps shutdown() (session teardown) quick.
        self._thread = threading.Thread(target=self._http.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"ews-{self.port}", daemon=True)

    # ---- lifecycle
    def start(self) -> "EwsServer":
        _NTLM.acquire()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._http.shutdown()
        self._http.server_close()
        _NTLM.release()

    def url_for(self, host: Optional[str] = None) -> str:
        return f"https://{host or self.host}:{self.port}{EWS_PATH}"

    @property
    def url(self) -> str:
        return self.url_for()

    # ---- accounts and mailboxes
    def new_address(self, prefix: str = "user") -> str:
        return f"{prefix}{next(_COUNTER)}-{secrets.token_hex(3)}@{DOMAIN}"

    def new_account(self, prefix: str = "user", *, domain_login: bool = False,
                    password: Optional[str] = None) -> EwsAccount:
        """A user with their own mailbox, logging in with the address or,
        with domain_login=True, as INTAKE\\<local part>."""
        address = self.new_address(prefix)
        login = f"INTAKE\\{address.split('@')[0]}" if domain_login else address
        password = password or secrets.token_urlsafe(12)
        self.state.add_user(login, password)
        self.state.add_mailbox(address, owner=login)
        return EwsAccount(address, login, password)

    def new_shared_mailbox(self, prefix: str = "shared") -> str:
        address = self.new_address(prefix)
        self.state.add_mailbox(address)
        return address

    def grant(self, mailbox: str, login: str, *, folder: Optional[str] = None) -> None:
        """Full access for `login` on `mailbox`, or with `folder` ("Inbox")
        permissions on that folder and below only (no rights on the root)."""
        with self.state.lock:
            mb = self.state.mailbox(mailbox)
            if folder is None:
                mb.delegates.add(login.lower())
            else:
                folder_id = self.state.folder_by_path(mailbox, folder, create=True).id
                mb.folder_grants.setdefault(login.lower(), set()).add(folder_id)

    def add_token(self, token: str, login: str, *, impersonation: bool = False) -> None:
        """Accept `Authorization: Bearer token` as `login`."""
        with self.state.lock:
            self.state.tokens[token] = login.lower()
            if impersonation:
                self.state.impersonators.add(login.lower())

    def add_folder(self, mailbox: str, path: str) -> str:
        return self.state.folder_by_path(mailbox, path, create=True).id

    # ---- mail
    def put(self, mailbox: str, raw: bytes, folder: str = "Inbox", *, received: Optional[dt.datetime] = None,
            is_read: bool = False) -> str:
        """Deliver `raw` into `folder` ("Inbox", "Inbox/Phishing"); returns the item id."""
        return self.state.put(mailbox, raw, folder, received=received, is_read=is_read)

    def message(self, item_id: str) -> StoredMessage:
        with self.state.lock:
            return self.state.messages[item_id]

    def is_read(self, item_id: str) -> bool:
        return self.message(item_id).is_read

    def delete(self, item_id: str) -> None:
        """As if someone deleted the message in Outlook."""
        with self.state.lock:
            del self.state.messages[item_id]

    def logins(self, principal: str) -> list[str]:
        """Auth schemes ("ntlm", "basic", "bearer") `principal` logged in with."""
        with self.state.lock:
            return [scheme for scheme, who in self.state.logins if who == principal.lower()]

    def accesses(self, mailbox: str) -> list[tuple[str, str]]:
        """(operation, login) for every request that touched `mailbox`."""
        with self.state.lock:
            return [(op, who) for op, who, mb in self.state.log if mb == mailbox.lower()]

    # ---- failures
    def fail(self, mailbox: str, kind: str, *, back_off_ms: int = 30000, ops: Iterable[str] = ()) -> None:
        """Make every request touching `mailbox` fail: kind "server_busy"
        (ErrorServerBusy with BackOffMilliseconds) or "invalid_xml".
        `ops` limits it to some operations (e.g. {"FindItem"})."""
        with self.state.lock:
            self.state.mailbox(mailbox).fault = {"kind": kind, "back_off_ms": back_off_ms, "ops": set(ops)}

    def heal(self, mailbox: str) -> None:
        with self.state.lock:
            self.state.mailbox(mailbox).fault = None


def start_ews_server(directory: Path, name: str = "ews", *, hostnames=("localhost", "127.0.0.1"),
                     host: str = "127.0.0.1", auth_schemes=("ntlm", "basic")) -> EwsServer:
    cert = make_cert(directory, name, hostnames=hostnames)
    return EwsServer(cert, host=host, auth_schemes=auth_schemes).start()


@pytest.fixture(scope="session")
def ews_server(tmp_path_factory) -> EwsServer:
    """The shared EWS server (self-signed certificate for localhost/127.0.0.1).
    Use per-test accounts from .new_account()."""
    server = start_ews_server(tmp_path_factory.mktemp("ews"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def make_ews_server(tmp_path_factory):
    """Factory for more servers, each with its own certificate:
    make_ews_server(hostnames=("mail.other.test",), auth_schemes=("basic",))."""
    servers: list[EwsServer] = []

    def make(name: str = "ews-extra", **kw) -> EwsServer:
        server = start_ews_server(tmp_path_factory.mktemp(name), name, **kw)
        servers.append(server)
        return server

    yield make
    for s in servers:
        s.stop()
