"""The Inbound Email Connections page: form, validation, Test and Save
against a real Dovecot, edit, delete, log."""
from __future__ import annotations

import io
import re

import pytest

from models import ConnectionLog, EmailConnection, db

BASE = "/settings/connections"


def imap_form(dovecot, email, password, **over) -> dict:
    data = {"name": "Phishing reports", "api_name": "Phishing_reports", "description": "",
            "protocol": "imap", "host": dovecot.host, "port": str(dovecot.ssl_port), "encryption": "ssl",
            "email_address": email, "password": password, "source_folder": "", "imap_auth": "password",
            "fetch_interval": "60", "routing": "incident"}
    data.update(over)
    return data


def submit_test(admin_client, run_jobs, data: dict, path: str = f"{BASE}/test", files: dict | None = None):
    """POST the form like htmx does, run the queued job, and poll once."""
    payload = dict(data)
    for name, (content, filename) in (files or {}).items():
        payload[name] = (io.BytesIO(content), filename)
    resp = admin_client.post(path, data=payload, content_type="multipart/form-data")
    assert resp.status_code == 200
    html = resp.get_data(as_text=True)
    m = re.search(r'hx-get="(/settings/connections/tests/[^"]+)"', html)
    if m is None:
        return resp, html  # validation errors, nothing queued
    run_jobs()
    status = admin_client.get(m.group(1))
    return status, status.get_data(as_text=True)


def saved(org, api_name="Phishing_reports"):
    with db.connection_context():
        return EmailConnection.get_or_none((EmailConnection.organization == org) & (EmailConnection.api_name == api_name))


def test_add_form_has_mailbox_and_connection_details_with_labels(admin_client):
    html = admin_client.get(f"{BASE}/new").get_data(as_text=True)
    for label in ("Name", "API Name", "Description", "Protocol", "Endpoint", "Email Address", "Password",
                  "Source Folder"):
        assert re.search(rf'<label for="[a-z_]+">{re.escape(label)}</label>', html), label
    assert "Test and Save Connection" in html and ">Proxy</button>" in html


@pytest.mark.parametrize("protocol, labels", [
    ("imap", ["Host Name", "Port", "Email Address", "Password", "Source Folder"]),
    ("exchange", ["Endpoint", "Email Address", "Password", "Source Folder"]),
    ("oauth", ["Endpoint", "Application (Client) ID", "Directory (Tenant) ID", "Client secret", "Email Address",
               "Source Folder"]),
    ("graph", ["Application (Client) ID", "Directory (Tenant) ID", "Client secret", "Graph Endpoint",
               "Authority Host"]),
])
def test_protocol_fragment_renders_its_group(admin_client, protocol, labels):
    html = admin_client.get(f"{BASE}/fields?protocol={protocol}&email_address=kept@example.com",
                            headers={"HX-Request": "true"}).get_data(as_text=True)
    assert "<html" not in html  # a fragment, not a page
    for label in labels:
        assert f">{label}</label>" in html, label
    if protocol == "imap":
        assert "SSL/TLS" in html and "STARTTLS" in html and 'value="993"' in html
    if protocol in ("oauth", "graph"):
        assert "Office 365 Access" in html and "Grant Access" in html and "/email-oauth" in html
    assert 'value="kept@example.com"' in html  # what was typed in shared fields is kept


def test_proxy_button_reveals_proxy_fields(admin_client):
    html = admin_client.get(f"{BASE}/proxy-fields", headers={"HX-Request": "true"}).get_data(as_text=True)
    for label in ("Proxy Protocol", "Proxy Host Name", "Proxy Port", "Proxy User name", "Proxy Password"):
        assert f">{label}</label>" in html


@pytest.mark.parametrize("field, value, message", [
    ("api_name", "has space", "Use letters, digits and underscores"),
    ("port", "70000", "Enter a port from 1 to 65535."),
    ("host", "https://mail.example.com/x", "Enter a host name"),
    ("email_address", "not-an-address", "Enter an email address"),
    ("email_address", "primary@example.com\\notshared", "The shared mailbox (after the last \\) must be an email"),
    ("password", "", "Enter the password for this email address."),
])
def test_invalid_imap_input_shows_message_beside_field(admin_client, run_jobs, dovecot, field, value, message):
    data = imap_form(dovecot, "u@example.com", "pw")
    data[field] = value
    resp, html = submit_test(admin_client, run_jobs, data)
    assert f'id="err-{field}" hx-swap-oob="true">' in html
    slot = re.search(rf'id="err-{field}" hx-swap-oob="true">([^<]*)<', html).group(1)
    assert message in slot.replace("&#39;", "'")
    assert "Nothing was tested or saved" in html


