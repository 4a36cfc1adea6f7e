"""Exchange (EWS) connections in a real browser: an untrusted server
certificate, an authenticated HTTP proxy, an HTTPS proxy with its own
certificate, and a wrong proxy password, as an admin meets them."""
from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from connectors.tls import probe_certificate
from tests.test_browser_connections import choose_protocol, open_add_form, press_test_and_save
from tests.test_proxies import mail


def fill_exchange(page, ews_server, acct):
    choose_protocol(page, "exchange")
    page.get_by_label("Endpoint").fill(ews_server.url)
    page.get_by_label("Email Address").fill(acct.address)
    page.get_by_label("Password", exact=True).fill(acct.password)


def fill_proxy(page, proxy, password=None):
    page.get_by_role("button", name="Proxy", exact=True).click()
    page.get_by_label("Proxy Host Name").wait_for()
    page.get_by_label("Proxy Protocol").select_option(proxy.protocol)
    page.get_by_label("Proxy Host Name").fill(proxy.host)
    page.get_by_label("Proxy Port").fill(str(proxy.port))
    page.get_by_label("Proxy User name").fill(proxy.username)
    page.get_by_label("Proxy Password").fill(proxy.password if password is None else password)


def failed_status(page, code: str):
    """The failed test's alert, once it says `code`."""
    alert = page.locator(f'.status.failed[data-code="{code}"]')
    alert.wait_for()
    return alert


def upload(page, label: str, path, pem: bytes):
    path.write_bytes(pem)
    page.get_by_label(label, exact=True).set_input_files(str(path))


def expect_saved_ok(page):
    page.wait_for_url(re.compile(r"/settings/connections/$"))
    expect(page.get_by_role("row", name=re.compile("Phishing reports"))).to_contain_text("OK")
    expect(page.get_by_role("status").filter(has_text="Connection saved")).to_be_visible()


def untrusted_server_then_upload(page, ews_server, tmp_path):
    """The untrusted-certificate flow: the page shows what the server
    presented and a "Certificate file" input; the upload makes it pass."""
    alert = failed_status(page, "untrusted_certificate")
    expect(alert).to_contain_text("not trusted")
    expect(alert.locator("code.fingerprint")).to_have_text(ews_server.cert.sha256_fingerprint)
    upload(page, "Certificate file", tmp_path / "exchange.pem", ews_server.cert.cert_pem)
    press_test_and_save(page)


@pytest.mark.browser
def test_exchange_with_an_untrusted_certificate_is_saved_after_uploading_it(admin_page, ews_server, tmp_path):
    page = admin_page
    acct = ews_server.new_account()
    ews_server.put(acct.address, mail("first report"))
    open_add_form(page)
    fill_exchange(page, ews_server, acct)
    press_test_and_save(page)
    untrusted_server_then_upload(page, ews_server, tmp_path)
    expect_saved_ok(page)
    assert "ntlm" in ews_server.logins(acct.login)
    assert page.js_errors == []


@pytest.mark.browser
def test_exchange_through_an_authenticated_http_proxy(admin_page, ews_server, http_proxy, tmp_path):
    page = admin_page
    acct = ews_server.new_account()
    open_add_form(page)
    fill_exchange(page, ews_server, acct)
    fill_proxy(page, http_proxy)
    press_test_and_save(page)
    # The certificate is read through the proxy too, and still shown.
    untrusted_server_then_upload(page, ews_server, tmp_path)
    expect_saved_ok(page)
    tunnels = http_proxy.tunnels(ews_server.port, expect=2)
    assert tunnels and all(f"user={http_proxy.username}" in line for line in tunnels)


@pytest.mark.browser
def test_exchange_through_an_https_proxy_after_uploading_its_certificate(admin_page, ews_server, https_proxy,
                                                                         tmp_path):
    page = admin_page
    acct = ews_server.new_account()
    open_add_form(page)
    fill_exchange(page, ews_server, acct)
    fill_proxy(page, https_proxy)
    press_test_and_save(page)
    alert = failed_status(page, "proxy_untrusted_certificate")
    expect(alert).to_contain_text(f"HTTPS proxy {https_proxy.host}:{https_proxy.port} is not trusted")
    upload(page, "Proxy certificate file", tmp_path / "proxy.pem", https_proxy.cert.cert_pem)
    press_test_and_save(page)
    # Past the proxy now: the server's own certificate, read through the HTTPS proxy's tunnel.
    untrusted_server_then_upload(page, ews_server, tmp_path)
    expect_saved_ok(page)
    assert https_proxy.tunnels(ews_server.port)


@pytest.mark.browser
def test_wrong_proxy_password_says_407_beside_the_proxy_password(admin_page, ews_server, http_proxy):
    page = admin_page
    acct = ews_server.new_account()
    open_add_form(page)
    fill_exchange(page, ews_server, acct)
    fill_proxy(page, http_proxy, password="not-the-proxy-password")
    press_test_and_save(page)
    alert = failed_status(page, "proxy_auth_failed")
    expect(alert).to_contain_text(f"The proxy at {http_proxy.host}:{http_proxy.port} rejected the user name or "
                                  "password (HTTP 407 Proxy Authentication Required).")
    expect(alert).to_contain_text("Check the Proxy User name and Proxy Password.")
    expect(page.locator("#err-proxy_password")).to_contain_text("407")
    assert "not-the-proxy-password" not in page.locator("#test-status").inner_text()
    assert ews_server.logins(acct.login) == []  # nothing reached Exchange


# --------------------------------------------------------------------------- the probe behind the pages


def test_probe_reads_the_server_certificate_through_an_http_proxy(ews_server, http_proxy):
    presented = probe_certificate("127.0.0.1", ews_server.port, proxy=http_proxy.settings())
    assert presented.sha256_fingerprint == ews_server.cert.sha256_fingerprint
    assert any(f"user={http_proxy.username}" in line for line in http_proxy.tunnels(ews_server.port))


def test_probe_reads_the_server_certificate_through_a_trusted_https_proxy(ews_server, https_proxy):
    presented = probe_certificate("127.0.0.1", ews_server.port, proxy=https_proxy.settings(trust=True))
    assert presented.sha256_fingerprint == ews_server.cert.sha256_fingerprint
    assert https_proxy.tunnels(ews_server.port)


def test_probe_never_sends_the_proxy_password_to_an_untrusted_https_proxy(ews_server, https_proxy):
    import ssl

    with pytest.raises(ssl.SSLCertVerificationError):
        probe_certificate("127.0.0.1", ews_server.port, proxy=https_proxy.settings())


def test_probe_refused_by_the_proxy_raises(ews_server, http_proxy):
    with pytest.raises(ConnectionRefusedError, match="407"):
        probe_certificate("127.0.0.1", ews_server.port, proxy=http_proxy.settings(password="wrong"))
