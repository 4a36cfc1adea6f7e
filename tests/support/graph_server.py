"""A local HTTPS stand-in for the Microsoft Graph mail API (v1.0).

Shaped on Microsoft's documented responses (microsoft-graph-docs): mailFolder
and message JSON, `@odata.nextLink` paging with `$skip`, `$value` MIME as
text/plain, the error body `{"error": {"code", "message", "innerError"}}`,
429 TooManyRequests with Retry-After. It enforces what real Graph enforces
and a connector can get wrong:

* Bearer tokens from the `identity_server` fixture: signature, expiry,
  audience (this server's URL) and permissions: `roles` for app-only,
  `scp` for delegated (Mail.ReadWrite to mark read; the `.Shared` variants,
  plus mailbox access, for someone else's mailbox).
* OData: `$filter` (eq/ne/ge/gt/le/lt, `and`, '' quote escaping), `$orderby`
  with the InefficientFilter rule (ordered properties must lead the
  filter), `$select`, `$top`, `$skip`. Default order is newest first.
* 404 ErrorInvalidUser for unknown mailboxes, ErrorItemNotFound for
  unknown folders and messages.

Fixture `graph_server` (function scope, state reset per test):
    graph_server.put("shared@contoso.example", raw, folder="Inbox/Phishing")
    graph_server.is_read("shared@contoso.example", message_id)
    graph_server.throttle_next(2, retry_after=0.2)
    graph_server.grant_access("shared@contoso.example", "alice@contoso.example")
    graph_server.max_page_size = 2   # server-driven paging
    graph_server.base_url, graph_server.cert, graph_server.requests
"""
from __future__ import annotations

import base64
import datetime as dt
import email
import email.policy
import json
import re
import secrets
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

import pytest

from tests.support.certs import make_cert
from tests.support.identity_server import HttpsServer, IdentityServer, JsonHandler

WELL_KNOWN = {"inbox": "Inbox", "drafts": "Drafts", "sentitems": "Sent Items", "deleteditems": "Deleted Items",
              "junkemail": "Junk Email", "archive": "Archive"}
READ = {"Mail.Read", "Mail.ReadWrite"}
WRITE = {"Mail.ReadWrite"}
READ_SHARED = {"Mail.Read.Shared", "Mail.ReadWrite.Shared"}
WRITE_SHARED = {"Mail.ReadWrite.Shared"}
MESSAGE_PROPERTIES = {"id", "createdDateTime", "lastModifiedDateTime", "receivedDateTime", "sentDateTime",
                      "hasAttachments", "internetMessageId", "subject", "bodyPreview", "importance",
                      "parentFolderId", "conversationId", "isRead", "isDraft", "webLink", "from", "sender",
                      "toRecipients", "changeKey", "categories"}
FOLDER_PROPERTIES = {"id", "displayName", "parentFolderId", "childFolderCount", "unreadItemCount",
                     "totalItemCount", "isHidden"}


def _graph_id(prefix: str = "AAMkAD") -> str:
    # Real ids are URL-safe base64 and often end in "=": callers must escape them.
    return prefix + base64.urlsafe_b64encode(secrets.token_bytes(30)).decode().rstrip("=") + "-_AAA="


@dataclass
class Folder:
    id: str
    name: str
    parent_id: str
    well_known: str = ""


@dataclass
class Message:
    id: str
    folder_id: str
    raw: bytes
    received: dt.datetime
    is_read: bool = False
    headers: dict = field(default_factory=dict)


@dataclass
class Mailbox:
    address: str
    root: Folder
    folders: dict = field(default_factory=dict)  # id -> Folder
    messages: dict = field(default_factory=dict)  # id -> Message
    delegates: set = field(default_factory=set)  # users with Full Access (lower case)


class GraphError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


