"""The Dovecot test server is real: TLS, STARTTLS, logins and mail work."""
from __future__ import annotations

import imapclient
import pytest
from cryptography import x509

from tests.support.dovecot import trusting_context


def _message(subject: str) -> bytes:
    return f"From: a@example.test\r\nTo: b@example.test\r\nSubject: {subject}\r\n\r\nhello\r\n".encode()


def test_login_over_implicit_tls(dovecot):
    user, password = dovecot.add_user()
    with imapclient.IMAPClient(dovecot.host, dovecot.ssl_port, ssl=True,
                               ssl_context=trusting_context(dovecot), timeout=5) as c:
        c.login(user, password)
        assert c.socket().version().startswith("TLS")
        assert c.select_folder("INBOX")[b"EXISTS"] == 0


def test_login_over_starttls(dovecot):
    user, password = dovecot.add_user()
    with imapclient.IMAPClient(dovecot.host, dovecot.plain_port, ssl=False, timeout=5) as c:
        assert c.has_capability("STARTTLS")
        c.starttls(trusting_context(dovecot))
        c.login(user, password)
        assert c.socket().version().startswith("TLS")


def test_wrong_password_is_refused(dovecot):
    user, _ = dovecot.add_user()
    with imapclient.IMAPClient(dovecot.host, dovecot.plain_port, ssl=False, timeout=5) as c:
        with pytest.raises(imapclient.exceptions.LoginError):
            c.login(user, "not-the-password")


def test_users_are_separate_and_helpers_see_mail(dovecot):
    alice, _ = dovecot.add_user()
    bob, _ = dovecot.add_user()
    first = dovecot.append(alice, _message("one"))
    dovecot.append(alice, _message("two"), seen=True)
    dovecot.create_folder(alice, "Reports/Phishing")
    dovecot.append(alice, _message("three"), folder="Reports/Phishing")
    assert dovecot.unseen(alice) == [first]
    assert dovecot.count(alice, "INBOX") == 2
    assert dovecot.count(alice, "Reports/Phishing") == 1
    assert dovecot.count(bob, "INBOX") == 0


def test_instance_without_tls_offers_no_starttls(dovecot_no_starttls):
    user, password = dovecot_no_starttls.add_user()
    assert dovecot_no_starttls.ssl_port is None
    with imapclient.IMAPClient(dovecot_no_starttls.host, dovecot_no_starttls.plain_port, ssl=False, timeout=5) as c:
        assert not c.has_capability("STARTTLS")
        c.login(user, password)


def test_wrong_name_instance_certificate_names_another_host(dovecot_wrong_name):
    san = dovecot_wrong_name.cert.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert [n.value for n in san.value] == ["mail.example.test"]
