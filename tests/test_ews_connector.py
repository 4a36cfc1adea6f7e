"""The Exchange (EWS) connector against a local HTTPS EWS server speaking
NTLM and Basic, through exchangelib as in production."""
from __future__ import annotations

import datetime as dt
import io
import socket
from dataclasses import replace
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid

import pytest
from exchangelib import OAuth2AuthorizationCodeCredentials
from exchangelib.protocol import Protocol
from oauthlib.oauth2 import OAuth2Token

from connectors.base import ConnectionSettings
from connectors.errors import ConnectorError, Diagnosis
from connectors.ews import ExchangeConnector
from connectors.tls import load_certificate_upload


# --------------------------------------------------------------------------- helpers


def mail(subject: str, *, body: str = "Please verify your account.") -> bytes:
    msg = EmailMessage()
    msg["From"] = "Payroll <payroll@phish.example>"
    msg["To"] = "victim@intake.test"
    msg["Subject"] = subject
    msg["Date"] = format_datetime(dt.datetime.now(dt.timezone.utc))
    msg["Message-ID"] = make_msgid(domain="phish.example")
    msg.set_content(f"{body}\n")
    return msg.as_bytes()


def settings(server, address: str, password: str, *, trust: bool = True, **kw) -> ConnectionSettings:
    return ConnectionSettings(
        protocol="exchange",
        email_address=address,
        password=password,
        endpoint=kw.pop("endpoint", server.url),
        trusted_cert_pem=server.cert.cert_pem.decode() if trust else "",
        connect_timeout=kw.pop("connect_timeout", 5),
        read_timeout=kw.pop("read_timeout", 10),
        **kw,
    )


def account_settings(server, acct, **kw) -> ConnectionSettings:
    return settings(server, acct.address, acct.password, **kw)


def failure(s: ConnectionSettings, **kw) -> Diagnosis:
    with pytest.raises(ConnectorError) as info:
        with ExchangeConnector(s, **kw) as c:
            c.check()
    return info.value.diagnosis


def check(s: ConnectionSettings, **kw):
    with ExchangeConnector(s, **kw) as c:
        return c.check()


# --------------------------------------------------------------------------- reading mail


def test_unread_mail_is_listed_oldest_first_fetched_whole_and_marked_read(ews_server):
    acct = ews_server.new_account()
    t0 = dt.datetime(2024, 5, 1, 9, 0, tzinfo=dt.timezone.utc)
    newest = ews_server.put(acct.address, mail("newest"), received=t0 + dt.timedelta(hours=2))
    oldest_raw = mail("oldest", body="x" * 5000)
    oldest = ews_server.put(acct.address, oldest_raw, received=t0)
    middle = ews_server.put(acct.address, mail("middle"), received=t0 + dt.timedelta(hours=1))
    ews_server.put(acct.address, mail("already read"), received=t0 - dt.timedelta(days=1), is_read=True)
    steps = []

    with ExchangeConnector(account_settings(ews_server, acct), progress=steps.append) as c:
        assert c.check().unread == 3
        listed = c.list_unread(10)
        assert [m.key for m in listed] == [oldest, middle, newest]
        assert listed[0].size == len(oldest_raw)
        assert listed[0].received.startswith("2024-05-01T09:00:00")
        assert listed[0].extra["changekey"]

        dest = io.BytesIO()
        assert c.fetch_raw(listed[0], dest) == len(oldest_raw)
        assert dest.getvalue() == oldest_raw
        assert not ews_server.is_read(oldest), "fetching must not mark the message read"

        c.mark_read(listed[:2])
        assert ews_server.is_read(oldest) and ews_server.is_read(middle)
        assert not ews_server.is_read(newest)
        assert [m.key for m in c.list_unread(10)] == [newest]
        assert c.check().unread == 1
    assert steps == ["connecting", "logging in", "opening folder"]


def test_list_unread_stops_at_the_limit_with_the_oldest(ews_server):
    acct = ews_server.new_account()
    t0 = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
    ids = [ews_server.put(acct.address, mail(f"m{i}"), received=t0 + dt.timedelta(minutes=i)) for i in range(5)]
    with ExchangeConnector(account_settings(ews_server, acct)) as c:
        assert [m.key for m in c.list_unread(2)] == ids[:2]
        assert c.list_unread(0) == []


def test_a_message_deleted_after_listing_is_reported_not_fetched(ews_server):
    acct = ews_server.new_account()
    item = ews_server.put(acct.address, mail("gone soon"))
    with ExchangeConnector(account_settings(ews_server, acct)) as c:
        [listed] = c.list_unread(5)
        ews_server.delete(item)
        with pytest.raises(ConnectorError) as info:
            c.fetch_raw(listed, io.BytesIO())
        assert info.value.diagnosis.code == "message_not_found"
        c.mark_read([listed])  # already gone: nothing to flag, no error


