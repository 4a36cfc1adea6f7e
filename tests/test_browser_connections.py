"""The connections page in a real browser, as an admin uses it."""
from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

pytestmark = pytest.mark.browser


def open_add_form(page):
    page.goto("/settings/connections/")
    page.get_by_role("link", name="Add Connection +").click()
    page.wait_for_load_state()  # htmx starts on DOMContentLoaded
    page.get_by_label("Name", exact=True).fill("Phishing reports")


def choose_protocol(page, value):
    """Pick a Protocol and wait for its field group to be swapped in."""
    with page.expect_response(lambda r: "/settings/connections/fields" in r.url):
        page.get_by_label("Protocol").select_option(value)
    page.locator(f'.protocol-group[data-protocol="{value}"]').wait_for()


def choose_imap(page, dovecot, email, password, encryption="SSL/TLS", port=None):
    choose_protocol(page, "imap")
    page.get_by_label("Host Name").fill(dovecot.host)
    page.get_by_label(encryption, exact=True).check()
    if port is not None:
        page.get_by_label("Port").fill(str(port))
    page.get_by_label("Email Address").fill(email)
    page.get_by_label("Password", exact=True).fill(password)


def press_test_and_save(page):
    page.get_by_role("button", name="Test and Save Connection").click()


def save_plain_imap(page, dovecot):
    """Add an IMAP connection without encryption and land back on the list."""
    email, password = dovecot.add_user()
    open_add_form(page)
    choose_imap(page, dovecot, email, password, encryption="None", port=dovecot.plain_port)
    press_test_and_save(page)
    page.wait_for_url(re.compile(r"/settings/connections/$"))


@pytest.mark.parametrize("encryption", ["SSL/TLS", "STARTTLS"])
def test_untrusted_cert_then_upload_then_saved_in_browser(admin_page, dovecot, tmp_path, encryption):
    page = admin_page
    email, password = dovecot.add_user()
    open_add_form(page)
    port = dovecot.ssl_port if encryption == "SSL/TLS" else dovecot.plain_port
    choose_imap(page, dovecot, email, password, encryption=encryption, port=port)
    expect_url = page.url
    press_test_and_save(page)
    alert = page.locator(".status.failed")
    alert.wait_for()
    assert "not trusted" in alert.inner_text()
    assert dovecot.cert.sha256_fingerprint in page.locator("code.fingerprint").inner_text()
    assert page.url == expect_url  # no reload: everything typed is still there
    assert page.get_by_label("Password", exact=True).input_value() == password
    cert_file = tmp_path / "server.pem"
    cert_file.write_bytes(dovecot.cert.cert_pem)
    page.get_by_label("Certificate file").set_input_files(str(cert_file))
    press_test_and_save(page)
    page.wait_for_url(re.compile(r"/settings/connections/$"))
    row = page.get_by_role("row", name=re.compile("Phishing reports"))
    assert "OK" in row.inner_text()
    assert page.get_by_role("status").filter(has_text="Connection saved").is_visible()


def test_imap_without_encryption_saves(admin_page, dovecot):
    page = admin_page
    save_plain_imap(page, dovecot)
    assert "OK" in page.get_by_role("row", name=re.compile("Phishing reports")).inner_text()


def test_protocol_switch_swaps_fields_without_reload_and_proxy_reveals(admin_page):
    page = admin_page
    open_add_form(page)
    page.evaluate("window.__same_page = true")
    assert page.get_by_label("API Name").input_value() == "Phishing_reports"  # suggested from the Name
    choose_protocol(page, "exchange")
    page.get_by_label("Email Address").fill("kept@example.com")
    assert page.get_by_label("Endpoint").is_visible()
    choose_protocol(page, "imap")
    assert page.get_by_label("Port").input_value() == "993"
    page.get_by_label("STARTTLS", exact=True).check()
    assert page.get_by_label("Port").input_value() == "143"
    assert page.get_by_label("Email Address").input_value() == "kept@example.com"
    page.get_by_label("Host Name").fill("imap.example.com")
    with page.expect_response(lambda r: "/settings/connections/fields" in r.url):
        page.get_by_label("Authentication").select_option("xoauth2")  # Office 365 IMAP: OAuth, no password
    expect(page.get_by_label("Application (Client) ID")).to_be_visible()
    assert page.get_by_label("Password", exact=True).count() == 0
    assert page.get_by_label("Host Name").input_value() == "imap.example.com"
    assert page.get_by_label("Port").input_value() == "143"
    choose_protocol(page, "oauth")
    assert page.get_by_label("Directory (Tenant) ID").is_visible()
    assert page.get_by_text("Office 365 Access").is_visible()
    assert page.get_by_role("button", name="Grant Access").is_visible()
    page.get_by_role("button", name="Proxy", exact=True).click()
    page.get_by_label("Proxy Host Name").wait_for()
    for label in ("Proxy Protocol", "Proxy Port", "Proxy User name", "Proxy Password"):
        assert page.get_by_label(label).is_visible()
    assert page.evaluate("window.__same_page") is True
    assert page.js_errors == []


def test_invalid_inputs_show_messages_beside_fields(admin_page):
    page = admin_page
    open_add_form(page)
    page.get_by_label("API Name").fill("bad name")
    choose_protocol(page, "exchange")
    page.get_by_label("Endpoint").fill("http://mail.example.com")
    page.get_by_label("Email Address").fill("primary@example.com\\notanaddress")
    press_test_and_save(page)
    expect(page.locator("#err-api_name")).to_contain_text("Use letters, digits and underscores")
    expect(page.locator("#err-endpoint")).to_contain_text("must start with https://")
    expect(page.locator("#err-email_address")).to_contain_text("must be an email address")
    expect(page.locator("#err-password")).to_contain_text("Enter the password")
    assert page.get_by_label("Endpoint").input_value() == "http://mail.example.com"


def test_delete_asks_first_and_removes_row(admin_page, dovecot):
    page = admin_page
    save_plain_imap(page, dovecot)
    asked = []
    page.once("dialog", lambda d: (asked.append(d.message), d.dismiss()))
    page.get_by_role("button", name="Delete Phishing reports").click()
    assert asked and "Delete the connection Phishing reports?" in asked[0]
    assert page.get_by_role("row", name=re.compile("Phishing reports")).count() == 1
    page.once("dialog", lambda d: d.accept())
    page.get_by_role("button", name="Delete Phishing reports").click()
    page.get_by_role("row", name=re.compile("Phishing reports")).wait_for(state="detached")
