"""ImapConnector and connectors.tls against a real Dovecot.

All mail is generated here; every test uses its own Dovecot user.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import io
import logging
import os
import socket
import ssl
import subprocess
import tracemalloc
from email.utils import format_datetime, make_msgid

import pytest
from cryptography.hazmat.primitives import serialization

from connectors.base import ConnectionSettings, OAuthSettings, RemoteMessage
from connectors.errors import ConnectorError
from connectors.imap import ImapConnector
from connectors.tls import (client_context, describe_certificates, load_certificate_upload,
                            probe_certificate)
from tests.support.certs import free_port, make_cert
from tests.support.requires import require_binary


# -- helpers -----------------------------------------------------------------

def make_message(subject: str = "Suspicious invoice", body_size: int = 0) -> tuple[bytes, str]:
    """An RFC 5322 message with CRLF line ends; returns (raw, message_id)."""
    message_id = make_msgid(domain="sender.example.test")
    head = (f"From: Sender <sender@sender.example.test>\r\nTo: soc@example.test\r\n"
            f"Subject: {subject}\r\nDate: {format_datetime(dt.datetime.now(dt.timezone.utc))}\r\n"
            f"Message-ID: {message_id}\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n")
    body = b"Please see the attached invoice.\r\n"
    if body_size:
        # Distinct lines, so a chunk written twice or out of order changes the hash.
        lines, n = [], 0
        while n < body_size:
            line = f"{n:010d} {hashlib.sha256(str(n).encode()).hexdigest()}\r\n".encode()
            lines.append(line)
            n += len(line)
        body = b"".join(lines)
    return head.encode() + body, message_id


def imap_settings(server, user, password, *, encryption="ssl", trust=True, folder="", **kw) -> ConnectionSettings:
    port = server.ssl_port if encryption == "ssl" else server.plain_port
    trusted = load_certificate_upload(server.cert.cert_pem) if trust else ""
    values = dict(protocol="imap", host=server.host, port=port, encryption=encryption, email_address=user,
                  password=password, source_folder=folder, trusted_cert_pem=trusted,
                  connect_timeout=5, read_timeout=15)
    values.update(kw)
    return ConnectionSettings(**values)


def diagnosis_of(settings, **kw):
    with pytest.raises(ConnectorError) as info:
        with ImapConnector(settings, **kw):
            pass
    return info.value.diagnosis


def openssl_fingerprint(cert_path) -> str:
    out = subprocess.run([require_binary("openssl"), "x509", "-noout", "-fingerprint", "-sha256",
                          "-in", str(cert_path)], check=True, capture_output=True, text=True).stdout
    return out.strip().split("=", 1)[1]


def logged_in(server, user) -> bool:
    """Did the server ever accept (or even see) this user's credentials?"""
    return f"user=<{user}>" in server.log_path.read_text(errors="replace")


@pytest.fixture
def mailbox(dovecot):
    return dovecot.add_user()


# -- trust and certificates ----------------------------------------------------

@pytest.mark.parametrize("encryption", ["ssl", "starttls"])
def test_untrusted_cert_shows_fingerprint_openssl_prints(dovecot, mailbox, encryption):
    user, password = mailbox
    d = diagnosis_of(imap_settings(dovecot, user, password, encryption=encryption, trust=False))
    assert d.code == "untrusted_certificate"
    assert d.field == "trusted_certificate"
    assert d.certificate is not None, "the admin must be shown the certificate the server presented"
    assert d.certificate.sha256_fingerprint == openssl_fingerprint(dovecot.cert.cert_path)
    assert d.certificate.self_signed
    assert "CN=localhost" in d.certificate.subject
    assert load_certificate_upload(d.certificate.pem_chain.encode()) == dovecot.cert.cert_pem.decode()
    assert not logged_in(dovecot, user), "credentials were sent over an unverified connection"


@pytest.mark.parametrize("encryption", ["ssl", "starttls"])
def test_uploaded_cert_then_login_succeeds(dovecot, mailbox, encryption):
    user, password = mailbox
    dovecot.append(user, make_message()[0])
    steps = []
    with ImapConnector(imap_settings(dovecot, user, password, encryption=encryption), steps.append) as c:
        result = c.check()
    assert (result.folder, result.unread) == ("INBOX", 1)
    assert "TLS" in result.detail
    assert steps == ["connecting", "logging in", "opening folder"]