# --------------------------------------------------------------------------- folders


def test_source_folder_below_the_inbox_is_found_case_insensitively(ews_server):
    acct = ews_server.new_account()
    ews_server.put(acct.address, mail("in inbox"))
    phish = ews_server.put(acct.address, mail("reported"), folder="Inbox/Phishing/Reported")
    s = account_settings(ews_server, acct, source_folder="inbox/phishing/reported")
    with ExchangeConnector(s) as c:
        result = c.check()
        assert (result.folder, result.unread) == ("Inbox/Phishing/Reported", 1)
        assert [m.key for m in c.list_unread(5)] == [phish]


def test_source_folder_outside_the_inbox_starts_at_the_top_of_the_mailbox(ews_server):
    acct = ews_server.new_account()
    item = ews_server.put(acct.address, mail("archived"), folder="Security/Reports")
    with ExchangeConnector(account_settings(ews_server, acct, source_folder="Security/Reports")) as c:
        assert [m.key for m in c.list_unread(5)] == [item]


def test_missing_source_folder_names_the_folder(ews_server):
    acct = ews_server.new_account()
    ews_server.add_folder(acct.address, "Inbox/Phishing")
    d = failure(account_settings(ews_server, acct, source_folder="Inbox/Phishing/Nope"))
    assert d.code == "folder_not_found"
    assert d.field == "source_folder"
    assert "'Nope'" in d.message and "Inbox/Phishing" in d.message and acct.address in d.message


# --------------------------------------------------------------------------- logins and mailboxes


def test_ntlm_is_used_when_the_server_offers_it(ews_server):
    acct = ews_server.new_account()
    check(account_settings(ews_server, acct))
    assert set(ews_server.logins(acct.login)) == {"ntlm"}


def test_basic_auth_works_when_it_is_all_the_server_offers(make_ews_server):
    server = make_ews_server("ews-basic", auth_schemes=("basic",))
    acct = server.new_account()
    server.put(acct.address, mail("hello"))
    assert check(account_settings(server, acct)).unread == 1
    assert set(server.logins(acct.login)) == {"basic"}


def test_domain_login_reads_its_own_mailbox(ews_server):
    acct = ews_server.new_account(domain_login=True)
    ews_server.put(acct.address, mail("hi"))
    s = settings(ews_server, f"{acct.login}\\{acct.address}", acct.password)
    assert check(s).unread == 1
    assert ews_server.logins(acct.login) == ["ntlm"]


def test_shared_mailbox_is_read_with_the_primary_address_login(ews_server):
    primary = ews_server.new_account("analyst")
    shared = ews_server.new_shared_mailbox("phishing")
    ews_server.grant(shared, primary.login)
    item = ews_server.put(shared, mail("reported by a user"))

    with ExchangeConnector(settings(ews_server, f"{primary.address}\\{shared}", primary.password)) as c:
        assert c.check().unread == 1
        [listed] = c.list_unread(5)
        c.mark_read([listed])
    assert listed.key == item and ews_server.is_read(item)
    assert {who for _, who in ews_server.accesses(shared)} == {primary.login}


def test_shared_mailbox_is_read_with_a_domain_login(ews_server):
    primary = ews_server.new_account("analyst", domain_login=True)
    shared = ews_server.new_shared_mailbox("phishing")
    ews_server.grant(shared, primary.login)
    ews_server.put(shared, mail("reported"))
    s = settings(ews_server, f"{primary.login}\\{shared}", primary.password)
    assert check(s).unread == 1
    assert {who for _, who in ews_server.accesses(shared)} == {primary.login.lower()}


def test_delegate_with_rights_on_the_inbox_only_never_needs_the_root_folder(ews_server):
    primary = ews_server.new_account("analyst")
    shared = ews_server.new_shared_mailbox("phishing")
    ews_server.grant(shared, primary.login, folder="Inbox")
    item = ews_server.put(shared, mail("reported"), folder="Inbox/Reported")
    login = f"{primary.address}\\{shared}"

    with ExchangeConnector(settings(ews_server, login, primary.password, source_folder="Inbox/Reported")) as c:
        [listed] = c.list_unread(5)
        c.mark_read([listed])
    assert ews_server.is_read(item)
    d = failure(settings(ews_server, login, primary.password, source_folder="Security"))
    assert d.code == "access_denied"


