"""Migrate to Graph: a saved OAuth (EWS) connection becomes a Microsoft
Graph connection in place, after a successful test against Graph. It keeps
its id, credentials, grant, email and incidents; email it already stored is
not stored again when Graph lists it."""
from __future__ import annotations

import importlib.util
import re

import pytest

from connectors.base import ConnectionSettings, OAuthSettings
from connectors.oauth import EWS_DELEGATED_SCOPES, TokenProvider
from models import ConnectionLog, EmailConnection, Incident, RemoteKey, StoredMessage, db, utcnow
from tests.test_fetch import make_mail

REDIRECT = "https://intake.example/email-oauth"
SECRET = "migrate-secret-value"
PROCESSING = importlib.util.find_spec("ingest.parse") is not None  # another part of the app; may be missing


@pytest.fixture
def ews_connection(admin_client, identity_server, graph_server, ews_server):
    """A saved OAuth (EWS) connection of admin_client's organization, granted
    by its mailbox owner, trusting the test servers' certificates."""
    app = identity_server.register_app(secret=SECRET, redirect_uris=[REDIRECT])
    acct = ews_server.new_account("migrating")
    identity_server.add_account(acct.address, "Mia Migrating")
    graph_server.add_mailbox(acct.address)
    trusted = b"".join(c.cert_pem for c in (identity_server.cert, ews_server.cert, graph_server.cert)).decode()
    settings = ConnectionSettings("oauth", email_address=acct.address, trusted_cert_pem=trusted, oauth=OAuthSettings(
        client_id=app.client_id, tenant_id=identity_server.tenant_id, client_secret=SECRET,
        authority_host=identity_server.authority_host))
    provider = TokenProvider(settings)
    flow = provider.begin_grant(REDIRECT, EWS_DELEGATED_SCOPES)
    provider.complete_grant(flow, identity_server.sign_in(flow["auth_uri"], acct.address))
    for t in identity_server.issued_tokens:  # the EWS test server accepts what the identity server issued
        ews_server.add_token(t["access_token"], acct.login)
    with db.connection_context():
        conn = EmailConnection.create(
            organization=admin_client.org, name="Reported phish", api_name="Reported_phish", protocol="oauth",
            endpoint=ews_server.url, email_address=acct.address, trusted_cert_pem=trusted,
            oauth_client_id=app.client_id, oauth_tenant_id=identity_server.tenant_id, oauth_client_secret=SECRET,
            oauth_authority_host=identity_server.authority_host, graph_endpoint=graph_server.base_url,
            oauth_token_cache=provider.serialized_cache(), oauth_account_username=acct.address,
            oauth_account_name="Mia Migrating", status="ok", next_fetch_at=utcnow())
    conn.acct = acct
    return conn


def fetch_and_process(conn, run_jobs) -> dict:
    from jobs import fetch

    result = fetch.fetch(conn.id, enqueue_processing=PROCESSING)
    run_jobs()
    return result


def migrate(admin_client, conn, run_jobs):
    """Press Migrate to Graph and let the test job run; returns the final status response."""
    resp = admin_client.post(f"/settings/connections/{conn.api_name}/migrate-graph")
    html = resp.get_data(as_text=True)
    assert resp.status_code == 200 and "Queued" in html, html
    poll = re.search(r'hx-get="([^"]+)"', html).group(1).replace("&amp;", "&")
    assert "action=Migrate" in poll  # a failure would say "Migrate to Graph failed"
    run_jobs()
    return admin_client.get(poll, headers={"HX-Request": "true"})


def stored(conn):
    with db.connection_context():
        return list(StoredMessage.select().where(StoredMessage.connection == conn.id).order_by(StoredMessage.id))