class GraphServer:
    def __init__(self, directory: Path, identity: IdentityServer):
        self.identity = identity
        self.cert = make_cert(directory, "graph", hostnames=("127.0.0.1", "localhost"),
                              common_name="Intake test Microsoft Graph")
        self._server = HttpsServer(_GraphHandler, self.cert)
        self._server.graph = self
        self.base_url = f"https://127.0.0.1:{self._server.port}"
        self._lock = threading.RLock()
        self.reset()

    def start(self) -> None:
        self._server.start()

    def stop(self) -> None:
        self._server.stop()

    def reset(self) -> None:
        with self._lock:
            self.mailboxes: dict[str, Mailbox] = {}
            self.requests: list[dict] = []  # method, path, query, status
            self.max_page_size = 1000
            self._throttle: list[tuple[int, str]] = []
            self._clock = dt.datetime(2024, 3, 1, 8, 0, tzinfo=dt.timezone.utc)

    # -- fixture API -----------------------------------------------------
    def add_mailbox(self, address: str) -> Mailbox:
        with self._lock:
            key = address.lower()
            if key not in self.mailboxes:
                root = Folder(_graph_id("AQMkAD"), "Top of Information Store", "", "msgfolderroot")
                box = Mailbox(address, root, {root.id: root})
                for wk, name in WELL_KNOWN.items():
                    f = Folder(_graph_id("AQMkAD"), name, root.id, wk)
                    box.folders[f.id] = f
                self.mailboxes[key] = box
            return self.mailboxes[key]

    def add_folder(self, mailbox: str, path: str) -> str:
        """Create `Inbox/Phishing/...` as needed; returns the last folder's id."""
        with self._lock:
            box = self.add_mailbox(mailbox)
            parent = box.root
            for name in [p for p in path.split("/") if p]:
                found = next((f for f in box.folders.values()
                              if f.parent_id == parent.id and f.name.lower() == name.lower()), None)
                if found is None:
                    found = Folder(_graph_id(), name, parent.id)
                    box.folders[found.id] = found
                parent = found
            return parent.id

    def put(self, mailbox: str, raw_bytes: bytes, folder: str = "Inbox", *,
            received: Optional[dt.datetime] = None, is_read: bool = False) -> str:
        """Deliver a message; returns its Graph id. Without `received`,
        each message arrives a minute after the previous one."""
        with self._lock:
            folder_id = self.add_folder(mailbox, folder)
            if received is None:
                self._clock += dt.timedelta(minutes=1)
                received = self._clock
            parsed = email.message_from_bytes(raw_bytes, policy=email.policy.compat32)
            msg = Message(_graph_id(), folder_id, raw_bytes, received.astimezone(dt.timezone.utc), is_read,
                          {k.lower(): str(v) for k, v in parsed.items()})
            self.mailboxes[mailbox.lower()].messages[msg.id] = msg
            return msg.id

    def is_read(self, mailbox: str, message_id: str) -> bool:
        with self._lock:
            return self.mailboxes[mailbox.lower()].messages[message_id].is_read

    def grant_access(self, mailbox: str, username: str) -> None:
        """Full Access for a user on someone else's mailbox (delegated, shared)."""
        with self._lock:
            self.add_mailbox(mailbox).delegates.add(username.lower())

    def throttle_next(self, n: int, retry_after: float | str = 1, status: int = 429) -> None:
        """The next `n` API requests get `status` (429 or 503) with Retry-After."""
        with self._lock:
            self._throttle.extend([(status, str(retry_after))] * n)

    def _take_throttle(self) -> Optional[tuple[int, str]]:
        with self._lock:
            return self._throttle.pop(0) if self._throttle else None


# -- OData bits -------------------------------------------------------------------

_CLAUSE = re.compile(r"\s*(\w+)\s+(eq|ne|ge|gt|le|lt)\s+('(?:[^']|'')*'|true|false|null|[0-9][0-9TZ:.+\-]*)\s*",
                     re.I)


def parse_filter(text: str) -> list[tuple[str, str, object]]:
    """`a eq 'x' and b ge 2024-01-01T00:00:00Z` → [(prop, op, value)]."""
    clauses, pos = [], 0
    while True:
        m = _CLAUSE.match(text, pos)
        if not m:
            raise GraphError(400, "BadRequest", f"Invalid filter clause: {text[pos:pos + 40]!r}")
        prop, op, raw = m.group(1), m.group(2).lower(), m.group(3)
        clauses.append((prop, op, _literal(raw)))
        pos = m.end()
        if pos >= len(text):
            return clauses
        rest = re.match(r"and\s+", text[pos:], re.I)
        if not rest:
            raise GraphError(400, "BadRequest", f"Invalid filter clause: {text[pos:pos + 40]!r}")
        pos += rest.end()


def _literal(raw: str):
    if raw.startswith("'"):
        return raw[1:-1].replace("''", "'")
    low = raw.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "null":
        return None
    try:
        return dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        try:
            return float(raw)
        except ValueError:
            raise GraphError(400, "BadRequest", f"Invalid filter clause: {raw!r}") from None


