"""The fast MIME splitter builds exactly the stdlib parser's tree, or declines.

ingest/mimesplit.py replaces the stdlib's line-by-line feedparser for the
usual message; these tests compare the two trees (headers, payloads,
preambles, epilogues, defects) on well-formed mail, on the odd-but-valid
shapes the splitter must still get right, and on thousands of random
mutations: whenever the splitter answers, its answer is the stdlib's.
"""
from __future__ import annotations

import base64
import random
from email import policy
from email.parser import BytesParser

import pytest

from ingest import mimesplit


def stdlib(raw: bytes):
    return BytesParser(policy=policy.compat32).parsebytes(raw)


def tree(msg):
    payload = msg._payload
    if isinstance(payload, list):
        payload = [tree(p) for p in payload]
    elif payload is not None:
        # The stdlib keeps str (8-bit bytes as surrogates), the splitter a memoryview.
        payload = payload.encode("ascii", "surrogateescape") if isinstance(payload, str) else bytes(payload)
    return {
        "unixfrom": msg._unixfrom, "headers": list(msg._headers), "payload": payload,
        "preamble": msg.preamble, "epilogue": msg.epilogue, "default_type": msg._default_type,
        "defects": [(type(d).__name__, str(d)) for d in msg.defects],
    }


def assert_same_as_stdlib(raw: bytes) -> None:
    fast = mimesplit.split(raw)
    assert fast is not None, "the splitter declined a message it should split"
    assert tree(fast) == tree(stdlib(raw))


def agrees_or_declines(raw: bytes) -> bool:
    """True when the splitter answered (and then it must equal the stdlib)."""
    fast = mimesplit.split(raw)
    if fast is None:
        return False
    assert tree(fast) == tree(stdlib(raw)), raw[:400]
    return True


B64 = base64.encodebytes(bytes(range(256)) * 40).replace(b"\n", b"\r\n")


def mixed(boundary=b"outer", inner=b"inner", nl=b"\r\n", preamble=b"", epilogue=b"", close_nl=True) -> bytes:
    lines = [
        b"From: Alice <alice@example.com>", b"To: soc@example.com",
        b"Subject: =?utf-8?q?Caf=C3=A9?= report", b"  continued subject",
        b"Message-ID: <1@example.com>", b"MIME-Version: 1.0",
        b'Content-Type: multipart/mixed; boundary="' + boundary + b'"', b"",
    ]
    body = nl.join(lines) + nl + preamble
    body += nl.join([
        b"--" + boundary,
        b'Content-Type: multipart/alternative; boundary="' + inner + b'"', b"",
        b"--" + inner, b"Content-Type: text/plain; charset=utf-8", b"",
        b"Hello -- not a boundary", b"--" + boundary + b"X is not one either", b"",
        b"--" + inner, b"Content-Type: text/html", b"", b"<p>Hi</p>",
        b"--" + inner + b"--", b"inner epilogue",
        b"--" + boundary,
        b'Content-Type: application/pdf; name="a.pdf"', b"Content-Transfer-Encoding: base64", b"",
    ]) + nl + B64.replace(b"\r\n", nl) + b"--" + boundary + b"--"
    if close_nl:
        body += nl + epilogue
    return body


def forwarded(nl=b"\r\n") -> bytes:
    return nl.join([
        b"From: reporter@example.com", b"Subject: Fwd: suspicious", b"MIME-Version: 1.0",
        b'Content-Type: multipart/mixed; boundary="b1"', b"",
        b"--b1", b"Content-Type: text/plain", b"", b"See attached.", b"",
        b"--b1", b"Content-Type: message/rfc822", b"",
        b"From: evil@phish.example", b"Subject: Verify your account",
        b'Content-Type: multipart/alternative; boundary="b2"', b"",
        b"--b2", b"Content-Type: text/plain", b"", b"click http://phish.example/login",
        b"--b2", b"Content-Type: text/html", b"", b'<a href="http://phish.example/login">here</a>',
        b"--b2--", b"",
        b"--b1--", b"",
    ])


WELL_FORMED = {
    "mixed_crlf": mixed(),
    "mixed_lf": mixed(nl=b"\n"),
    "preamble_and_epilogue": mixed(preamble=b"This is a MIME message.\r\n\r\n", epilogue=b"bye\r\n"),
    "close_boundary_at_eof": mixed(close_nl=False),
    "inner_boundary_extends_outer": mixed(boundary=b"b", inner=b"b-inner"),
    "forwarded_as_attachment": forwarded(),
    "forwarded_lf": forwarded(b"\n"),
    "single_part": b"From: a@example.com\r\nSubject: hi\r\n\r\nbody\r\n",
    "no_body": b"From: a@example.com\r\nSubject: hi\r\n",
    "no_headers": b"\r\njust a body\r\n",
    "unix_from_line": b"From a@example.com Mon Jan 1 00:00:00 2024\nFrom: a@example.com\n\nbody\n",
    "eight_bit_header": "From: Zoë <z@example.com>\r\nSubject: Grüße\r\n\r\nbody".encode(),
    "latin1_bytes_in_body": b"From: a@example.com\r\n\r\ncaf\xe9 \xff\r\n",
    "part_without_headers": (b'From: a@example.com\r\nContent-Type: multipart/mixed; boundary=zz\r\n\r\n'
                             b"--zz\r\n\r\nno headers here\r\n--zz--\r\n"),
    "boundary_with_trailing_space": (b'From: a@example.com\r\nContent-Type: multipart/mixed; boundary=zz\r\n\r\n'
                                     b"--zz  \r\nContent-Type: text/plain\r\n\r\none\r\n--zz--\t\r\n"),
    "empty_part_body": (b'From: a@example.com\r\nContent-Type: multipart/mixed; boundary=zz\r\n\r\n'
                        b"--zz\r\nContent-Type: text/plain\r\n\r\n--zz--\r\n"),
    "invalid_header_line": b"From: a@example.com\r\n: no name\r\n\r\nbody\r\n",
    "first_header_is_continuation": b" folded\r\nFrom: a@example.com\r\n\r\nbody\r\n",
}