def test_plain_none_encryption_logs_in(dovecot, mailbox):
    user, password = mailbox
    with ImapConnector(imap_settings(dovecot, user, password, encryption="none", trust=False)) as c:
        result = c.check()
    assert (result.folder, result.unread) == ("INBOX", 0)
    assert "no encryption" in result.detail


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])  # OpenSSL reports IPs and names differently
def test_certificate_for_another_host_name(dovecot_wrong_name, host):
    user, password = dovecot_wrong_name.add_user()
    # Even with its certificate uploaded, the name must still match.
    d = diagnosis_of(imap_settings(dovecot_wrong_name, user, password, host=host))
    assert d.code == "hostname_mismatch"
    assert d.field == "host"
    assert host in d.message
    assert d.certificate is not None and "mail.example.test" in d.certificate.subject
    assert not logged_in(dovecot_wrong_name, user)


def test_cert_uploaded_for_one_connection_not_trusted_by_another(dovecot):
    alice, alice_pw = dovecot.add_user()
    bob, bob_pw = dovecot.add_user()
    with ImapConnector(imap_settings(dovecot, alice, alice_pw)) as c:
        c.check()
    assert diagnosis_of(imap_settings(dovecot, bob, bob_pw, trust=False)).code == "untrusted_certificate"
    # ...and nothing leaked into the process-wide default trust.
    with socket.create_connection((dovecot.host, dovecot.ssl_port), timeout=5) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            ssl.create_default_context().wrap_socket(raw, server_hostname=dovecot.host)


def test_ca_signed_leaf_uploaded_alone_is_trusted(dovecot_factory, tmp_path):
    # Admins often upload the server certificate, not the (private) root CA.
    ca = make_cert(tmp_path, "ca", common_name="Intake Test Root CA", is_ca=True)
    leaf = make_cert(tmp_path, "leaf", issuer=ca)
    server = dovecot_factory.start("casigned", cert=leaf)
    user, password = server.add_user()
    with ImapConnector(imap_settings(server, user, password)) as c:
        assert c.check().unread == 0
    presented = probe_certificate(server.host, server.ssl_port)
    assert not presented.self_signed
    assert "Intake Test Root CA" in presented.issuer


def test_expired_server_certificate_says_expired(dovecot_factory, tmp_path):
    expired = make_cert(tmp_path, "expired", expired=True)
    server = dovecot_factory.start("expired", cert=expired)
    user, password = server.add_user()
    # Trusted when uploaded, expired since: expiry is still enforced.
    settings = imap_settings(server, user, password, trust=False, trusted_cert_pem=expired.cert_pem.decode())
    d = diagnosis_of(settings)
    assert d.code == "certificate_expired"
    assert d.certificate is not None
    assert not logged_in(server, user)


def test_starttls_not_offered_refuses_to_send_password(dovecot_no_starttls):
    user, password = dovecot_no_starttls.add_user()
    settings = imap_settings(dovecot_no_starttls, user, password, encryption="starttls", trust=False)
    d = diagnosis_of(settings)
    assert d.code == "starttls_unavailable"
    assert d.field == "encryption"
    assert "did not send the password" in d.message
    assert not logged_in(dovecot_no_starttls, user)


# -- network and login failures --------------------------------------------------

def test_wrong_password_says_authentication_failed(dovecot, mailbox, caplog):
    user, _ = mailbox
    wrong = "Wr0ng-Pa55word-xyz"
    caplog.set_level(logging.DEBUG)
    d = diagnosis_of(imap_settings(dovecot, user, wrong))
    assert d.code == "auth_failed"
    assert d.field == "password"
    assert user in d.message
    assert wrong not in str(d.to_dict())
    assert wrong not in caplog.text, "the password must never reach the logs"


def test_unknown_host_says_dns(dovecot):
    settings = ConnectionSettings(protocol="imap", host="no-such-mail-host.invalid", port=993,
                                  email_address="a@example.test", password="x", connect_timeout=5)
    d = diagnosis_of(settings)
    assert d.code == "dns_not_found"
    assert d.field == "host"


