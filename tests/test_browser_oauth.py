"""Office 365 Access in a real browser: Grant Access on the test identity
platform's own sign-in page, back on /email-oauth, "Signed in as …" and
Switch Account, then Test and Save against Exchange (EWS with the issued
token) or Microsoft Graph. The identity, EWS and Graph test servers use
self-signed certificates, so the untrusted-certificate flow shows up at
Grant Access time too."""
from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from models import EmailConnection, db
from tests.support.browser import browser_login
from tests.test_browser_connections import choose_protocol, open_add_form, press_test_and_save
from tests.test_browser_exchange import expect_saved_ok, failed_status, upload
from tests.test_proxies import mail

SECRET = "test-client-secret-value"


@pytest.fixture
def oauth_page(chromium, live_server, make_admin, redis_conn, request, tmp_path_factory):
    """An admin's browser that accepts the identity server's self-signed
    certificate (an admin's browser trusts their company's CA; Intake's own
    trust is the connection's uploaded certificate, tested below)."""
    context = chromium.new_context(base_url=live_server.url, viewport={"width": 1280, "height": 1000},
                                   ignore_https_errors=True)
    context.set_default_timeout(15000)
    page = context.new_page()
    page.js_errors = []
    page.on("pageerror", lambda e: page.js_errors.append(str(e)))
    email, password, org = make_admin()
    browser_login(page, email, password)
    page.org = org
    yield page
    if getattr(request.node, "failed_call", False):
        shot = tmp_path_factory.getbasetemp() / "screenshots" / f"{request.node.name}.png"
        shot.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(shot), full_page=True)
        print(f"Screenshot of the failure: {shot}")
    context.close()


@pytest.fixture
def entra_app(identity_server, live_server):
    """An app registration whose redirect URI is this Intake's: BASE_URL + /email-oauth."""
    return identity_server.register_app(secret=SECRET, redirect_uris=[live_server.url + "/email-oauth"])


def fill_oauth(page, identity_server, entra_app, mailbox: str, *, protocol="oauth", endpoint="", graph=""):
    open_add_form(page)
    choose_protocol(page, protocol)
    if endpoint:
        page.get_by_label("Endpoint", exact=True).fill(endpoint)
    page.get_by_label("Application (Client) ID").fill(entra_app.client_id)
    page.get_by_label("Directory (Tenant) ID").fill(identity_server.tenant_id)
    # "Client secret" is also the radio's label: the password input is the one to fill.
    page.get_by_label("Client secret", exact=True).and_(page.locator("input[type=password]")).fill(SECRET)
    page.get_by_label("Email Address").fill(mailbox)
    page.locator("summary", has_text="Advanced").click()
    page.get_by_label("Authority Host").fill(identity_server.authority_host)
    if graph:
        page.get_by_label("Graph Endpoint").fill(graph)


def grant_access(page, button="Grant Access"):
    page.get_by_role("button", name=button, exact=True).click()


def trust_sign_in_service(page, identity_server, tmp_path, also: bytes = b""):
    """Grant Access fails on the identity platform's certificate: it is shown,
    and uploading it (with `also`, in one file) lets Grant Access go on."""
    alert = failed_status(page, "untrusted_certificate")
    expect(alert).to_contain_text("Grant Access failed: The certificate of the Microsoft sign-in service")
    expect(alert.locator("code.fingerprint")).to_have_text(identity_server.cert.sha256_fingerprint)
    expect(alert).to_contain_text("Then press Grant Access again.")
    upload(page, "Certificate file", tmp_path / "identity.pem", identity_server.cert.cert_pem + also)
    grant_access(page)


def sign_in(page, identity_server, username: str, *, accept=True):
    """On the identity platform's own sign-in page, as the admin would."""
    page.wait_for_url(lambda url: url.startswith(identity_server.authority_host))
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    page.get_by_label("Account (email address)").fill(username)
    page.get_by_role("button", name="Accept" if accept else "Cancel").click()
    page.wait_for_url(re.compile(r"/settings/connections/[^/?]+\?draft="))


def trust_tokens(ews_server, identity_server, logins: dict):
    """The EWS test server accepts the access tokens the identity server
    issued, as the account that received each one."""
    for t in identity_server.issued_tokens:
        if t["username"]:
            ews_server.add_token(t["access_token"], logins[t["username"].lower()])


def saved(org) -> EmailConnection:
    with db.connection_context():
        return EmailConnection.get((EmailConnection.organization == org)
                                   & (EmailConnection.api_name == "Phishing_reports"))