def test_shared_mailbox_without_rights_is_access_denied(ews_server):
    primary = ews_server.new_account("analyst")
    shared = ews_server.new_shared_mailbox("phishing")
    d = failure(settings(ews_server, f"{primary.address}\\{shared}", primary.password))
    assert d.code == "access_denied"
    assert d.field == "email_address"
    assert primary.address in d.message and shared in d.message
    assert "Full Access" in d.hint


def test_unknown_mailbox_is_mailbox_not_found(ews_server):
    primary = ews_server.new_account("analyst")
    missing = ews_server.new_address("nobody")
    d = failure(settings(ews_server, f"{primary.address}\\{missing}", primary.password))
    assert d.code == "mailbox_not_found"
    assert d.field == "email_address"
    assert missing in d.message


def test_missing_folder_unknown_mailbox_and_access_denied_read_differently(ews_server):
    primary = ews_server.new_account("analyst")
    shared = ews_server.new_shared_mailbox()
    messages = {
        failure(settings(ews_server, primary.address, primary.password, source_folder="Inbox/Nope")).message,
        failure(settings(ews_server, f"{primary.address}\\{ews_server.new_address('x')}", primary.password)).message,
        failure(settings(ews_server, f"{primary.address}\\{shared}", primary.password)).message,
    }
    assert len(messages) == 3


def test_wrong_password_is_auth_failed_without_the_password(ews_server):
    acct = ews_server.new_account()
    wrong = "Wrong-Passw0rd-123"
    d = failure(settings(ews_server, acct.address, wrong))
    assert d.code == "auth_failed"
    assert d.field == "password"
    assert "401" in d.message and acct.address in d.message
    assert wrong not in str(d.to_dict()) and acct.password not in str(d.to_dict())


def test_plain_http_endpoint_is_refused_before_sending_the_password(ews_server):
    acct = ews_server.new_account()
    d = failure(account_settings(ews_server, acct, endpoint=f"http://127.0.0.1:{ews_server.port}/EWS/Exchange.asmx"))
    assert (d.code, d.field) == ("invalid_endpoint", "endpoint")
    assert ews_server.logins(acct.login) == []


def test_an_address_without_a_mailbox_part_is_rejected_before_connecting(ews_server):
    d = failure(settings(ews_server, "INTAKE\\jdoe", "pw"))
    assert (d.code, d.field) == ("invalid_email", "email_address")


def test_oauth_credentials_with_impersonation_open_another_users_mailbox(ews_server):
    app_login = ews_server.new_address("app")
    ews_server.add_token("token-" + app_login, app_login, impersonation=True)
    user = ews_server.new_account("employee")
    ews_server.put(user.address, mail("reported"))
    creds = OAuth2AuthorizationCodeCredentials(access_token=OAuth2Token(
        {"access_token": "token-" + app_login, "token_type": "Bearer", "expires_in": 3600}))
    s = settings(ews_server, user.address, "")

    assert check(s, credentials=creds, impersonate=True).unread == 1
    assert ews_server.logins(app_login) and set(ews_server.logins(app_login)) == {"bearer"}
    # Without impersonation the app is just another login without rights.
    assert failure(s, credentials=creds).code == "access_denied"


def test_impersonation_needs_oauth_credentials():
    with pytest.raises(ValueError):
        ExchangeConnector(ConnectionSettings("exchange", email_address="a@b.c"), impersonate=True)


# --------------------------------------------------------------------------- TLS


def test_untrusted_certificate_shows_the_certificate_and_uploading_it_fixes_it(ews_server):
    acct = ews_server.new_account()
    d = failure(account_settings(ews_server, acct, trust=False))
    assert d.code == "untrusted_certificate"
    assert d.certificate is not None
    assert d.certificate.sha256_fingerprint == ews_server.cert.sha256_fingerprint
    assert ews_server.logins(acct.login) == [], "no login over an unverified connection"

    # What the admin uploads is often the DER file the browser exported.
    pem = load_certificate_upload(ews_server.cert.der)
    assert check(replace(account_settings(ews_server, acct, trust=False), trusted_cert_pem=pem)).unread == 0


def test_certificate_for_another_host_name_is_hostname_mismatch(make_ews_server):
    server = make_ews_server("ews-othername", hostnames=("mail.other.test",))
    acct = server.new_account()
    d = failure(account_settings(server, acct, endpoint=server.url_for("localhost")))
    assert d.code == "hostname_mismatch"
    assert "localhost" in d.message