def test_closed_port_says_refused():
    settings = ConnectionSettings(protocol="imap", host="127.0.0.1", port=free_port(), encryption="ssl",
                                  email_address="a@example.test", password="x", connect_timeout=5)
    d = diagnosis_of(settings)
    assert d.code == "connection_refused"
    assert d.field == "port"


def test_ssl_chosen_for_plain_port_says_tls_handshake(dovecot, mailbox):
    user, password = mailbox
    settings = imap_settings(dovecot, user, password, port=dovecot.plain_port)
    assert diagnosis_of(settings).code == "tls_handshake"


def test_starttls_chosen_for_tls_port_times_out_with_a_hint(dovecot, mailbox):
    user, password = mailbox
    # The server waits for a TLS hello, we wait for its IMAP greeting.
    settings = imap_settings(dovecot, user, password, encryption="starttls", port=dovecot.ssl_port,
                             connect_timeout=1)
    d = diagnosis_of(settings)
    assert d.code == "timeout"
    assert "choose SSL/TLS" in d.hint


def test_xoauth2_logs_in_to_the_shared_mailbox_named_after_the_backslash(dovecot, mailbox):
    user, password = mailbox
    # Dovecot's xoauth2 checks the bearer token like a password, so the
    # fixture user's password stands in for an access token.
    settings = imap_settings(dovecot, f"delegate@example.test\\{user}", "",
                             oauth=OAuthSettings(client_id="00000000-0000-0000-0000-000000000000"))
    with ImapConnector(settings, access_token=password) as c:
        assert c.check().folder == "INBOX"
    d = diagnosis_of(settings, access_token="expired-token")
    assert d.code == "auth_failed"
    assert "expired-token" not in str(d.to_dict())


# -- folders -------------------------------------------------------------------

def test_missing_folder_names_it(dovecot, mailbox):
    user, password = mailbox
    dovecot.create_folder(user, "Reports/Phishing")
    d = diagnosis_of(imap_settings(dovecot, user, password, folder="Reports/Phish"))
    assert d.code == "folder_not_found"
    assert d.field == "source_folder"
    assert "Reports/Phish" in d.message
    assert "INBOX" in d.hint and "Reports/Phishing" in d.hint


def test_nested_folder_with_server_delimiter(dovecot, mailbox):
    user, password = mailbox
    assert dovecot.delimiter == "."  # the admin types "/", the server uses "."
    dovecot.create_folder(user, "Reports/Phishing")
    dovecot.append(user, make_message()[0], folder="Reports/Phishing")
    for typed in ("Reports/Phishing", "reports/phishing", "/Reports/Phishing/"):
        with ImapConnector(imap_settings(dovecot, user, password, folder=typed)) as c:
            result = c.check()
            assert c.folder == "Reports.Phishing"
        assert (result.folder, result.unread) == ("Reports/Phishing", 1)


# -- reading mail --------------------------------------------------------------

def test_list_unread_oldest_first_and_fetch_does_not_mark_read(dovecot, mailbox):
    user, password = mailbox
    sent = [make_message(f"mail {i}") for i in range(3)]
    uids = [dovecot.append(user, raw) for raw, _ in sent]
    dovecot.append(user, make_message("already read")[0], seen=True)
    with ImapConnector(imap_settings(dovecot, user, password)) as c:
        listed = c.list_unread(10)
        assert [m.key for m in listed] == [f"{c.uidvalidity}:{uid}" for uid in uids]
        assert [m.message_id for m in listed] == [mid for _, mid in sent]
        assert [m.size for m in listed] == [len(raw) for raw, _ in sent]
        assert all(dt.datetime.fromisoformat(m.received).utcoffset() == dt.timedelta(0) for m in listed)
        assert [m.key for m in c.list_unread(2)] == [m.key for m in listed[:2]]
        for message, (raw, _) in zip(listed, sent):
            dest = io.BytesIO()
            assert c.fetch_raw(message, dest) == len(raw)
            assert dest.getvalue() == raw
    assert dovecot.unseen(user) == uids


