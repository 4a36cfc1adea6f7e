"""Per-connection proxies through a real squid (HTTP and HTTPS listeners,
Basic auth): the EWS connector end to end, and connectors.http's own
session and diagnosis, which every HTTP connector shares."""
from __future__ import annotations

import datetime as dt
import socket
from dataclasses import replace
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid

import pytest
import requests

from connectors.base import ConnectionSettings, ProxySettings
from connectors.errors import ConnectorError, Diagnosis
from connectors.ews import ExchangeConnector
from connectors.http import diagnose_http, session_for


def mail(subject: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = "it-support@phish.example"
    msg["To"] = "victim@intake.test"
    msg["Subject"] = subject
    msg["Date"] = format_datetime(dt.datetime.now(dt.timezone.utc))
    msg["Message-ID"] = make_msgid(domain="phish.example")
    msg.set_content("Your mailbox is full. Click here.\n")
    return msg.as_bytes()


def ews_settings(server, acct, proxy: ProxySettings | None, **kw) -> ConnectionSettings:
    return ConnectionSettings(
        protocol="exchange",
        email_address=acct.address,
        password=acct.password,
        endpoint=kw.pop("endpoint", server.url),
        trusted_cert_pem=kw.pop("trusted_cert_pem", server.cert.cert_pem.decode()),
        proxy=proxy,
        connect_timeout=5,
        read_timeout=10,
        **kw,
    )


def failure(s: ConnectionSettings) -> Diagnosis:
    with pytest.raises(ConnectorError) as info:
        with ExchangeConnector(s) as c:
            c.check()
    return info.value.diagnosis


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- EWS through squid


def test_exchange_through_an_authenticated_http_proxy(ews_server, http_proxy):
    acct = ews_server.new_account()
    item = ews_server.put(acct.address, mail("via proxy"))
    with ExchangeConnector(ews_settings(ews_server, acct, http_proxy.settings())) as c:
        assert c.check().unread == 1
        [listed] = c.list_unread(5)
        c.mark_read([listed])
    assert listed.key == item and ews_server.is_read(item)
    tunnels = http_proxy.tunnels(ews_server.port)
    assert tunnels and all(f"user={http_proxy.username}" in line for line in tunnels)


def test_wrong_proxy_password_is_proxy_auth_failed(ews_server, http_proxy):
    acct = ews_server.new_account()
    d = failure(ews_settings(ews_server, acct, http_proxy.settings(password="not-the-password")))
    assert d.code == "proxy_auth_failed"
    assert "407" in d.message
    assert d.field == "proxy_password"
    assert "not-the-password" not in str(d.to_dict())
    assert ews_server.logins(acct.login) == []


def test_proxy_without_credentials_is_proxy_auth_required(ews_server, http_proxy):
    acct = ews_server.new_account()
    d = failure(ews_settings(ews_server, acct, http_proxy.settings(username="", password="")))
    assert (d.code, d.field) == ("proxy_auth_required", "proxy_username")


def test_https_proxy_certificate_must_be_uploaded(ews_server, https_proxy):
    acct = ews_server.new_account()
    ews_server.put(acct.address, mail("via https proxy"))

    d = failure(ews_settings(ews_server, acct, https_proxy.settings()))
    assert d.code == "proxy_untrusted_certificate"
    assert d.field == "proxy_certificate"
    assert ews_server.logins(acct.login) == []

    with ExchangeConnector(ews_settings(ews_server, acct, https_proxy.settings(trust=True))) as c:
        assert c.check().unread == 1
    assert https_proxy.tunnels(ews_server.port)


def test_untrusted_server_behind_a_working_proxy_blames_the_server(ews_server, http_proxy):
    acct = ews_server.new_account()
    d = failure(ews_settings(ews_server, acct, http_proxy.settings(), trusted_cert_pem=""))
    assert d.code == "untrusted_certificate"
    assert d.certificate is not None and d.certificate.sha256_fingerprint == ews_server.cert.sha256_fingerprint


def test_proxy_not_listening_is_proxy_unreachable(ews_server):
    acct = ews_server.new_account()
    d = failure(ews_settings(ews_server, acct, ProxySettings("http", "127.0.0.1", closed_port())))
    assert (d.code, d.field) == ("proxy_unreachable", "proxy_port")
    assert "refused" in d.message


def test_proxy_denying_the_destination_is_proxy_refused(ews_server, http_proxy):
    acct = ews_server.new_account()
    # squid only tunnels to 127.0.0.1; 127.0.0.2 is against its policy (403).
    d = failure(ews_settings(ews_server, acct, http_proxy.settings(), endpoint=ews_server.url_for("127.0.0.2")))
    assert d.code == "proxy_refused"
    assert "403" in d.message


def test_two_connections_with_their_own_certificates_and_proxies_interleaved(
        ews_server, make_ews_server, http_proxy, https_proxy):
    other = make_ews_server("ews-proxied")
    a, b = ews_server.new_account(), other.new_account()
    for i in range(2):
        ews_server.put(a.address, mail(f"a{i}"))
    for i in range(3):
        other.put(b.address, mail(f"b{i}"))
    via_http = ews_settings(ews_server, a, http_proxy.settings())
    via_https = ews_settings(other, b, https_proxy.settings(trust=True))

    with ExchangeConnector(via_http) as ca, ExchangeConnector(via_https) as cb:
        assert ca.check().unread == 2
        assert cb.check().unread == 3
        listed_a = ca.list_unread(10)
        listed_b = cb.list_unread(10)
        ca.mark_read(listed_a[:1])
        cb.mark_read(listed_b[:2])
        # A third connection in between: b's server through a's proxy with a's certificate.
        assert failure(replace(via_http, endpoint=other.url)).code == "untrusted_certificate"
        assert (ca.check().unread, cb.check().unread) == (1, 1)

    assert http_proxy.tunnels(ews_server.port) and not https_proxy.tunnels(ews_server.port, wait=0)
    # The third one, twice: its login attempt, then the probe that reads the untrusted certificate
    # through the same proxy (connectors.tls.probe_certificate with proxy=).
    assert https_proxy.tunnels(other.port) and len(http_proxy.tunnels(other.port, expect=2)) == 2


def test_environment_proxy_is_ignored_with_and_without_a_connection_proxy(ews_server, http_proxy, https_proxy,
                                                                        monkeypatch):
    acct = ews_server.new_account()
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.setenv(var, f"http://{http_proxy.username}:{http_proxy.password}@127.0.0.1:{http_proxy.port}")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(https_proxy.cert.cert_path))
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)

    with ExchangeConnector(ews_settings(ews_server, acct, None)) as c:
        c.check()
    # The environment's CA bundle (the proxy's certificate) must not make the HTTPS proxy trusted.
    assert failure(ews_settings(ews_server, acct, https_proxy.settings())).code == "proxy_untrusted_certificate"
    assert http_proxy.tunnels(ews_server.port, wait=0.5) == []


