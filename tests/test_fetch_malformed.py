"""Hostile mail through the whole pipeline: every message ends stored and
processed or quarantined, none blocks the rest, none crashes the worker."""
from __future__ import annotations

import base64

from models import StoredMessage, db
from tests.test_fetch import append_many, fetch_and_process, imap_connection  # noqa: F401  (fixture)

CRLF = b"\r\n"


def head(subject: str, *extra: bytes) -> bytes:
    return CRLF.join([b"From: a@example.com", b"To: b@example.com", b"Subject: " + subject.encode(),
                      b"Message-ID: <" + subject.replace(" ", "-").encode() + b"@example.com>", *extra])


def malformed_set() -> dict[str, bytes]:
    """Generated here, shaped on the nastiest real-world cases (broken MIME,
    runaway headers and parts, wrong charsets, nesting bombs)."""
    deep = b"Hello" + CRLF
    for i in range(60):  # message/rfc822 inside message/rfc822 ...
        deep = CRLF.join([b"Content-Type: message/rfc822", b"", head(f"level {i}"), b"", deep])
    siblings = CRLF.join(
        [head("siblings", b'Content-Type: multipart/mixed; boundary="b"'), b""]
        + [b"--b" + CRLF + b"Content-Type: text/plain" + CRLF + CRLF + b"part %d" % i for i in range(3000)]
        + [b"--b--", b""])
    return {
        "missing closing boundary": CRLF.join([head("no close", b'Content-Type: multipart/mixed; boundary="x"'), b"",
                                               b"--x", b"Content-Type: text/plain", b"", b"body"]),
        "boundary never used": CRLF.join([head("unused", b'Content-Type: multipart/mixed; boundary="zzz"'), b"",
                                          b"just text"]),
        "nested identical boundaries": CRLF.join([
            head("same boundary", b'Content-Type: multipart/mixed; boundary="s"'), b"", b"--s",
            b'Content-Type: multipart/alternative; boundary="s"', b"", b"--s", b"Content-Type: text/plain", b"",
            b"inner", b"--s--", b"--s--"]),
        "unknown charset": CRLF.join([head("charset", b"Content-Type: text/plain; charset=x-klingon"), b"",
                                      b"\xe9\xe8 caf\xe9"]),
        "huge encoded subject": CRLF.join([
            b"From: a@example.com", b"Subject: " + b"\r\n ".join([b"=?utf-8?B?" + base64.b64encode(b"spam " * 9) + b"?="]
                                                               * 4000), b"", b"x"]),
        "huge To header": CRLF.join([head("to"), b"To: " + b", ".join(b"u%d@example.com" % i for i in range(6000)),
                                     b"", b"x"]),
        "thousands of siblings": siblings,
        "rfc822 nesting bomb": CRLF.join([head("deep", b"Content-Type: message/rfc822"), b"", deep]),
        "header line with only a space": CRLF.join([head("space"), b" ", b"X-After: yes", b"", b"body"]),
        "no blank line after headers": head("no blank") + CRLF + b"This line is body text.",
        "bad base64": CRLF.join([head("b64", b"Content-Type: text/plain", b"Content-Transfer-Encoding: base64"), b"",
                                 b"!!!not base64***==="]),
        "8-bit raw headers": CRLF.join([b"From: J\xf6rg <j@example.com>", b"Subject: Gr\xfc\xdfe \xe2\x82\xac",
                                        b"", b"x"]),
        "encoded word in encoded word": CRLF.join([head("x"), b"X-Weird: =?utf-8?Q?=3D=3Futf-8=3FB=3FSGk=3D=3F=3D?=",
                                                   b"", b"x"]),
        "garbage body after headers": head("garbage") + CRLF + CRLF + bytes(range(1, 256)) * 50,
        "not an email at all": b"\x89PNG\r\n\x1a\n" + bytes(range(1, 256)) * 40,
        "only a subject": b"Subject: lonely" + CRLF + CRLF,
    }


def test_every_malformed_mail_ends_processed_or_quarantined(imap_connection, dovecot, run_jobs):  # noqa: F811
    conn = imap_connection()
    cases = malformed_set()
    append_many(dovecot, conn.user, list(cases.values()))
    accepted = dovecot.count(conn.user)
    assert accepted >= len(cases) - 1  # the server may refuse the odd one; all it accepts must be handled
    result = fetch_and_process(conn, run_jobs)
    assert result["stored"] == accepted
    with db.connection_context():
        states = [m.state for m in StoredMessage.select().where(StoredMessage.connection == conn.id)]
        quarantined = [m.error for m in StoredMessage.select().where(
            (StoredMessage.connection == conn.id) & (StoredMessage.state == "quarantined"))]
    assert len(states) == accepted
    assert set(states) <= {"processed", "quarantined"}, states
    assert quarantined and all(quarantined)  # the non-email is quarantined, each saying why
    assert dovecot.unseen(conn.user) == []  # none was left behind to be retried forever
