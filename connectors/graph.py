"""Microsoft Graph mail (the successor of EWS for Exchange Online).

Every call goes through the connection's `session_for(settings)` (its proxy
and trust) with a Bearer token from `TokenProvider`: app-only (`.default`,
application permission Mail.ReadWrite) when no account is signed in,
delegated (Mail.ReadWrite, or Mail.ReadWrite.Shared for someone else's
mailbox) otherwise. The mailbox is always addressed as
`/v1.0/users/{mailbox}`, the part after the backslash in the seed's
`primary\\shared` form.
"""
from __future__ import annotations

import email.utils
import logging
import time
from typing import BinaryIO, Callable, Iterable, Optional
from urllib.parse import quote, urlsplit

import requests

from .base import CheckResult, ConnectionSettings, Connector, Progress, RemoteMessage, split_mailbox
from .errors import ConnectorError, Diagnosis
from .http import diagnose_http, session_for, with_presented_certificate
from .oauth import GRAPH_READ_WRITE, GRAPH_READ_WRITE_SHARED, Token, TokenProvider, graph_scopes

log = logging.getLogger(__name__)

# Well-known folder names work whatever the mailbox's language ("Posteingang"
# is still `inbox`), so a first path segment naming one is looked up that way.
_WELL_KNOWN = {"inbox": "inbox", "junk email": "junkemail", "junk": "junkemail", "archive": "archive",
               "sent items": "sentitems", "deleted items": "deleteditems", "drafts": "drafts"}
# Graph refuses `$orderby=receivedDateTime` unless receivedDateTime also
# leads `$filter` (InefficientFilter); this lower bound is always true.
_UNREAD_FILTER = "receivedDateTime ge 1900-01-01T00:00:00Z and isRead eq false"
_MAILBOX_GONE = {"ErrorInvalidUser", "ResourceNotFound", "MailboxNotEnabledForRESTAPI", "ErrorNonExistentMailbox",
                 "MailboxNotFound"}


def _quiet(_step: str) -> None:
    pass