# --------------------------------------------------------------------------- connectors.http with squid


@pytest.fixture
def target(make_ews_server):
    """Any HTTPS server will do: the EWS one answers 405 to GET."""
    return make_ews_server("http-target")


def http_settings(target, proxy: ProxySettings | None, trust: bool = True) -> ConnectionSettings:
    return ConnectionSettings(protocol="graph", trusted_cert_pem=target.cert.cert_pem.decode() if trust else "",
                              proxy=proxy, connect_timeout=5, read_timeout=10)


def http_failure(target, s: ConnectionSettings, url: str | None = None) -> Diagnosis:
    url = url or target.url
    with pytest.raises(requests.RequestException) as info:
        session_for(s).get(url)
    d = diagnose_http(info.value, s, url, what="the server")
    assert d is not None, f"undiagnosed: {info.value!r}"
    return d


def test_session_goes_through_http_and_https_proxies(target, http_proxy, https_proxy):
    assert session_for(http_settings(target, http_proxy.settings())).get(target.url).status_code == 405
    assert session_for(http_settings(target, https_proxy.settings(trust=True))).get(target.url).status_code == 405


WRONG = "Wr0ng-Proxy-Passw0rd"


@pytest.mark.parametrize("case, code, field", [
    ("wrong password", "proxy_auth_failed", "proxy_password"),
    ("no credentials", "proxy_auth_required", "proxy_username"),
    ("untrusted https proxy", "proxy_untrusted_certificate", "proxy_certificate"),
    ("https to the http port", "proxy_unreachable", "proxy_protocol"),
    ("nothing listening", "proxy_unreachable", "proxy_port"),
    ("untrusted server behind the proxy", "untrusted_certificate", "trusted_certificate"),
])
def test_session_failures_through_squid_are_diagnosed(target, http_proxy, https_proxy, case, code, field):
    proxy, trust = {
        "wrong password": (http_proxy.settings(password=WRONG), True),
        "no credentials": (http_proxy.settings(username="", password=""), True),
        "untrusted https proxy": (https_proxy.settings(), True),
        "https to the http port": (replace(http_proxy.settings(), protocol="https"), True),
        "nothing listening": (ProxySettings("http", "127.0.0.1", closed_port()), True),
        "untrusted server behind the proxy": (https_proxy.settings(trust=True), False),
    }[case]
    d = http_failure(target, http_settings(target, proxy, trust))
    assert (d.code, d.field) == (code, field), d.message
    assert WRONG not in str(d.to_dict()) and http_proxy.password not in str(d.to_dict())


def test_session_proxy_upstream_failure_says_the_proxy_could_not_connect(target, http_proxy):
    url = f"https://127.0.0.1:{closed_port()}/"
    d = http_failure(target, http_settings(target, http_proxy.settings()), url)
    assert d.code == "proxy_refused"
    assert "could not connect" in d.message and "503" in d.message