@pytest.mark.browser
def test_grant_access_then_test_and_save_with_ews_then_switch_account(oauth_page, identity_server, entra_app,
                                                                     ews_server, tmp_path):
    page = oauth_page
    alice, bob = ews_server.new_account("alice"), ews_server.new_account("bob")
    ews_server.grant(alice.address, bob.login)
    ews_server.put(alice.address, mail("reported phish"))
    identity_server.add_account(alice.address, "Alice Admin")
    identity_server.add_account(bob.address, "Bob Backup")
    logins = {alice.address.lower(): alice.login, bob.address.lower(): bob.login}

    fill_oauth(page, identity_server, entra_app, alice.address, endpoint=ews_server.url)
    expect(page.locator(".office365-access")).to_contain_text(page.url.split("/settings")[0] + "/email-oauth")
    grant_access(page)
    trust_sign_in_service(page, identity_server, tmp_path)
    sign_in(page, identity_server, alice.address)

    # Back on the form (/email-oauth sent us here), everything typed is still there.
    expect(page.get_by_role("status").filter(has_text="Signed in as Alice Admin")).to_be_visible()
    expect(page.locator(".signed-in")).to_contain_text(f"Signed in as Alice Admin ({alice.address})")
    expect(page.get_by_role("button", name="Switch Account")).to_be_visible()
    expect(page.get_by_label("Endpoint", exact=True)).to_have_value(ews_server.url)

    trust_tokens(ews_server, identity_server, logins)
    press_test_and_save(page)
    alert = failed_status(page, "untrusted_certificate")  # now Exchange's own certificate
    expect(alert.locator("code.fingerprint")).to_have_text(ews_server.cert.sha256_fingerprint)
    upload(page, "Certificate file", tmp_path / "ews.pem", ews_server.cert.cert_pem)
    press_test_and_save(page)
    expect_saved_ok(page)
    row = page.get_by_role("row", name=re.compile("Phishing reports"))
    expect(row).to_contain_text("Signed in as Alice Admin")
    conn = saved(page.org)
    assert conn.oauth_account_username == alice.address and "bearer" in ews_server.logins(alice.login)
    assert conn.oauth_token_expires_at is not None and conn.oauth_last_refresh_at is not None

    # Switch Account on the saved connection.
    row.get_by_role("link", name="Phishing reports").click()
    expect(page.locator(".signed-in")).to_contain_text("Signed in as Alice Admin")
    grant_access(page, "Switch Account")
    sign_in(page, identity_server, bob.address)
    expect(page.locator(".signed-in")).to_contain_text(f"Signed in as Bob Backup ({bob.address})")
    trust_tokens(ews_server, identity_server, logins)
    press_test_and_save(page)
    expect_saved_ok(page)
    expect(page.get_by_role("row", name=re.compile("Phishing reports"))).to_contain_text("Signed in as Bob Backup")
    assert saved(page.org).oauth_account_username == bob.address
    assert "bearer" in ews_server.logins(bob.login)
    assert page.js_errors == []


@pytest.mark.browser
def test_grant_access_then_test_and_save_with_microsoft_graph(oauth_page, identity_server, entra_app,
                                                              graph_server, tmp_path):
    page = oauth_page
    address = "carol@contoso.example"
    graph_server.put(address, mail("reported phish"))
    identity_server.add_account(address, "Carol Curator")

    fill_oauth(page, identity_server, entra_app, address, protocol="graph", graph=graph_server.base_url)
    grant_access(page)
    # One file with both certificates: the sign-in service's and Graph's.
    trust_sign_in_service(page, identity_server, tmp_path, also=graph_server.cert.cert_pem)
    sign_in(page, identity_server, address)
    expect(page.locator(".signed-in")).to_contain_text("Signed in as Carol Curator")
    expect(page.get_by_role("button", name="Switch Account")).to_be_visible()
    press_test_and_save(page)
    expect_saved_ok(page)
    expect(page.get_by_role("status").filter(has_text="1 unread")).to_be_visible()
    expect(page.get_by_role("row", name=re.compile("Phishing reports"))).to_contain_text("Signed in as Carol Curator")
    assert any(r["path"].startswith("/v1.0/users/") for r in graph_server.requests)


@pytest.mark.browser
def test_sign_in_errors_come_back_to_the_form_in_words(oauth_page, identity_server, entra_app, ews_server, tmp_path):
    page = oauth_page
    identity_server.add_account("dave@contoso.example", "Dave")
    fill_oauth(page, identity_server, entra_app, "dave@contoso.example", endpoint=ews_server.url)
    grant_access(page)
    trust_sign_in_service(page, identity_server, tmp_path)

    sign_in(page, identity_server, "dave@contoso.example", accept=False)  # Cancel on Microsoft's page
    flash = page.locator(".flash-error")
    expect(flash).to_contain_text("The sign-in was cancelled: the permission request was declined (AADSTS65004).")
    expect(flash).to_contain_text("Click Grant Access again and accept the permissions")
    expect(page.get_by_role("button", name="Grant Access", exact=True)).to_be_visible()  # no account yet

    # The app loses its EWS permission in Entra: consent is now required.
    entra_app.delegated_permissions.discard("EWS.AccessAsUser.All")
    grant_access(page)  # the form came back as a draft: the uploaded certificate is still trusted
    sign_in(page, identity_server, "dave@contoso.example")
    expect(page.locator(".flash-error")).to_contain_text(
        f"The Entra app {entra_app.client_id} has not been granted the permissions Intake asks for (AADSTS65001).")
    expect(page.get_by_label("Application (Client) ID")).to_have_value(entra_app.client_id)


def test_an_expired_or_replayed_sign_in_answer_is_refused_in_words_and_sets_no_cookie(client):
    """The answer arrives as a cross-site POST without the session cookie:
    the page must not set one, or it would replace the admin's session."""
    resp = client.post("/email-oauth", data={"state": "not-a-known-state", "code": "0.AXYZ"})
    assert resp.status_code == 400
    assert "This sign-in has expired or was already used. Press Grant Access again." in resp.get_data(as_text=True)
    assert "Set-Cookie" not in resp.headers