class GraphConnector(Connector):
    protocol = "graph"

    PAGE_SIZE = 100  # $top: Graph allows up to 1000, but smaller pages keep each answer quick
    MAX_ATTEMPTS = 4  # one try and three retries for 429/503/504
    MAX_RETRY_WAIT = 30.0  # seconds. A longer Retry-After means "come back later": the
    #                         scheduler does that better than a worker sleeping.
    DEFAULT_RETRY_WAIT = 2.0  # when a 429/503 comes without Retry-After
    CHUNK = 64 * 1024
    REFRESH_MARGIN = 300.0  # get a new token when the current one has less left

    def __init__(self, settings: ConnectionSettings, progress: Progress = _quiet, *,
                 tokens: Optional[TokenProvider] = None, app_only: Optional[bool] = None,
                 sleep: Callable[[float], None] = time.sleep):
        """`app_only`: the connection's access mode when known (OAuthSettings
        has no field for it); by default, app-only when no account is signed
        in."""
        super().__init__(settings, progress)
        self.tokens = tokens
        self._app_only = app_only
        self._sleep = sleep
        self._session: Optional[requests.Session] = None
        self._token: Optional[Token] = None
        self._folder: dict = {}
        self._folder_path = ""
        self.mailbox = split_mailbox(settings.email_address)[1]
        self._base = ""

    # -- Connector ---------------------------------------------------------
    def open(self) -> None:
        if self.settings.oauth is None:
            raise ConnectorError(Diagnosis("oauth_unknown_app", "No Microsoft Entra app is configured for this "
                                           "connection.", "Enter the Application (Client) ID.", field="oauth_client_id"))
        if not self.mailbox:
            raise ConnectorError(Diagnosis("mailbox_not_found", "No mailbox address is set for this connection.",
                                           "Enter the email address of the mailbox.", field="email_address"))
        self.progress("connecting")
        self._session = session_for(self.settings)
        self._session.headers.update({
            "Accept": "application/json",
            # Immutable ids survive moves between folders, so a message moved
            # by a user keeps its key and is not fetched twice.
            "Prefer": 'IdType="ImmutableId"',
        })
        endpoint = self.settings.oauth.graph_endpoint.strip().rstrip("/")
        self._base = f"{endpoint}/v1.0/users/{quote(self.mailbox, safe='@')}"
        self.progress("signing in")
        if self.tokens is None:
            self.tokens = TokenProvider(self.settings)
        self._bearer()
        self.progress("opening folder")
        self._folder, self._folder_path = self._resolve_folder()

    def close(self) -> None:
        for closable in (self._session, self.tokens):
            if closable is not None:
                try:
                    closable.close()
                except Exception:  # noqa: BLE001 - close never raises
                    log.debug("Ignored an error while closing", exc_info=True)
        self._session = None

    def check(self) -> CheckResult:
        folder = self._get_json(f"{self._base}/mailFolders/{self._id(self._folder['id'])}",
                                {"$select": "displayName,unreadItemCount,totalItemCount"}, about="folder")
        how = ("application access" if self.app_only
               else f"delegated access as {self.tokens.account_username}")
        return CheckResult(self._folder_path, int(folder.get("unreadItemCount") or 0),
                           f"Microsoft Graph, {how}, mailbox {self.mailbox}; "
                           f"{int(folder.get('totalItemCount') or 0)} messages in the folder")

    def list_unread(self, limit: int) -> list[RemoteMessage]:
        if limit <= 0:
            return []
        url: Optional[str] = f"{self._base}/mailFolders/{self._id(self._folder['id'])}/messages"
        params: Optional[dict] = {
            "$filter": _UNREAD_FILTER,
            "$orderby": "receivedDateTime asc",
            "$select": "id,receivedDateTime,internetMessageId",
            "$top": str(min(limit, self.PAGE_SIZE)),
        }
        found: list[RemoteMessage] = []
        while url and len(found) < limit:
            page = self._get_json(url, params, about="folder")
            for item in page.get("value") or []:
                found.append(RemoteMessage(key=item["id"], received=item.get("receivedDateTime") or "",
                                           message_id=item.get("internetMessageId") or "",
                                           extra={"folder_id": self._folder["id"]}))
            url, params = self._next_link(page.get("@odata.nextLink")), None
        return found[:limit]

    def fetch_raw(self, message: RemoteMessage, dest: BinaryIO) -> int:
        url = f"{self._base}/messages/{self._id(message.key)}/$value"
        response = self._request("GET", url, stream=True, about="message")
        written = 0
        try:
            for chunk in response.iter_content(self.CHUNK):
                if chunk:
                    dest.write(chunk)
                    written += len(chunk)
        except requests.RequestException as exc:
            raise ConnectorError(self._network(exc, url)) from exc
        finally:
            response.close()
        return written

    def mark_read(self, messages: Iterable[RemoteMessage]) -> None:
        for message in messages:
            url = f"{self._base}/messages/{self._id(message.key)}"
            try:
                self._request("PATCH", url, json={"isRead": True}, about="mark_read").close()
            except ConnectorError as exc:
                if exc.diagnosis.code == "message_not_found":
                    # Moved or deleted since it was fetched: it is stored, so
                    # there is nothing left to mark.
                    log.info("Message %s was gone when marking it read", message.key[-16:])
                    continue
                raise

    # -- folders -------------------------------------------------------------
    def _resolve_folder(self) -> tuple[dict, str]:
        names = [p.strip() for p in (self.settings.source_folder or "").split("/") if p.strip()]
        select = {"$select": "id,displayName,unreadItemCount,totalItemCount,childFolderCount"}
        if not names:
            folder = self._get_json(f"{self._base}/mailFolders/inbox", select, about="folder")
            return folder, folder.get("displayName") or "Inbox"
        first = names[0]
        if first.lower() in _WELL_KNOWN:
            folder = self._get_json(f"{self._base}/mailFolders/{_WELL_KNOWN[first.lower()]}", select,
                                    about="folder")
        else:
            folder = self._child(f"{self._base}/mailFolders", first, "the top of the mailbox", select)
        path = [folder.get("displayName") or first]
        for name in names[1:]:
            url = f"{self._base}/mailFolders/{self._id(folder['id'])}/childFolders"
            folder = self._child(url, name, "/".join(path), select)
            path.append(folder.get("displayName") or name)
        return folder, "/".join(path)

    def _child(self, url: str, name: str, parent: str, select: dict) -> dict:
        page = self._get_json(url, {"$filter": f"displayName eq {odata_string(name)}", **select}, about="folder")
        for folder in page.get("value") or []:
            if (folder.get("displayName") or "").lower() == name.lower():
                return folder
        raise ConnectorError(Diagnosis(
            "folder_not_found",
            f"The folder {name!r} was not found under {parent} in mailbox {self.mailbox}.",
            "Check the Source Folder. Separate nested folders with '/', like Inbox/Phishing, and spell each "
            "folder as Outlook shows it. Leave it blank for the Inbox.", field="source_folder"))

    # -- HTTP ------------------------------------------------------------------
    def _get_json(self, url: str, params: Optional[dict], *, about: str) -> dict:
        response = self._request("GET", url, params=params, about=about)
        try:
            return response.json()
        except ValueError as exc:
            raise ConnectorError(Diagnosis(
                "graph_error", f"Microsoft Graph sent an answer that is not JSON (HTTP {response.status_code}).",
                "Check the Graph Endpoint: it should be https://graph.microsoft.com or your national cloud's "
                "Graph host. A proxy that rewrites answers can also cause this.", field="graph_endpoint")) from exc

    def _request(self, method: str, url: str, *, about: str, params: Optional[dict] = None,
                 json: Optional[dict] = None, stream: bool = False) -> requests.Response:
        """One Graph call: Bearer token, bounded retries on 429/503/504
        honouring Retry-After, one new token on a 401. Returns a 2xx
        response; anything else becomes a ConnectorError."""
        assert self._session is not None, "open() first"
        reauthenticated = False
        attempt = 0
        while True:
            attempt += 1
            headers = {"Authorization": f"Bearer {self._bearer().access_token}"}
            try:
                response = self._session.request(method, url, params=params, json=json, headers=headers,
                                                 stream=stream)
            except requests.RequestException as exc:
                raise ConnectorError(self._network(exc, url)) from exc
            if response.status_code < 300:
                return response
            if response.status_code in (429, 503, 504):
                wait = retry_after(response, self.DEFAULT_RETRY_WAIT)
                response.close()
                if attempt >= self.MAX_ATTEMPTS or wait > self.MAX_RETRY_WAIT:
                    raise ConnectorError(self._throttled(response.status_code, wait))
                log.info("Graph answered %s; retrying in %.1f s", response.status_code, wait)
                self._sleep(wait)
                continue
            if response.status_code == 401 and not reauthenticated:
                reauthenticated = True
                response.close()
                self._token = None
                self._bearer(force_refresh=True)
                continue
            diagnosis = self._diagnose(response, about)
            response.close()
            raise ConnectorError(diagnosis)

    @property
    def app_only(self) -> bool:
        return self.tokens.app_only if self._app_only is None else self._app_only

    def _bearer(self, force_refresh: bool = False) -> Token:
        if force_refresh or self._token is None or self._token.expires_within(self.REFRESH_MARGIN):
            # Delegated scopes without a signed-in account make the provider
            # say "Grant Access first" instead of silently going app-only.
            scopes = graph_scopes(self.settings, app_only=self.app_only)
            self._token = self.tokens.access_token(scopes, force_refresh=force_refresh and not self.app_only)
        return self._token

    def _next_link(self, link: Optional[str]) -> Optional[str]:
        """Follow @odata.nextLink only to the Graph host: the Bearer token
        must never be sent anywhere else."""
        if not link:
            return None
        if urlsplit(link).netloc.lower() != urlsplit(self._base).netloc.lower():
            raise ConnectorError(Diagnosis(
                "graph_error", "Microsoft Graph pointed the next page to another host; Intake stopped there.",
                "Check the Graph Endpoint and any proxy that rewrites answers.", field="graph_endpoint"))
        return link

    @staticmethod
    def _id(graph_id: str) -> str:
        return quote(graph_id, safe="")

    # -- diagnosis -------------------------------------------------------------
    def _network(self, exc: BaseException, url: str) -> Diagnosis:
        d = diagnose_http(exc, self.settings, url, what="Microsoft Graph", host_field="graph_endpoint")
        if d is not None:
            return with_presented_certificate(d, self.settings, url)
        return Diagnosis("connection_lost", f"The connection to Microsoft Graph failed: {type(exc).__name__}.",
                         "Check the Graph Endpoint, this server's network and the proxy settings, then try again.",
                         field="graph_endpoint")

    def _throttled(self, status: int, wait: float) -> Diagnosis:
        return Diagnosis(
            "throttled",
            f"Microsoft Graph is limiting requests for this mailbox (HTTP {status}); it asked to wait {wait:g} s.",
            "Nothing to fix: Intake tries again later. If it keeps happening, fetch less often or check "
            "whether other apps use the same mailbox heavily.", retry_after=wait)

    def _diagnose(self, response: requests.Response, about: str) -> Diagnosis:
        code, message = graph_error(response)
        said = f"{code}: {message}" if code else f"HTTP {response.status_code}"
        status = response.status_code
        extra = {"graph_code": code, "request_id": response.headers.get("request-id", "")}
        if status == 401:
            return Diagnosis(
                "auth_failed", f"Microsoft Graph rejected the access token ({said}).",
                "Check that the Graph Endpoint belongs to the same cloud as the Authority Host (for example "
                "https://graph.microsoft.us with https://login.microsoftonline.us). For delegated access, "
                "Grant Access again.", field="graph_endpoint", extra=extra)
        if status == 403:
            return self._permission_denied(about, said, extra)
        if status == 404 and (code in _MAILBOX_GONE or about == "mailbox"):
            hint = ("Check the Email Address. The mailbox must exist in Exchange Online"
                    + (" (mailboxes kept on-premises are not reachable through Graph)."
                       if code == "MailboxNotEnabledForRESTAPI" else ".")
                    + " For a shared mailbox, use the form primary@example.com\\shared@example.com.")
            return Diagnosis("mailbox_not_found", f"Microsoft Graph has no mailbox {self.mailbox} ({said}).", hint,
                             field="email_address", extra=extra)
        if status == 404 and about == "folder":
            return Diagnosis(
                "folder_not_found", f"The source folder was not found in mailbox {self.mailbox} ({said}).",
                "Check the Source Folder (nested folders like Inbox/Phishing).", field="source_folder", extra=extra)
        if status == 404:
            return Diagnosis("message_not_found", f"The message is no longer in mailbox {self.mailbox} ({said}).",
                             "It was probably moved or deleted after it was listed; nothing to do.", extra=extra)
        if status >= 500:
            return Diagnosis("server_busy", f"Microsoft Graph had a server error ({said}).",
                             "This is usually temporary; Intake tries again later.", extra=extra)
        return Diagnosis("graph_error", f"Microsoft Graph refused the request ({said}).",
                         "Check the connection's settings; the details show Microsoft's answer.", extra=extra)

    def _permission_denied(self, about: str, said: str, extra: dict) -> Diagnosis:
        marking = about == "mark_read"
        lead = ("Intake can read messages but may not mark them as read" if marking
                else f"Access to mailbox {self.mailbox} was denied")
        if self.app_only:
            return Diagnosis(
                "permission_denied", f"{lead} ({said}): the app needs the Microsoft Graph application "
                f"permission {GRAPH_READ_WRITE}.",
                f"In the Microsoft Entra admin center add the application permission {GRAPH_READ_WRITE} "
                "(Mail.Read is not enough to mark messages read) and click Grant admin consent. If an application "
                "access policy or RBAC for Applications limits the app, include this mailbox.", extra=extra)
        user = self.tokens.account_username
        if user.lower() != self.mailbox.lower():
            return Diagnosis(
                "permission_denied", f"{lead} ({said}): {user} needs access to {self.mailbox} and the app the "
                f"delegated permission {GRAPH_READ_WRITE_SHARED}.",
                f"Give {user} Full Access to {self.mailbox} in Exchange, add the delegated permission "
                f"{GRAPH_READ_WRITE_SHARED} to the app (with admin consent if required), then Grant Access again.",
                field="email_address", extra=extra)
        return Diagnosis(
            "permission_denied", f"{lead} ({said}): the app needs the delegated permission {GRAPH_READ_WRITE}.",
            f"Add the delegated permission {GRAPH_READ_WRITE} to the app (with admin consent if required), "
            "then Grant Access again.", extra=extra)


# -- helpers -------------------------------------------------------------------

def odata_string(value: str) -> str:
    """An OData string literal: single quotes, inner quotes doubled."""
    return "'" + value.replace("'", "''") + "'"


def retry_after(response: requests.Response, default: float) -> float:
    """Retry-After as seconds: Graph sends seconds (sometimes with a
    fraction, "2.128"), HTTP allows a date too."""
    value = (response.headers.get("Retry-After") or "").strip()
    if not value:
        return default
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError):
        return default


def graph_error(response: requests.Response) -> tuple[str, str]:
    try:
        error = (response.json() or {}).get("error") or {}
    except ValueError:
        return "", ""
    if not isinstance(error, dict):
        return "", str(error)[:300]
    return str(error.get("code") or ""), str(error.get("message") or "")[:500]