def test_two_servers_with_different_certificates_each_trust_only_their_own(ews_server, make_ews_server):
    other = make_ews_server("ews-second")
    a, b = ews_server.new_account(), other.new_account()
    ews_server.put(a.address, mail("for a"))
    other.put(b.address, mail("for b 1"))
    other.put(b.address, mail("for b 2"))
    # b's endpoint with a's certificate: must not borrow b's trust from the other connection.
    crossed = replace(account_settings(other, b), trusted_cert_pem=ews_server.cert.cert_pem.decode())

    with ExchangeConnector(account_settings(ews_server, a)) as ca, \
            ExchangeConnector(account_settings(other, b)) as cb:
        assert ca.check().unread == 1
        assert cb.check().unread == 2
        assert failure(crossed).code == "untrusted_certificate"
        assert len(ca.list_unread(5)) == 1
        assert len(cb.list_unread(5)) == 2
        ca.mark_read(ca.list_unread(5))
        assert cb.check().unread == 2 and ca.check().unread == 0


def test_environment_ca_bundle_and_proxy_do_not_override_the_connection(ews_server, monkeypatch, tmp_path):
    acct = ews_server.new_account()
    # The environment trusts the server and points at a dead proxy...
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ews_server.cert.cert_path))
    monkeypatch.setenv("CURL_CA_BUNDLE", str(ews_server.cert.cert_path))
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.setenv(var, f"http://127.0.0.1:{dead_port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    # ...yet a connection without an uploaded certificate is still untrusted,
    assert failure(account_settings(ews_server, acct, trust=False)).code == "untrusted_certificate"
    # and one with it goes direct, not through the environment's proxy.
    assert check(account_settings(ews_server, acct)).unread == 0


# --------------------------------------------------------------------------- network and server failures


def test_nothing_listening_is_connection_refused(ews_server):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = failure(settings(ews_server, "a@intake.test", "pw", endpoint=f"https://127.0.0.1:{port}/EWS/Exchange.asmx"))
    assert (d.code, d.field) == ("connection_refused", "endpoint")


def test_unknown_host_is_dns_not_found(ews_server):
    d = failure(settings(ews_server, "a@intake.test", "pw", endpoint="https://mail.intake-nonexistent.invalid/EWS/Exchange.asmx"))
    assert d.code == "dns_not_found"
    assert "mail.intake-nonexistent.invalid" in d.message


def test_a_server_that_never_answers_is_timeout(ews_server):
    with socket.socket() as silent:  # accepts TCP (backlog) but never speaks TLS
        silent.bind(("127.0.0.1", 0))
        silent.listen(5)
        port = silent.getsockname()[1]
        d = failure(settings(ews_server, "a@intake.test", "pw", connect_timeout=1, read_timeout=1,
                             endpoint=f"https://127.0.0.1:{port}/EWS/Exchange.asmx"))
    assert d.code == "timeout"


def test_server_busy_asks_to_retry_after_the_back_off(ews_server):
    acct = ews_server.new_account()
    ews_server.fail(acct.address, "server_busy", back_off_ms=45000)
    d = failure(account_settings(ews_server, acct))
    assert d.code == "server_busy"
    assert d.retry_after == 45.0
    assert "45 seconds" in d.message


def test_server_busy_while_listing_is_reported_by_list_unread(ews_server):
    acct = ews_server.new_account()
    with ExchangeConnector(account_settings(ews_server, acct)) as c:
        ews_server.fail(acct.address, "server_busy", back_off_ms=2500, ops={"FindItem"})
        with pytest.raises(ConnectorError) as info:
            c.list_unread(5)
    assert (info.value.diagnosis.code, info.value.diagnosis.retry_after) == ("server_busy", 2.5)


def test_invalid_xml_from_the_server_is_invalid_response(ews_server):
    acct = ews_server.new_account()
    ews_server.fail(acct.address, "invalid_xml")
    d = failure(account_settings(ews_server, acct))
    assert d.code == "invalid_response"
    assert "not valid EWS XML" in d.message


def test_wrong_path_on_the_server_is_wrong_endpoint(ews_server):
    acct = ews_server.new_account()
    d = failure(account_settings(ews_server, acct, endpoint=ews_server.url.replace("/EWS/Exchange.asmx", "/owa/")))
    assert (d.code, d.field) == ("wrong_endpoint", "endpoint")


# --------------------------------------------------------------------------- isolation inside exchangelib


def test_same_login_twice_keeps_separate_timeouts_and_nothing_stays_cached(ews_server):
    acct = ews_server.new_account()
    fast = account_settings(ews_server, acct, connect_timeout=2, read_timeout=3)
    slow = account_settings(ews_server, acct, connect_timeout=4, read_timeout=30)
    with ExchangeConnector(fast) as a, ExchangeConnector(slow) as b:
        pa, pb = a._account.protocol, b._account.protocol
        assert pa is not pb
        assert (pa.TIMEOUT, pb.TIMEOUT) == ((2, 3), (4, 30))
        a.check(), b.check()
    with pytest.raises(KeyError):
        Protocol[pa.config]