def test_mark_read_sets_seen(dovecot, mailbox):
    user, password = mailbox
    uids = [dovecot.append(user, make_message(f"mail {i}")[0]) for i in range(3)]
    with ImapConnector(imap_settings(dovecot, user, password)) as c:
        listed = c.list_unread(10)
        stale = RemoteMessage(key=f"{c.uidvalidity + 1}:{uids[2]}")
        c.mark_read(listed[:2] + [stale])
        assert [m.key for m in c.list_unread(10)] == [listed[2].key]
    assert dovecot.unseen(user) == [uids[2]], "a key from another UIDVALIDITY must not be flagged"


def test_large_message_fetched_in_chunks_intact(dovecot, mailbox, tmp_path):
    user, password = mailbox
    raw, _ = make_message("big attachment", body_size=8 * 1024 * 1024)
    dovecot.append(user, raw)
    with ImapConnector(imap_settings(dovecot, user, password, encryption="none", trust=False)) as c:
        [message] = c.list_unread(10)
        assert message.size == len(raw)
        fetches = _record_fetches(c)
        tracemalloc.start()
        try:
            with open(tmp_path / "big.eml", "wb") as dest:
                written = c.fetch_raw(message, dest)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert written == len(raw)
    assert hashlib.sha256((tmp_path / "big.eml").read_bytes()).hexdigest() == hashlib.sha256(raw).hexdigest()
    assert len(fetches) >= 8 and all("BODY.PEEK[]<" in f for f in fetches)
    # About four copies of one 1 MiB chunk inside imaplib's reader and parser;
    # fetching the whole message at once would hold several times 8 MB.
    assert peak < 6 * 1024 * 1024, f"fetching 8 MB held {peak / 2**20:.1f} MiB at once"
    assert dovecot.unseen(user) != []


def test_fetch_raw_batch_streams_all_in_one_fetch_with_bounded_memory(dovecot, mailbox, tmp_path):
    user, password = mailbox
    small = [make_message(f"small {i}")[0] for i in range(5)]
    big = make_message("big", body_size=8 * 1024 * 1024)[0]
    for raw in small[:3] + [big] + small[3:]:
        dovecot.append(user, raw)
    with ImapConnector(imap_settings(dovecot, user, password, encryption="none", trust=False)) as c:
        listed = c.list_unread(10)
        commands = _record_commands(c)
        tracemalloc.start()
        try:
            written = c.fetch_raw_batch(listed, lambda m: open(tmp_path / m.key.replace(":", "_"), "wb"))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        c.check()  # the connection is still in step after the streamed response
    expected = small[:3] + [big] + small[3:]
    assert [written[m.key] for m in listed] == [len(r) for r in expected]
    assert [(tmp_path / m.key.replace(":", "_")).read_bytes() for m in listed] == expected
    assert [c for c in commands if "FETCH" in c] == ["UID FETCH"], "small and big: one command"
    # The 8 MB body went to its file in pieces of at most one CHUNK_SIZE.
    assert peak < 3 * 1024 * 1024, f"fetching 8 MB held {peak / 2**20:.1f} MiB at once"
    assert len(dovecot.unseen(user)) == 6


def test_fetch_raw_batch_leaves_out_what_the_server_no_longer_has(dovecot, mailbox, tmp_path):
    user, password = mailbox
    raws = [make_message(f"mail {i}")[0] for i in range(3)]
    uids = [dovecot.append(user, raw) for raw in raws]
    with ImapConnector(imap_settings(dovecot, user, password)) as c:  # over TLS, the socket read directly
        listed = c.list_unread(10)
        with dovecot.client(user) as other:  # someone else deletes the middle one meanwhile
            other.select_folder("INBOX")
            other.delete_messages([uids[1]])
            other.expunge()
        written = c.fetch_raw_batch(listed, lambda m: open(tmp_path / m.key.replace(":", "_"), "wb"))
        assert sorted(written) == sorted([listed[0].key, listed[2].key])
        assert [(tmp_path / m.key.replace(":", "_")).read_bytes() for m in (listed[0], listed[2])] == [raws[0], raws[2]]
        c.mark_read(listed)  # still in step
    assert dovecot.unseen(user) == []


# -- the streamed FETCH against scripted server responses ---------------------------