@pytest.mark.parametrize("field, value, message", [
    ("endpoint", "http://mail.example.com/EWS/Exchange.asmx", "must start with https://"),
    ("endpoint", "https://mail.example.com", "needs a path"),
    ("email_address", "domain\\user\\shared@example.com", None),
    ("email_address", "primary@example.com\\shared@example.com", None),
])
def test_exchange_endpoint_and_shared_mailbox_forms(admin_client, run_jobs, field, value, message):
    data = {"name": "Ex", "api_name": "Ex", "protocol": "exchange", "endpoint": "https://mail.example.com/EWS/Exchange.asmx",
            "email_address": "a@example.com", "password": "pw", "fetch_interval": "60", "routing": "incident"}
    data[field] = value
    resp = admin_client.post(f"{BASE}/test", data=data)
    html = resp.get_data(as_text=True)
    slot = re.search(rf'id="err-{field}" hx-swap-oob="true">([^<]*)<', html)
    if message is None:
        assert slot is None or slot.group(1) == ""
    else:
        assert message in slot.group(1)


def test_oauth_ids_must_be_guids_and_proxy_password_needs_user(admin_client):
    data = {"name": "O", "api_name": "O", "protocol": "oauth", "endpoint": "https://outlook.office365.com/EWS/Exchange.asmx",
            "oauth_client_id": "not-a-guid", "oauth_tenant_id": "bad tenant!", "oauth_client_auth": "secret",
            "oauth_client_secret": "x", "oauth_access": "delegated", "email_address": "a@example.com",
            "use_proxy": "1", "proxy_protocol": "http", "proxy_host": "proxy.example.com", "proxy_port": "3128",
            "proxy_password": "pp", "fetch_interval": "60", "routing": "incident"}
    html = admin_client.post(f"{BASE}/test", data=data).get_data(as_text=True)
    assert "Enter the ID as shown in Microsoft Entra" in html
    assert "Directory (Tenant) ID as a GUID or a domain" in html
    assert "Proxy User name: it is required when a proxy password is set" in html


def test_untrusted_cert_then_upload_then_saved(admin_client, run_jobs, dovecot):
    email, password = dovecot.add_user()
    data = imap_form(dovecot, email, password)
    status, html = submit_test(admin_client, run_jobs, data)
    assert 'data-code="untrusted_certificate"' in html
    assert dovecot.cert.sha256_fingerprint in html
    assert 'label for="trusted_certificate_upload">Certificate file</label>' in html
    assert saved(admin_client.org) is None  # nothing saved on failure
    status, html = submit_test(admin_client, run_jobs, data,
                                 files={"trusted_certificate": (dovecot.cert.cert_pem, "server.pem")})
    assert status.headers.get("HX-Redirect") == f"{BASE}/", html[:2000]
    conn = saved(admin_client.org)
    assert conn.status == "ok" and dovecot.cert.cert_pem.decode().strip() in conn.trusted_cert_pem
    listing = admin_client.get(f"{BASE}/").get_data(as_text=True)
    assert "Phishing_reports" in listing and "badge-ok" in listing
    with db.connection_context():
        assert ConnectionLog.select().where(ConnectionLog.connection == conn).count() == 1


def test_starttls_and_none_save_with_uploaded_der_certificate(admin_client, run_jobs, dovecot):
    email, password = dovecot.add_user()
    data = imap_form(dovecot, email, password, api_name="StartTLS", encryption="starttls", port=str(dovecot.plain_port))
    status, _ = submit_test(admin_client, run_jobs, data, files={"trusted_certificate": (dovecot.cert.der, "server.der")})
    assert status.headers.get("HX-Redirect")
    data = imap_form(dovecot, email, password, api_name="Plain", encryption="none", port=str(dovecot.plain_port))
    status, _ = submit_test(admin_client, run_jobs, data)
    assert status.headers.get("HX-Redirect")
    assert saved(admin_client.org, "Plain").status == "ok"


def test_wrong_password_message_and_nothing_saved(admin_client, run_jobs, dovecot):
    email, _ = dovecot.add_user()
    data = imap_form(dovecot, email, "wrong-password", encryption="none", port=str(dovecot.plain_port))
    _, html = submit_test(admin_client, run_jobs, data)
    assert 'data-code="auth_failed"' in html
    assert "wrong-password" not in html
    assert saved(admin_client.org) is None


