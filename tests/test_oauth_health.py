"""Office 365 sign-in health on the list and the connection page: account,
token times, failing sign-ins, and warnings 30 days before the client
secret or certificate expires."""
from __future__ import annotations

import datetime as dt

import pytest

from models import EmailConnection, db, utcnow
from models.oauth_health import oauth_health
from tests.support.certs import make_cert

TODAY = dt.date(2026, 11, 30)


def conn(**over) -> EmailConnection:
    fields = dict(protocol="graph", oauth_access="delegated", oauth_client_auth="secret",
                  oauth_account_username="alice@contoso.example", oauth_account_name="Alice", status="ok")
    fields.update(over)
    return EmailConnection(**fields)


@pytest.mark.parametrize("days, warned", [(31, False), (30, True), (1, True), (0, True), (-1, True)])
def test_client_secret_is_warned_about_30_days_ahead(days, warned):
    health = oauth_health(conn(oauth_secret_expires=TODAY + dt.timedelta(days=days)), today=TODAY)
    assert bool(health.warnings) == warned
    if warned:
        expiry = f"{TODAY + dt.timedelta(days=days):%Y-%m-%d}"
        assert expiry in health.warnings[0] and expiry in health.short_warnings[0]
        assert ("expired on" if days < 0 else "expires on") in health.warnings[0]
        assert "Certificates & secrets" in health.warnings[0]


def test_certificate_expiry_is_read_from_the_uploaded_certificate(tmp_path):
    soon = make_cert(tmp_path, "soon", days=10).cert_pem.decode()
    later = make_cert(tmp_path, "later", days=90).cert_pem.decode()
    today = dt.datetime.now(dt.timezone.utc).date()
    warned = oauth_health(conn(oauth_client_auth="certificate", oauth_cert_pem=soon), today=today)
    assert "The certificate of the Entra app expires on" in warned.warnings[0]
    assert not oauth_health(conn(oauth_client_auth="certificate", oauth_cert_pem=later), today=today).warnings
    # Only the credential in use counts.
    assert not oauth_health(conn(oauth_cert_pem=soon), today=today).warnings


@pytest.mark.parametrize("over, state", [
    ({}, "ok"),
    ({"status": "grant", "last_error": "The Office 365 sign-in is no longer valid."}, "grant"),
    ({"status": "failing", "last_error_code": "oauth_invalid_client", "last_error": "rejected"}, "failing"),
    ({"status": "failing", "last_error_code": "timeout", "last_error": "slow"}, "ok"),  # not a sign-in problem
    ({"oauth_account_username": ""}, "not_granted"),
    ({"oauth_account_username": "", "oauth_access": "application"}, "ok"),
])
def test_sign_in_state(over, state):
    assert oauth_health(conn(**over), today=TODAY).state == state


def test_password_connections_have_no_oauth_health():
    assert oauth_health(conn(protocol="exchange")) is None
    assert oauth_health(conn(protocol="imap", imap_auth="password")) is None
    assert oauth_health(conn(protocol="imap", imap_auth="xoauth2")) is not None


def test_list_and_connection_page_show_token_state_and_expiry_warning(admin_client):
    now = utcnow()
    with db.connection_context():
        EmailConnection.create(
            organization=admin_client.org, name="Phish box", api_name="Phish_box", protocol="oauth",
            endpoint="https://outlook.office365.com/EWS/Exchange.asmx", email_address="alice@contoso.example",
            oauth_client_id="00000000-0000-0000-0000-000000000001", oauth_account_username="alice@contoso.example",
            oauth_account_name="Alice Admin", oauth_secret_expires=dt.date.today() + dt.timedelta(days=12),
            oauth_token_expires_at=now + dt.timedelta(minutes=50), oauth_last_refresh_at=now, status="grant",
            last_error="The Office 365 sign-in of alice@contoso.example is no longer valid.")
    rows = admin_client.get("/settings/connections/rows", headers={"HX-Request": "true"}).get_data(as_text=True)
    assert "Grant Access again" in rows and "Signed in as Alice Admin" in rows and "Client secret expires" in rows
    page = admin_client.get("/settings/connections/Phish_box").get_data(as_text=True)
    assert "Signed in as Alice Admin (alice@contoso.example)" in page
    assert "Valid until" in page and "Last token refresh" in page
    assert "The client secret of the Entra app expires on" in page and "Renew soon." in page
    assert "<strong>Grant Access again.</strong> The Office 365 sign-in of alice@contoso.example" in page