def test_migrated_connection_keeps_its_history_and_stores_nothing_twice(admin_client, ews_connection, ews_server,
                                                                        graph_server, identity_server, run_jobs):
    conn = ews_connection
    mailbox = conn.acct.address
    first, second = make_mail(1, "Invoice overdue"), make_mail(2, "Password expires today")

    # History through EWS.
    ews_item = ews_server.put(mailbox, first)
    assert fetch_and_process(conn, run_jobs)["stored"] == 1
    assert ews_server.is_read(ews_item)
    [old] = stored(conn)
    with db.connection_context():
        if PROCESSING:
            incident = Incident.get(Incident.organization == conn.organization_id)
            assert StoredMessage.get_by_id(old.id).incident_id == incident.id
        else:  # processing not available here: an incident made by hand stands in for it
            incident = Incident.create(organization=conn.organization_id, number=1, title="Invoice overdue",
                                       connection=conn.id)
            StoredMessage.update(incident=incident).where(StoredMessage.id == old.id).execute()

    # The same mailbox seen through Graph: the first email again (marked
    # unread there, as after a crash before mark-read) and a new one.
    graph_first = graph_server.put(mailbox, first)
    graph_second = graph_server.put(mailbox, second)

    answer = migrate(admin_client, conn, run_jobs)
    assert answer.headers.get("HX-Redirect") == "/settings/connections/"
    with db.connection_context():
        after = EmailConnection.get_by_id(conn.id)  # the same connection, in place
        assert (after.protocol, after.api_name, after.status) == ("graph", "Reported_phish", "ok")
        assert after.oauth_account_username == mailbox and after.oauth_client_secret.reveal() == SECRET
        assert after.oauth_token_expires_at is not None
        assert ConnectionLog.select().where((ConnectionLog.connection == conn.id)
                                            & ConnectionLog.message.contains("Protocol changed")).exists()
    # No new sign-in was needed: the grant made for EWS got the Graph token.
    graph_tokens = [t for t in identity_server.issued_tokens if t["aud"] == graph_server.base_url]
    assert graph_tokens and {t["grant_type"] for t in graph_tokens} == {"refresh_token"}

    result = fetch_and_process(conn, run_jobs)
    assert (result["stored"], result["duplicates"]) == (1, 1)
    assert graph_server.is_read(mailbox, graph_first) and graph_server.is_read(mailbox, graph_second)
    messages = stored(conn)
    assert [m.id for m in messages][:1] == [old.id] and len(messages) == 2
    with db.connection_context():
        assert StoredMessage.get_by_id(old.id).incident_id == incident.id  # history kept
        keys = {k.key: k.message_id for k in RemoteKey.select().where(RemoteKey.connection == conn.id)}
        assert keys[ews_item] == keys[graph_first] == old.id  # one email, two server ids
        if PROCESSING:
            assert Incident.select().where(Incident.organization == conn.organization_id).count() == 2


def test_failed_migration_leaves_the_ews_connection_as_it_was(admin_client, ews_connection, graph_server, run_jobs):
    conn = ews_connection
    graph_server.mailboxes.clear()  # Graph does not know the mailbox (kept on-premises, say)
    answer = migrate(admin_client, conn, run_jobs)
    html = answer.get_data(as_text=True)
    assert "Migrate to Graph failed: Microsoft Graph has no mailbox" in html
    with db.connection_context():
        after = EmailConnection.get_by_id(conn.id)
        assert (after.protocol, after.status) == ("oauth", "ok")


def test_only_oauth_ews_connections_offer_and_accept_migration(admin_client, ews_connection):
    page = admin_client.get(f"/settings/connections/{ews_connection.api_name}").get_data(as_text=True)
    assert ">Migrate to Graph</button>" in page and "Signed in as Mia Migrating" in page
    with db.connection_context():
        EmailConnection.update(protocol="exchange").where(EmailConnection.id == ews_connection.id).execute()
    page = admin_client.get(f"/settings/connections/{ews_connection.api_name}").get_data(as_text=True)
    assert "Migrate to Graph" not in page
    html = admin_client.post(f"/settings/connections/{ews_connection.api_name}/migrate-graph").get_data(as_text=True)
    assert "Only OAuth (Office 365) connections that use EWS can be migrated" in html