class _ScriptedImap:
    """Just enough of imaplib.IMAP4 for `_fetch_responses`: the server's
    bytes come from a script (`{tag}` stands for the command's tag)."""

    def __init__(self, script: bytes):
        self.stream = io.BytesIO(script.replace(b"{tag}", b"A1"))
        self.tagged_commands = {}
        self.sent = []

    def _command(self, *args):
        self.sent.append(args)
        self.tagged_commands[b"A1"] = None
        return b"A1"

    def readline(self):
        return self.stream.readline()

    def read(self, size):
        return self.stream.read(size)


class _ScriptedClient:
    def __init__(self, script: bytes):
        self._imap = _ScriptedImap(script)
        self.shut = False

    def shutdown(self):
        self.shut = True


def _scripted(script: bytes) -> ImapConnector:
    c = ImapConnector(ConnectionSettings(protocol="imap", host="imap.example.test", encryption="none"))
    c._client, c.uidvalidity, c.folder = _ScriptedClient(script), 7, "INBOX"
    return c


class _Sink:
    """dest_factory that keeps what was written and how each file ended."""

    def __init__(self):
        self.files, self.ended = {}, {}

    def __call__(self, m):
        sink = self

        class Dest(io.BytesIO):
            def __exit__(self, exc_type, *rest):
                sink.files[m.key] = self.getvalue()
                sink.ended[m.key] = "ok" if exc_type is None else "failed"
                return super().__exit__(exc_type, *rest)
        return Dest()


def _refs(*uids):
    return [RemoteMessage(key=f"7:{uid}", size=10) for uid in uids]


def test_streamed_fetch_takes_items_in_any_order_and_skips_unsolicited_responses():
    c = _scripted(b"* 1 FETCH (UID 10 BODY[] {5}\r\nhello)\r\n"
                  b"* 9 EXISTS\r\n"
                  b"* 4 FETCH (FLAGS (\\Seen) UID 99)\r\n"  # someone else's flag change
                  b"* 5 FETCH (UID 98 BODY[HEADER] {3}\r\nabc)\r\n"  # not ours, with a literal
                  b"* 2 FETCH (BODY[] {6}\r\nworld! UID 11)\r\n"  # the UID after the body
                  b"* 3 FETCH (UID 12 BODY[] {0}\r\n)\r\n"  # empty
                  b"{tag} OK Fetch completed.\r\n")
    sink = _Sink()
    written = c.fetch_raw_batch(_refs(10, 11, 12), sink)
    assert written == {"7:10": 5, "7:11": 6, "7:12": 0}
    assert sink.files == {"7:10": b"hello", "7:11": b"world!", "7:12": b""}
    assert c._client._imap.sent == [("UID", "FETCH", b"10:12", b"(UID BODY.PEEK[])")]
    assert c._client._imap.tagged_commands == {} and not c._client.shut


def test_streamed_fetch_fetches_alone_a_large_body_sent_before_its_uid(monkeypatch):
    c = _scripted(b"* 1 FETCH (BODY[] {12}\r\nlarge body!! UID 10)\r\n"
                  b"{tag} OK Fetch completed.\r\n")
    c.CHUNK_SIZE = 4  # "large": more than one piece, too much to hold until the UID comes
    alone = []

    def fetch_raw(message, dest):
        alone.append(message.key)
        dest.write(b"large body!!")
        return 12
    monkeypatch.setattr(c, "fetch_raw", fetch_raw)
    sink = _Sink()
    assert c.fetch_raw_batch(_refs(10), sink) == {"7:10": 12}
    assert alone == ["7:10"] and sink.files == {"7:10": b"large body!!"}


def test_streamed_fetch_no_from_the_server_leaves_the_missing_ones_out():
    c = _scripted(b"* 1 FETCH (UID 10 BODY[] {2}\r\nhi)\r\n"
                  b"{tag} NO Some messages could not be FETCHed\r\n")
    sink = _Sink()
    assert c.fetch_raw_batch(_refs(10, 11), sink) == {"7:10": 2}
    assert not c._client.shut