@pytest.mark.parametrize("name", sorted(WELL_FORMED))
def test_well_formed_mail_splits_exactly_like_the_stdlib(name):
    assert_same_as_stdlib(WELL_FORMED[name])


def test_leaf_bodies_are_views_of_the_message_not_copies():
    raw = mixed()
    msg = mimesplit.split(raw)
    attachment = msg.get_payload()[1]
    assert isinstance(attachment._payload, memoryview)
    assert attachment._payload.obj is raw
    assert bytes(attachment._payload) == B64[:-2]  # its last line break belongs to the boundary


UNUSUAL = {
    "lone_cr_line_end": b"From: a@example.com\rSubject: x\r\n\r\nbody\r\n",
    "no_boundary_parameter": b"From: a@example.com\r\nContent-Type: multipart/mixed\r\n\r\nbody\r\n",
    "start_boundary_missing": (b"From: a@example.com\r\nContent-Type: multipart/mixed; boundary=zz\r\n\r\n"
                               b"text only\r\n"),
    "close_boundary_missing": (b"From: a@example.com\r\nContent-Type: multipart/mixed; boundary=zz\r\n\r\n"
                               b"--zz\r\n\r\npart\r\n"),
    "doubled_boundary_lines": (b"From: a@example.com\r\nContent-Type: multipart/mixed; boundary=zz\r\n\r\n"
                               b"--zz\r\n--zz\r\n\r\npart\r\n--zz--\r\n"),
    "multipart_with_base64_encoding": (b"From: a@example.com\r\nContent-Type: multipart/mixed; boundary=zz\r\n"
                                       b"Content-Transfer-Encoding: base64\r\n\r\n--zz\r\n\r\nx\r\n--zz--\r\n"),
    "digest": (b"From: a@example.com\r\nContent-Type: multipart/digest; boundary=zz\r\n\r\n"
               b"--zz\r\n\r\nFrom: b@example.com\r\n\r\nx\r\n--zz--\r\n"),
    "delivery_status": b"From: a@example.com\r\nContent-Type: message/delivery-status\r\n\r\nAction: failed\r\n",
    "headers_end_without_blank_line": b"From: a@example.com\r\nthis is body text\r\n",
    "base64_attached_message": (b"From: a@example.com\r\nContent-Type: multipart/mixed; boundary=zz\r\n\r\n"
                                b"--zz\r\nContent-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\n"
                                + base64.encodebytes(b"From: x@y\r\n\r\nhi\r\n") + b"--zz--\r\n"),
}


@pytest.mark.parametrize("name", sorted(UNUSUAL))
def test_unusual_mail_is_left_to_the_stdlib(name):
    assert mimesplit.split(UNUSUAL[name]) is None


def test_very_deep_nesting_is_left_to_the_stdlib():
    raw = b"From: a@example.com\r\n"
    for level in range(mimesplit.MAX_DEPTH + 5):
        raw += b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (level, level)
    raw += b"Content-Type: text/plain\r\n\r\nx\r\n"
    for level in reversed(range(mimesplit.MAX_DEPTH + 5)):
        raw += b"--b%d--\r\n" % level
    assert mimesplit.split(raw) is None


def _mutate(raw: bytes, rnd: random.Random) -> bytes:
    lines = raw.split(b"\n")
    for _ in range(rnd.randint(1, 4)):
        lines = lines or [b""]
        op = rnd.randrange(7)
        i = rnd.randrange(len(lines))
        if op == 0:
            del lines[i]
        elif op == 1:
            lines.insert(i, lines[rnd.randrange(len(lines))])  # e.g. a boundary line again
        elif op == 2:
            lines[i] = lines[i][:rnd.randint(0, len(lines[i]))]
        elif op == 3:
            lines.insert(i, rnd.choice([b"", b"\r", b"--", b"--outer", b"--inner--", b"--b1--", b"--b2",
                                        b"From x", b" cont", b"X-Junk: 1\r", b"\xff\xfe", b"\r\r"]))
        elif op == 4:
            j = rnd.randrange(len(lines[i]) + 1)
            lines[i] = lines[i][:j] + bytes([rnd.randrange(256)]) + lines[i][j:]
        elif op == 5:
            lines[i] = lines[i].rstrip(b"\r")
        else:
            lines = lines[:i + 1]
    return b"\n".join(lines)


def test_random_mutations_agree_with_the_stdlib_whenever_split():
    rnd = random.Random(20261130)
    seeds = list(WELL_FORMED.values()) + list(UNUSUAL.values())
    answered = 0
    for _ in range(3000):
        answered += agrees_or_declines(_mutate(rnd.choice(seeds), rnd))
    assert answered > 500  # the fast path is the usual one, not the exception