def _compare(value, op: str, wanted) -> bool:
    if isinstance(value, str) and isinstance(wanted, str):
        value, wanted = value.lower(), wanted.lower()  # Exchange compares strings case-insensitively
    try:
        return {"eq": value == wanted, "ne": value != wanted, "ge": value >= wanted, "gt": value > wanted,
                "le": value <= wanted, "lt": value < wanted}[op]
    except TypeError:
        return False


def _iso(d: dt.datetime) -> str:
    return d.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- HTTP -----------------------------------------------------------------------------

class _GraphHandler(JsonHandler):
    @property
    def graph(self) -> GraphServer:
        return self.server.graph

    def do_GET(self):
        self._dispatch()

    def do_PATCH(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def _dispatch(self) -> None:
        parts = urlsplit(self.path)
        self.query = {k: v[0] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        self.segments = [unquote(s) for s in parts.path.split("/") if s]
        self.request_id = str(uuid.uuid4())
        body = self.read_body()
        status = 500
        try:
            throttled = self.graph._take_throttle()
            if throttled:
                code, message = ("TooManyRequests", "Please retry again later.") if throttled[0] == 429 else \
                    ("ServiceUnavailable", "Service temporarily unavailable, please retry after some time.")
                raise GraphError(throttled[0], code, message, {"Retry-After": throttled[1]})
            status = self._route(body)
        except GraphError as e:
            status = e.status
            self._send_error(e)
        finally:
            with self.graph._lock:
                self.graph.requests.append({"method": self.command, "path": parts.path, "query": self.query,
                                            "status": status})

    def _send_error(self, e: GraphError) -> None:
        inner = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
                 "request-id": self.request_id, "client-request-id": self.request_id}
        if e.status == 429:
            inner.update(code="429", message="Please retry after", status="429")
        self.send_json(e.status, {"error": {"code": e.code, "message": e.message, "innerError": inner}},
                       headers=dict(e.headers, **{"request-id": self.request_id}))

    def _ok(self, obj: dict, status: int = 200) -> int:
        self.send_json(status, obj, headers={"request-id": self.request_id, "client-request-id": self.request_id},
                       content_type="application/json;odata.metadata=minimal;odata.streaming=true;"
                                    "IEEE754Compatible=false;charset=utf-8")
        return status

    # -- routing ----------------------------------------------------------
    def _route(self, body: bytes) -> int:
        s = self.segments
        if len(s) < 3 or s[0] != "v1.0" or s[1] not in ("users", "me"):
            raise GraphError(400, "BadRequest", f"Resource not found for the segment '{s[1] if len(s) > 1 else ''}'.")
        claims = self._authenticate()
        rest = s[3:] if s[1] == "users" else s[2:]
        user = s[2] if s[1] == "users" else (claims.get("upn") or "")
        box = self._mailbox(user, claims)
        m = self.command
        if rest == ["mailFolders"] and m == "GET":
            return self._list_folders(box, box.root)
        if len(rest) == 2 and rest[0] == "mailFolders" and m == "GET":
            return self._ok(self._folder_json(box, self._folder(box, rest[1]), self.query.get("$select")))
        if len(rest) == 3 and rest[0] == "mailFolders" and rest[2] == "childFolders" and m == "GET":
            return self._list_folders(box, self._folder(box, rest[1]))
        if len(rest) == 3 and rest[0] == "mailFolders" and rest[2] == "messages" and m == "GET":
            folder = self._folder(box, rest[1])
            return self._list_messages(box, [x for x in box.messages.values() if x.folder_id == folder.id])
        if rest == ["messages"] and m == "GET":
            return self._list_messages(box, list(box.messages.values()))
        if len(rest) == 2 and rest[0] == "messages":
            msg = self._message(box, rest[1])
            if m == "GET":
                return self._ok(self._message_json(box, msg, self.query.get("$select")))
            if m == "PATCH":
                return self._patch(box, msg, claims, body)
        if len(rest) == 3 and rest[0] == "messages" and rest[2] == "$value" and m == "GET":
            msg = self._message(box, rest[1])
            self.send(200, msg.raw, "text/plain", {"request-id": self.request_id})
            return 200
        raise GraphError(400, "BadRequest", "Resource not found for the segment.")

    # -- auth -------------------------------------------------------------
    def _authenticate(self) -> dict:
        header = self.headers.get("Authorization") or ""
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        claims, why = self.graph.identity.check_token(token, self.graph.base_url)
        if claims is None:
            raise GraphError(401, "InvalidAuthenticationToken", why,
                             {"WWW-Authenticate": 'Bearer realm="", authorization_uri='
                              '"https://login.microsoftonline.com/common/oauth2/authorize", client_id="00000003-0000-'
                              '0000-c000-000000000000"'})
        return claims

    def _permissions(self, claims: dict) -> set:
        return set(claims.get("roles") or []) | set((claims.get("scp") or "").split())

    def _mailbox(self, user: str, claims: dict) -> Mailbox:
        perms = self._permissions(claims)
        if not perms & (READ | READ_SHARED):
            raise GraphError(403, "ErrorAccessDenied", "Access is denied. Check credentials and try again.")
        box = self.graph.mailboxes.get(user.lower())
        if box is None:
            raise GraphError(404, "ErrorInvalidUser", f"The requested user '{user}' is invalid.")
        if "scp" in claims and box.address.lower() != (claims.get("upn") or "").lower():
            # Delegated access to someone else's mailbox: the .Shared
            # permission and Full Access on that mailbox, both.
            if not perms & READ_SHARED or (claims.get("upn") or "").lower() not in box.delegates:
                raise GraphError(403, "ErrorAccessDenied", "Access is denied. Check credentials and try again.")
        return box

    def _can_write(self, box: Mailbox, claims: dict) -> bool:
        perms = self._permissions(claims)
        if "scp" in claims and box.address.lower() != (claims.get("upn") or "").lower():
            return bool(perms & WRITE_SHARED)
        return bool(perms & (WRITE | WRITE_SHARED))

    # -- folders ----------------------------------------------------------
    def _folder(self, box: Mailbox, key: str) -> Folder:
        if key.lower() in WELL_KNOWN or key.lower() == "msgfolderroot":
            return next(f for f in box.folders.values() if f.well_known == key.lower())
        folder = box.folders.get(key)
        if folder is None:
            raise GraphError(404, "ErrorItemNotFound", "The specified object was not found in the store.")
        return folder

    def _folder_json(self, box: Mailbox, f: Folder, select: Optional[str] = None) -> dict:
        children = [c for c in box.folders.values() if c.parent_id == f.id]
        messages = [m for m in box.messages.values() if m.folder_id == f.id]
        full = {"id": f.id, "displayName": f.name, "parentFolderId": f.parent_id,
                "childFolderCount": len(children), "unreadItemCount": sum(not m.is_read for m in messages),
                "totalItemCount": len(messages), "isHidden": False}
        return self._select(full, select, FOLDER_PROPERTIES)

    def _list_folders(self, box: Mailbox, parent: Folder) -> int:
        folders = [f for f in box.folders.values() if f.parent_id == parent.id]
        items = [self._folder_json(box, f) for f in folders]
        items = self._filtered(items, self.query.get("$filter"), {"displayName": "displayName"})
        return self._page(items, default_top=10, select=self.query.get("$select"), props=FOLDER_PROPERTIES)

    # -- messages ---------------------------------------------------------
    def _message(self, box: Mailbox, key: str) -> Message:
        msg = box.messages.get(key)
        if msg is None:
            raise GraphError(404, "ErrorItemNotFound", "The specified object was not found in the store.")
        return msg

    def _message_json(self, box: Mailbox, m: Message, select: Optional[str] = None) -> dict:
        sender = {"emailAddress": {"name": m.headers.get("from", ""), "address": m.headers.get("from", "")}}
        full = {
            "@odata.etag": f'W/"{base64.b64encode(m.id[-12:].encode()).decode()}"',
            "id": m.id, "createdDateTime": _iso(m.received), "lastModifiedDateTime": _iso(m.received),
            "changeKey": m.id[-12:], "categories": [], "receivedDateTime": _iso(m.received),
            "sentDateTime": _iso(m.received), "hasAttachments": "multipart/mixed" in m.headers.get("content-type", ""),
            "internetMessageId": m.headers.get("message-id", "").strip(), "subject": m.headers.get("subject", ""),
            "bodyPreview": "", "importance": "normal", "parentFolderId": m.folder_id,
            "conversationId": "AAQkAD" + m.id[6:20], "isRead": m.is_read, "isDraft": False,
            "webLink": f"https://outlook.office365.com/owa/?ItemID={quote(m.id)}&exvsurl=1&viewmodel=ReadMessageItem",
            "from": sender, "sender": sender, "toRecipients": [],
        }
        return self._select(full, select, MESSAGE_PROPERTIES)

    def _list_messages(self, box: Mailbox, messages: list) -> int:
        query = self.query
        order = [o.strip().split() for o in query.get("$orderby", "").split(",") if o.strip()]
        clauses = parse_filter(query["$filter"]) if query.get("$filter") else []
        if order:
            self._check_efficient(order, clauses)
        props = {"isRead": lambda m: m.is_read, "receivedDateTime": lambda m: m.received,
                 "subject": lambda m: m.headers.get("subject", "")}
        for prop, op, wanted in clauses:
            if prop not in props:
                raise GraphError(400, "BadRequest", f"Could not find a property named '{prop}' on type "
                                 "'microsoft.graph.message'.")
            messages = [m for m in messages if _compare(props[prop](m), op, wanted)]
        # Without $orderby Graph lists newest first: a connector that wants
        # oldest first has to say so.
        keys = order or [["receivedDateTime", "desc"]]
        for prop, *direction in reversed(keys):
            if prop not in props:
                raise GraphError(400, "BadRequest", f"Could not find a property named '{prop}' on type "
                                 "'microsoft.graph.message'.")
            messages.sort(key=props[prop], reverse=bool(direction) and direction[0].lower() == "desc")
        items = [self._message_json(box, m) for m in messages]
        return self._page(items, default_top=10, select=query.get("$select"), props=MESSAGE_PROPERTIES)

    def _check_efficient(self, order: list, clauses: list) -> None:
        """Graph: properties in $orderby must also be in $filter, in the same
        order, before any other property."""
        ordered = [o[0].lower() for o in order]
        filtered = [c[0].lower() for c in clauses]
        if filtered[:len(ordered)] != ordered:
            raise GraphError(400, "InefficientFilter", "The restriction or sort order is too complex for this "
                             "operation.")

    def _patch(self, box: Mailbox, msg: Message, claims: dict, body: bytes) -> int:
        if not self._can_write(box, claims):
            raise GraphError(403, "ErrorAccessDenied", "Access is denied. Check credentials and try again.")
        try:
            changes = json.loads(body or b"{}")
        except ValueError:
            raise GraphError(400, "BadRequest", "Unable to read JSON request payload.") from None
        if "isRead" in changes:
            msg.is_read = bool(changes["isRead"])
        return self._ok(self._message_json(box, msg))

    # -- OData helpers ------------------------------------------------------
    def _filtered(self, items: list, text: Optional[str], allowed: dict) -> list:
        if not text:
            return items
        for prop, op, wanted in parse_filter(text):
            if prop not in allowed:
                raise GraphError(400, "BadRequest", f"Could not find a property named '{prop}'.")
            items = [i for i in items if _compare(i.get(allowed[prop]), op, wanted)]
        return items

    def _select(self, full: dict, select: Optional[str], props: set) -> dict:
        if not select:
            return full
        wanted = [p.strip() for p in select.split(",") if p.strip()]
        for p in wanted:
            if p not in props:
                raise GraphError(400, "BadRequest", f"Could not find a property named '{p}'.")
        keep = set(wanted) | {"id", "@odata.etag"}
        return {k: v for k, v in full.items() if k in keep}

    def _page(self, items: list, *, default_top: int, select: Optional[str], props: set) -> int:
        try:
            top = int(self.query.get("$top", default_top))
            skip = int(self.query.get("$skip", 0))
        except ValueError:
            raise GraphError(400, "BadRequest", "Invalid $top or $skip value.") from None
        size = max(1, min(top, 1000, self.graph.max_page_size))
        page = [self._select(i, select, props) for i in items[skip:skip + size]]
        body = {"@odata.context": f"{self.graph.base_url}/v1.0/$metadata#users('{self.segments[2]}')/"
                                  f"{self.segments[-1]}", "value": page}
        if skip + size < len(items):
            params = dict(self.query, **{"$skip": str(skip + size)})
            path = "/".join(quote(s, safe="@") for s in self.segments)
            body["@odata.nextLink"] = f"{self.graph.base_url}/{path}?{urlencode(params, quote_via=quote)}"
        return self._ok(body)


# -- pytest plugin -------------------------------------------------------------------

@pytest.fixture(scope="session")
def _graph_service(tmp_path_factory, _identity_platform):
    server = GraphServer(tmp_path_factory.mktemp("graph"), _identity_platform)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def graph_server(_graph_service, identity_server) -> GraphServer:
    """Graph with no mailboxes; tokens come from `identity_server`."""
    _graph_service.reset()
    return _graph_service