def test_streamed_fetch_cut_off_inside_a_body_fails_that_file_and_the_connection():
    c = _scripted(b"* 1 FETCH (UID 10 BODY[] {2}\r\nhi)\r\n"
                  b"* 2 FETCH (UID 11 BODY[] {100}\r\nonly part of it")
    sink = _Sink()
    with pytest.raises(ConnectorError) as info:
        c.fetch_raw_batch(_refs(10, 11), sink)
    assert info.value.diagnosis.code == "connection_lost"
    assert sink.ended == {"7:10": "ok", "7:11": "failed"}
    assert c._client.shut, "the rest of the response must not be read as the next command's answer"


def _record_commands(connector) -> list[str]:
    """Spy on the commands the connector sends, as "UID FETCH", "UID STORE"..."""
    calls: list[str] = []
    imap = connector._client._imap
    real = imap._command

    def command(name, *args):
        calls.append(" ".join([name] + [a for a in args[:1] if a in ("FETCH", "STORE", "SEARCH")]))
        return real(name, *args)

    imap._command = command
    return calls


def test_uidvalidity_change_refuses_old_keys(dovecot, mailbox):
    user, password = mailbox
    dovecot.create_folder(user, "Quarantine")
    dovecot.append(user, make_message()[0], folder="Quarantine")
    settings = imap_settings(dovecot, user, password, folder="Quarantine")
    with ImapConnector(settings) as c:
        [old] = c.list_unread(10)
    with dovecot.client(user) as admin:  # the folder is deleted and recreated
        admin.delete_folder("Quarantine")
        admin.create_folder("Quarantine")
    dovecot.append(user, make_message()[0], folder="Quarantine")
    with ImapConnector(settings) as c:
        with pytest.raises(ConnectorError) as info:
            c.fetch_raw(old, io.BytesIO())
        assert info.value.diagnosis.code == "uidvalidity_changed"
        c.mark_read([old])  # ignored, not applied to whatever has that UID now
    assert len(dovecot.unseen(user, "Quarantine")) == 1


def _record_fetches(connector) -> list[str]:
    """Spy on the FETCH commands the connector sends."""
    calls: list[str] = []
    client = connector._client
    real = client.fetch

    def fetch(messages, data, *args, **kw):
        calls.append(" ".join(d.decode() if isinstance(d, bytes) else d for d in data))
        return real(messages, data, *args, **kw)

    client.fetch = fetch
    return calls


# -- uploads -------------------------------------------------------------------

def test_load_certificate_upload_accepts_pem_der_chain_rejects_key_and_garbage(tmp_path):
    ca = make_cert(tmp_path, "ca", common_name="Upload CA", is_ca=True)
    leaf = make_cert(tmp_path, "leaf", issuer=ca)
    pem = leaf.cert_pem.decode()

    assert load_certificate_upload(leaf.cert_pem) == pem
    assert load_certificate_upload(leaf.der) == pem  # .der / binary .cer
    assert load_certificate_upload(b"Bag Attributes\n  friendlyName: mail\n" + leaf.cert_pem) == pem
    chain = load_certificate_upload(leaf.cert_pem + ca.cert_pem + leaf.cert_pem)  # duplicate dropped
    assert chain == pem + ca.cert_pem.decode()
    described = describe_certificates(chain)
    assert [c["sha256_fingerprint"] for c in described] == [leaf.sha256_fingerprint, ca.sha256_fingerprint]
    assert described[0]["issuer"] == described[1]["subject"]
    client_context(chain)  # usable as trust

    with pytest.raises(ValueError, match="contains a private key; upload only the certificate"):
        load_certificate_upload(leaf.cert_pem + leaf.key_pem)
    der_key = serialization.load_pem_private_key(leaf.key_pem, None).private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    with pytest.raises(ValueError, match="private key"):
        load_certificate_upload(der_key)
    for garbage in (b"hello, this is a text file\n", os.urandom(2000),
                    b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n"):
        with pytest.raises(ValueError, match=r"This file is not a certificate \(PEM, CRT or DER\)"):
            load_certificate_upload(garbage)
    with pytest.raises(ValueError, match="empty"):
        load_certificate_upload(b"")
    with pytest.raises(ValueError, match="64 KiB"):
        load_certificate_upload(leaf.cert_pem * 100)
    with pytest.raises(ValueError, match="expired on"):
        load_certificate_upload(make_cert(tmp_path, "old", expired=True).cert_pem)