def test_failed_retest_keeps_saved_settings_and_logs(admin_client, run_jobs, dovecot):
    email, password = dovecot.add_user()
    data = imap_form(dovecot, email, password, encryption="none", port=str(dovecot.plain_port))
    submit_test(admin_client, run_jobs, data)
    conn = saved(admin_client.org)
    bad = dict(data, host="127.0.0.1", port="1", password="")
    _, html = submit_test(admin_client, run_jobs, bad, path=f"{BASE}/{conn.api_name}/test")
    assert 'data-code="connection_refused"' in html
    again = saved(admin_client.org)
    assert again.port == dovecot.plain_port and again.status == "ok"
    log_html = admin_client.get(f"{BASE}/{conn.api_name}/log").get_data(as_text=True)
    log_html = log_html[log_html.index('id="log-rows"'):]
    assert "Test failed" in log_html and "Test succeeded" in log_html
    assert log_html.index("Test failed") < log_html.index("Test succeeded")  # newest first


def test_edit_keeps_stored_password_when_left_blank(admin_client, run_jobs, dovecot):
    email, password = dovecot.add_user()
    data = imap_form(dovecot, email, password, encryption="none", port=str(dovecot.plain_port))
    submit_test(admin_client, run_jobs, data)
    page = admin_client.get(f"{BASE}/Phishing_reports").get_data(as_text=True)
    assert password not in page and "Leave blank to keep the stored one." in page
    status, _ = submit_test(admin_client, run_jobs, dict(data, password="", description="edited"),
                              path=f"{BASE}/Phishing_reports/test")
    assert status.headers.get("HX-Redirect")
    conn = saved(admin_client.org)
    assert conn.description == "edited" and conn.password.reveal() == password


def test_api_name_unique_per_organization(admin_client, run_jobs, dovecot):
    email, password = dovecot.add_user()
    data = imap_form(dovecot, email, password, encryption="none", port=str(dovecot.plain_port))
    submit_test(admin_client, run_jobs, data)
    _, html = submit_test(admin_client, run_jobs, dict(data, name="Other"))
    assert "already used by another connection" in html


def test_delete_removes_row(admin_client, run_jobs, dovecot):
    email, password = dovecot.add_user()
    submit_test(admin_client, run_jobs, imap_form(dovecot, email, password, encryption="none",
                                                    port=str(dovecot.plain_port)))
    listing = admin_client.get(f"{BASE}/").get_data(as_text=True)
    assert 'hx-confirm="Delete the connection Phishing reports?' in listing
    resp = admin_client.delete(f"{BASE}/Phishing_reports")
    assert resp.status_code == 200 and resp.get_data() == b""
    assert saved(admin_client.org) is None


def test_job_arguments_and_redis_hold_no_secrets(admin_client, dovecot, redis_conn):
    email, password = dovecot.add_user(password="Very-Secret-Pass-42")
    admin_client.post(f"{BASE}/test", data=imap_form(dovecot, email, password))
    for key in redis_conn.keys("*"):
        if redis_conn.type(key) == b"hash":
            blob = b"".join(v for v in redis_conn.hvals(key))
        elif redis_conn.type(key) == b"string":
            blob = redis_conn.get(key)
        else:
            continue
        assert b"Very-Secret-Pass-42" not in blob, key


def test_imap_xoauth2_asks_for_the_app_registration_not_a_password(admin_client, dovecot):
    html = admin_client.get(f"{BASE}/fields?protocol=imap&imap_auth=xoauth2",
                            headers={"HX-Request": "true"}).get_data(as_text=True)
    assert "IMAP.AccessAsUser.All" in html and ">Application (Client) ID</label>" in html
    assert 'id="password"' not in html
    data = imap_form(dovecot, "user@example.com", "", imap_auth="xoauth2", oauth_client_id="nope",
                     oauth_client_auth="secret", oauth_access="delegated")
    html = admin_client.post(f"{BASE}/test", data=data).get_data(as_text=True)
    assert "Enter the ID as shown in Microsoft Entra" in html
    assert "Enter the client secret" in html
    assert "Enter the password for this email address." not in html


def test_list_is_paged(admin_client):
    with db.connection_context():
        for i in range(55):
            EmailConnection.create(organization=admin_client.org, name=f"Mailbox {i:02d}", api_name=f"M{i:02d}",
                                   protocol="imap", host="mail.example.com", port=993, email_address="a@example.com")
    first = admin_client.get(f"{BASE}/").get_data(as_text=True)
    assert "Mailbox 00" in first and "Mailbox 54" not in first
    assert "Page 1 of 2 (55 connections)" in first and "Next page" in first
    second = admin_client.get(f"{BASE}/?page=2").get_data(as_text=True)
    assert "Mailbox 54" in second and "Mailbox 00" not in second
