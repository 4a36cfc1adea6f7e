"""The Microsoft Graph connector against local identity-platform and Graph servers."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import random
import time
from email.message import EmailMessage

import pytest
import requests
from urllib.parse import urlsplit

from connectors.base import ConnectionSettings, OAuthSettings
from connectors.errors import ConnectorError
from connectors.graph import GraphConnector, odata_string, retry_after
from connectors.oauth import TokenProvider, graph_scopes

REDIRECT = "https://intake.example/email-oauth"
DOMAIN = "intake-test.onmicrosoft.com"
PHISH = f"phish@{DOMAIN}"
ALICE = f"alice@{DOMAIN}"


# -- helpers ---------------------------------------------------------------------

def make_message(n: int, subject: str = "", attachment: bytes = b"") -> bytes:
    msg = EmailMessage()
    msg["From"] = f"sender{n}@example.org"
    msg["To"] = PHISH
    msg["Subject"] = subject or f"Suspicious message {n}"
    msg["Message-ID"] = f"<msg-{n}@example.org>"
    msg.set_content(f"Body of message {n}\n")
    if attachment:
        msg.add_attachment(attachment, maintype="application", subtype="octet-stream", filename="payload.bin")
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))


def settings_for(idp, graph, app, *, email=PHISH, folder="", account="", cache="", trusted=None,
                 proxy=None) -> ConnectionSettings:
    oauth = OAuthSettings(client_id=app.client_id, tenant_id=idp.tenant_id, client_secret=app.secret,
                          authority_host=idp.authority_host, graph_endpoint=graph.base_url,
                          token_cache=cache, account_username=account)
    pems = trusted if trusted is not None else [idp.cert.cert_pem, graph.cert.cert_pem]
    return ConnectionSettings("graph", email_address=email, source_folder=folder, oauth=oauth, proxy=proxy,
                              trusted_cert_pem="".join(p.decode() for p in pems))


def granted(idp, settings, username) -> ConnectionSettings:
    """Grant Access (driving the sign-in page with requests), then the
    settings as stored: account plus the serialized token cache."""
    provider = TokenProvider(settings)
    flow = provider.begin_grant(REDIRECT, graph_scopes(settings, app_only=False))
    result = provider.complete_grant(flow, idp.sign_in(flow["auth_uri"], username))
    oauth = dataclasses.replace(settings.oauth, account_username=result.username,
                                token_cache=provider.serialized_cache())
    return dataclasses.replace(settings, oauth=oauth)


def diagnosis_of(fn, *args):
    with pytest.raises(ConnectorError) as info:
        fn(*args)
    return info.value.diagnosis


def message_requests(graph):
    return [r for r in graph.requests if r["path"].endswith("/messages") and r["method"] == "GET"]


@pytest.fixture
def entra_app(identity_server):
    """An Entra app registration (not the Flask `app` fixture)."""
    return identity_server.register_app(redirect_uris=[REDIRECT])


@pytest.fixture
def mailbox(graph_server):
    graph_server.add_mailbox(PHISH)
    return PHISH


# -- app-only ----------------------------------------------------------------------

def test_check_opens_the_inbox_and_reports_progress(identity_server, graph_server, entra_app, mailbox):
    graph_server.put(mailbox, make_message(1))
    graph_server.put(mailbox, make_message(2), is_read=True)
    steps = []
    with GraphConnector(settings_for(identity_server, graph_server, entra_app), steps.append) as c:
        result = c.check()
    assert steps == ["connecting", "signing in", "opening folder"]
    assert (result.folder, result.unread) == ("Inbox", 1)
    assert "application access" in result.detail
    token = identity_server.issued_tokens[-1]
    assert token["grant_type"] == "client_credentials" and token["aud"] == graph_server.base_url


def test_unread_listing_is_paged_and_oldest_first(identity_server, graph_server, entra_app, mailbox):
    graph_server.max_page_size = 2  # Graph decides the page size, whatever $top says
    ids = [graph_server.put(mailbox, make_message(n)) for n in range(7)]  # received one minute apart
    graph_server.put(mailbox, make_message(99), is_read=True)
    graph_server.put(mailbox, make_message(98), folder="Junk Email")
    with GraphConnector(settings_for(identity_server, graph_server, entra_app)) as c:
        everything = c.list_unread(100)
        first_three = c.list_unread(3)

    assert [m.key for m in everything] == ids
    assert [m.received for m in everything] == sorted(m.received for m in everything)
    assert everything[0].message_id == "<msg-0@example.org>"
    assert [m.key for m in first_three] == ids[:3]
    pages = message_requests(graph_server)
    assert len(pages) == 4 + 2  # 7 messages in pages of 2, then 3 in pages of 2
    first = pages[0]["query"]
    assert first["$orderby"] == "receivedDateTime asc" and first["$select"] == "id,receivedDateTime,internetMessageId"
    assert first["$filter"].startswith("receivedDateTime") and "isRead eq false" in first["$filter"]


def test_fetch_streams_the_mime_intact_without_marking_it_read(identity_server, graph_server, entra_app, mailbox):
    raw = make_message(1, attachment=random.Random(7).randbytes(300_000) + b"\x00\r\n.\r\n")
    key = graph_server.put(mailbox, raw)
    sink = io.BytesIO()
    with GraphConnector(settings_for(identity_server, graph_server, entra_app)) as c:
        [message] = c.list_unread(10)
        written = c.fetch_raw(message, sink)
    assert written == len(raw) == len(sink.getvalue())
    assert hashlib.sha256(sink.getvalue()).hexdigest() == hashlib.sha256(raw).hexdigest()
    assert not graph_server.is_read(mailbox, key)
    assert any(r["path"].endswith("/$value") for r in graph_server.requests)


def test_mark_read_marks_exactly_the_given_messages(identity_server, graph_server, entra_app, mailbox):
    keys = [graph_server.put(mailbox, make_message(n)) for n in range(3)]
    with GraphConnector(settings_for(identity_server, graph_server, entra_app)) as c:
        listed = c.list_unread(10)
        c.mark_read(listed[:2])
        left = c.list_unread(10)
    assert [graph_server.is_read(mailbox, k) for k in keys] == [True, True, False]
    assert [m.key for m in left] == [keys[2]]
    patches = [r for r in graph_server.requests if r["method"] == "PATCH"]
    assert len(patches) == 2


def test_nested_source_folder_with_quotes_in_its_name(identity_server, graph_server, entra_app, mailbox):
    graph_server.put(mailbox, make_message(1))  # Inbox itself: not listed
    wanted = graph_server.put(mailbox, make_message(2), folder="Inbox/Phishing/O'Brien's reports")
    graph_server.put(mailbox, make_message(3), folder="Inbox/Phishing")
    settings = settings_for(identity_server, graph_server, entra_app, folder="inbox/phishing/O'Brien's reports")
    with GraphConnector(settings) as c:
        assert c.check().folder == "Inbox/Phishing/O'Brien's reports"
        assert [m.key for m in c.list_unread(10)] == [wanted]
    filters = [r["query"].get("$filter") for r in graph_server.requests if r["path"].endswith("/childFolders")]
    assert "displayName eq 'O''Brien''s reports'" in filters
    assert odata_string("it's") == "'it''s'"


def test_top_level_folder_outside_the_inbox(identity_server, graph_server, entra_app, mailbox):
    wanted = graph_server.put(mailbox, make_message(1), folder="Security/Reported")
    with GraphConnector(settings_for(identity_server, graph_server, entra_app, folder="Security/Reported")) as c:
        assert c.check().folder == "Security/Reported"
        assert [m.key for m in c.list_unread(10)] == [wanted]


def test_missing_folder_names_the_folder(identity_server, graph_server, entra_app, mailbox):
    graph_server.add_folder(mailbox, "Inbox/Phishing")
    c = GraphConnector(settings_for(identity_server, graph_server, entra_app, folder="Inbox/Phising"))
    d = diagnosis_of(c.open)
    assert (d.code, d.field) == ("folder_not_found", "source_folder")
    assert "'Phising'" in d.message and "Inbox" in d.message


def test_unknown_mailbox(identity_server, graph_server, entra_app):
    c = GraphConnector(settings_for(identity_server, graph_server, entra_app, email=f"nobody@{DOMAIN}"))
    d = diagnosis_of(c.open)
    assert (d.code, d.field) == ("mailbox_not_found", "email_address")
    assert f"nobody@{DOMAIN}" in d.message and d.extra["graph_code"] == "ErrorInvalidUser"


# -- throttling ---------------------------------------------------------------------

def test_throttling_is_retried_after_the_time_graph_asks(identity_server, graph_server, entra_app, mailbox):
    key = graph_server.put(mailbox, make_message(1))
    with GraphConnector(settings_for(identity_server, graph_server, entra_app)) as c:
        graph_server.throttle_next(2, retry_after="0.2")
        started = time.monotonic()
        assert [m.key for m in c.list_unread(10)] == [key]
        assert time.monotonic() - started >= 0.4
        graph_server.throttle_next(1, retry_after=1, status=503)
        waits = []
        c._sleep = waits.append
        c.mark_read(c.list_unread(10))
    assert waits == [1.0]
    assert graph_server.is_read(mailbox, key)
    assert [r["status"] for r in graph_server.requests].count(429) == 2


def test_throttling_gives_up_after_bounded_retries(identity_server, graph_server, entra_app, mailbox):
    waits = []
    with GraphConnector(settings_for(identity_server, graph_server, entra_app), sleep=waits.append) as c:
        graph_server.throttle_next(10, retry_after=3)
        d = diagnosis_of(c.list_unread, 10)
    assert (d.code, d.retry_after) == ("throttled", 3.0)
    assert waits == [3.0] * (GraphConnector.MAX_ATTEMPTS - 1)


def test_long_retry_after_is_left_to_the_scheduler(identity_server, graph_server, entra_app, mailbox):
    waits = []
    with GraphConnector(settings_for(identity_server, graph_server, entra_app), sleep=waits.append) as c:
        graph_server.throttle_next(1, retry_after=600)
        d = diagnosis_of(c.list_unread, 10)
    assert (d.code, d.retry_after, waits) == ("throttled", 600.0, [])


@pytest.mark.parametrize("header, expected", [("2.128", 2.128), ("7", 7.0), ("", 2.0), ("soon", 2.0),
                                               ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0)])
def test_retry_after_accepts_seconds_fractions_and_dates(header, expected):
    response = requests.Response()
    response.headers["Retry-After"] = header
    assert retry_after(response, 2.0) == pytest.approx(expected)


# -- permissions --------------------------------------------------------------------

def test_app_with_mail_read_only_is_told_it_needs_mail_readwrite(identity_server, graph_server, mailbox):
    app = identity_server.register_app(app_permissions={"Mail.Read"})
    key = graph_server.put(mailbox, make_message(1))
    with GraphConnector(settings_for(identity_server, graph_server, app)) as c:
        listed = c.list_unread(10)
        d = diagnosis_of(c.mark_read, listed)
    assert d.code == "permission_denied" and "Mail.ReadWrite" in d.message and "marked" not in d.message
    assert "mark them as read" in d.message and "Grant admin consent" in d.hint
    assert not graph_server.is_read(mailbox, key)


def test_app_without_mail_permission_fails_when_opening(identity_server, graph_server, mailbox):
    app = identity_server.register_app(app_permissions=set())
    d = diagnosis_of(GraphConnector(settings_for(identity_server, graph_server, app)).open)
    assert d.code == "permission_denied" and "Mail.ReadWrite" in d.message


def test_token_from_the_wrong_cloud_is_an_auth_failure(identity_server, graph_server, entra_app, mailbox):
    settings = settings_for(identity_server, graph_server, entra_app)
    wrong = TokenProvider(settings)
    real = wrong.access_token
    wrong.access_token = lambda scopes, **kw: real(("https://graph.microsoft.com/.default",), **kw)
    d = diagnosis_of(GraphConnector(settings, tokens=wrong).open)
    assert (d.code, d.field) == ("auth_failed", "graph_endpoint") and "Invalid audience" in d.message


# -- delegated -------------------------------------------------------------------------

def test_delegated_access_to_the_signed_in_users_own_mailbox(identity_server, graph_server, entra_app):
    identity_server.add_account(ALICE, "Alice")
    key = graph_server.put(ALICE, make_message(1))
    settings = granted(identity_server, settings_for(identity_server, graph_server, entra_app, email=ALICE), ALICE)
    sink = io.BytesIO()
    with GraphConnector(settings) as c:
        assert "delegated access as " + ALICE in c.check().detail
        [message] = c.list_unread(10)
        c.fetch_raw(message, sink)
        c.mark_read([message])
    assert sink.getvalue() == make_message(1) and graph_server.is_read(ALICE, key)
    assert identity_server.issued_tokens[-1]["scp"] == "Mail.ReadWrite"


def test_delegated_shared_mailbox_uses_mail_readwrite_shared(identity_server, graph_server, entra_app, mailbox):
    identity_server.add_account(ALICE, "Alice")
    graph_server.grant_access(mailbox, ALICE)
    key = graph_server.put(mailbox, make_message(1))
    settings = granted(identity_server, settings_for(identity_server, graph_server, entra_app,
                                                     email=f"{ALICE}\\{mailbox}"), ALICE)
    with GraphConnector(settings) as c:
        c.mark_read(c.list_unread(10))
    assert graph_server.is_read(mailbox, key)
    assert identity_server.issued_tokens[-1]["scp"] == "Mail.ReadWrite.Shared"
    assert all(f"/users/{mailbox}" in r["path"] for r in graph_server.requests)


def test_delegated_user_without_access_to_the_shared_mailbox(identity_server, graph_server, entra_app, mailbox):
    identity_server.add_account(ALICE, "Alice")
    settings = granted(identity_server, settings_for(identity_server, graph_server, entra_app,
                                                     email=f"{ALICE}\\{mailbox}"), ALICE)
    d = diagnosis_of(GraphConnector(settings).open)
    assert d.code == "permission_denied" and "Mail.ReadWrite.Shared" in d.message and ALICE in d.message


def test_delegated_token_expiring_mid_session_is_renewed_silently(identity_server, graph_server, entra_app):
    identity_server.add_account(ALICE, "Alice")
    graph_server.put(ALICE, make_message(1))
    identity_server.access_token_lifetime = 1  # the token the connector opens with lives one second
    settings = granted(identity_server, settings_for(identity_server, graph_server, entra_app, email=ALICE), ALICE)
    with GraphConnector(settings) as c:
        refreshes = [r["grant_type"] for r in identity_server.token_requests].count("refresh_token")
        identity_server.access_token_lifetime = 3600
        time.sleep(1.1)  # Graph now rejects the token the connector opened with
        assert len(c.list_unread(10)) == 1
    # Renewed without a user: before the call, or (on a loaded machine, when the
    # token expires in flight) after Graph's 401, with one retry.
    assert [r["grant_type"] for r in identity_server.token_requests].count("refresh_token") >= refreshes + 1
    assert [r["status"] for r in graph_server.requests].count(401) <= 1


def test_delegated_connection_without_a_grant_asks_for_grant_access(identity_server, graph_server, entra_app):
    graph_server.add_mailbox(ALICE)
    settings = settings_for(identity_server, graph_server, entra_app, email=ALICE)
    d = diagnosis_of(GraphConnector(settings, app_only=False).open)
    assert d.code == "grant_expired" and "Grant Access" in d.message
    assert identity_server.token_requests == []  # not silently entra_app-only


def test_revoked_grant_stops_the_connector_with_grant_access_again(identity_server, graph_server, entra_app):
    identity_server.add_account(ALICE, "Alice")
    graph_server.add_mailbox(ALICE)
    identity_server.access_token_lifetime = 60
    settings = granted(identity_server, settings_for(identity_server, graph_server, entra_app, email=ALICE), ALICE)
    identity_server.revoke_refresh_tokens(ALICE)
    d = diagnosis_of(GraphConnector(settings).open)
    assert d.code == "grant_expired" and "Grant Access again" in d.message


# -- transport --------------------------------------------------------------------------

def test_graph_traffic_needs_the_graph_certificate_trusted(identity_server, graph_server, entra_app, mailbox):
    settings = settings_for(identity_server, graph_server, entra_app, trusted=[identity_server.cert.cert_pem])
    d = diagnosis_of(GraphConnector(settings).open)
    assert (d.code, d.field) == ("untrusted_certificate", "trusted_certificate")


def test_graph_server_refuses_an_inefficient_filter_like_graph(identity_server, graph_server, entra_app, mailbox):
    """Why the connector's $filter starts with receivedDateTime."""
    token = TokenProvider(settings_for(identity_server, graph_server, entra_app)).access_token(
        (f"{graph_server.base_url}/.default",)).access_token
    r = requests.get(f"{graph_server.base_url}/v1.0/users/{mailbox}/mailFolders/inbox/messages",
                     params={"$filter": "isRead eq false", "$orderby": "receivedDateTime asc"},
                     headers={"Authorization": f"Bearer {token}"}, verify=str(graph_server.cert.cert_path))
    assert r.status_code == 400 and r.json()["error"]["code"] == "InefficientFilter"


PROXIES_PLUGIN = os.path.join(os.path.dirname(__file__), "support", "proxies.py")


@pytest.mark.skipif(not os.path.exists(PROXIES_PLUGIN), reason="tests/support/proxies.py is not there yet")
def test_graph_fetch_through_authenticated_proxy(identity_server, graph_server, entra_app, mailbox, request):
    """Sign-in and Graph both go through the connection's proxy (squid, Basic auth)."""
    proxy = request.getfixturevalue("http_proxy")
    raw = make_message(1, attachment=os.urandom(50_000))
    key = graph_server.put(mailbox, raw)
    settings = settings_for(identity_server, graph_server, entra_app, proxy=proxy.settings())
    sink = io.BytesIO()
    with GraphConnector(settings) as c:
        [message] = c.list_unread(10)
        c.fetch_raw(message, sink)
        c.mark_read([message])
    assert sink.getvalue() == raw and graph_server.is_read(mailbox, key)
    assert proxy.tunnels(graph_server._server.port)
    assert proxy.tunnels(urlsplit(identity_server.authority_host).port)
