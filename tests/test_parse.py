"""Parsing hostile email: every input parses with defects or raises ParseError.

All mail here is generated in the tests.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import random
import time

import pytest

from ingest import parse as parse_module
from ingest.parse import Limits, ParsedEmail, ParseError, parse_bytes, parse_file, sanitize_filename

CRLF = b"\r\n"


def mail(*headers: str | bytes, body: bytes | str = b"hello\r\n") -> bytes:
    lines = [h.encode() if isinstance(h, str) else h for h in headers]
    body = body.encode() if isinstance(body, str) else body
    return CRLF.join(lines) + CRLF + CRLF + body


def multipart(boundary: str, *parts: bytes, subtype: str = "mixed", headers: tuple[str, ...] = ()) -> bytes:
    body = b"".join(b"--" + boundary.encode() + CRLF + part + CRLF for part in parts)
    body += b"--" + boundary.encode() + b"--" + CRLF
    return mail("From: a@example.com", *headers,
                f'Content-Type: multipart/{subtype}; boundary="{boundary}"', body=body)


def part(*headers: str, body: bytes | str = b"") -> bytes:
    body = body.encode() if isinstance(body, str) else body
    return CRLF.join(h.encode() for h in headers) + CRLF + CRLF + body


# ---------------------------------------------------------------------------
# Ordinary fields
# ---------------------------------------------------------------------------

def test_plain_message_fields_are_decoded():
    raw = mail(
        "From: =?utf-8?q?J=C3=BCrgen_M=C3=BCller?= <juergen@example.de>",
        "To: Alice <alice@example.com>, bob@example.com",
        "Cc: Team: carol@example.com, dave@example.com;",
        "Subject: Quarterly report",
        "Date: Tue, 04 Mar 2025 10:15:00 +0100",
        "Message-ID: <abc.123@mail.example.com>",
        body="Body text\r\n",
    )
    parsed = parse_bytes(raw)
    assert parsed.from_.name == "Jürgen Müller"
    assert parsed.from_.address == "juergen@example.de"
    assert [a.address for a in parsed.to] == ["alice@example.com", "bob@example.com"]
    assert [a.address for a in parsed.cc] == ["carol@example.com", "dave@example.com"]
    assert parsed.subject == "Quarterly report"
    assert parsed.date == "2025-03-04T10:15:00+01:00"
    assert parsed.message_id == "<abc.123@mail.example.com>"
    assert parsed.text.strip() == "Body text"
    assert parsed.defects == []
    assert parsed.evidence is parsed


def test_reply_headers_are_parsed():
    raw = mail(
        "From: a@example.com",
        "Subject: Re: invoice",
        "In-Reply-To: <root@example.com>",
        "References: <root@example.com>\r\n <second@example.com> <third@example.com>",
    )
    parsed = parse_bytes(raw)
    assert parsed.in_reply_to == "<root@example.com>"
    assert parsed.references == ["<root@example.com>", "<second@example.com>", "<third@example.com>"]


def test_headers_list_keeps_order_and_decodes():
    raw = mail("Received: from a", "Received: from b", "From: x@example.com", "Subject: =?iso-8859-1?q?caf=E9?=")
    parsed = parse_bytes(raw)
    assert parsed.header("received") == ["from a", "from b"]
    assert ("Subject", "café") in parsed.headers


def test_multibyte_character_split_across_encoded_words_survives():
    # "日本" in UTF-8 is e6 97 a5 e6 9c ac; the words split it mid-character.
    raw = mail("From: a@example.com", "Subject: =?utf-8?b?5pel5pw=?= =?utf-8?b?rA==?=")
    assert parse_bytes(raw).subject == "日本"


def test_encoded_words_are_decoded_once_not_recursively():
    inner = "=?utf-8?q?evil?="
    outer = "=?utf-8?q?" + inner.replace("=", "=3D").replace("?", "=3F") + "?="
    parsed = parse_bytes(mail("From: a@example.com", f"Subject: {outer}"))
    assert parsed.subject == inner


def test_decoded_control_characters_are_removed_from_headers():
    raw = mail("From: a@example.com", "Subject: =?utf-8?q?line1=0D=0ABcc:_victim@example.com=00?=")
    subject = parse_bytes(raw).subject
    assert "\n" not in subject and "\r" not in subject and "\x00" not in subject
    assert "line1" in subject


def test_raw_8bit_headers_decode_as_utf8_or_cp1252():
    raw = mail(b"From: a@example.com", "Subject: café".encode("utf-8"), b"X-Legacy: caf\xe9")
    parsed = parse_bytes(raw)
    assert parsed.subject == "café"
    assert parsed.header("X-Legacy") == ["café"]


def test_unknown_charset_falls_back_and_records_a_defect():
    raw = mail("From: a@example.com", "Content-Type: text/plain; charset=x-klingon",
               body="Gr\xfc\xdfe".encode("latin-1"))
    parsed = parse_bytes(raw)
    assert parsed.text == "Grüße"
    assert any("unknown charset" in d for d in parsed.defects)


def test_latin1_label_decodes_windows_1252_punctuation():
    raw = mail("From: a@example.com", "Content-Type: text/plain; charset=iso-8859-1", body=b"\x93quoted\x94")
    assert parse_bytes(raw).text == "\u201cquoted\u201d"


def test_html_and_text_alternatives_are_both_kept_raw():
    raw = multipart(
        "b1",
        part("Content-Type: text/plain; charset=utf-8", body="plain version"),
        part("Content-Type: text/html; charset=utf-8", body="<p onclick=x>html <b>version</b></p>"),
        subtype="alternative",
    )
    parsed = parse_bytes(raw)
    assert parsed.text == "plain version"
    assert parsed.html == "<p onclick=x>html <b>version</b></p>"  # sanitizing is the caller's job


def test_nul_bytes_in_body_are_replaced_with_a_defect():
    parsed = parse_bytes(mail("From: a@example.com", body=b"a\x00b"))
    assert parsed.text == "a\ufffdb"
    assert any("NUL" in d for d in parsed.defects)


def test_obsolete_space_before_colon_headers_are_read():
    raw = b"Subject : spaced out\r\nFrom    : a@example.com\r\n\r\nbody"
    parsed = parse_bytes(raw)
    assert parsed.subject == "spaced out"
    assert parsed.from_.address == "a@example.com"


def test_byte_order_mark_before_headers_is_ignored():
    parsed = parse_bytes(b"\xef\xbb\xbf" + mail("From: a@example.com", "Subject: bom"))
    assert parsed.subject == "bom"


def test_parse_file_reads_from_disk(tmp_path):
    path = tmp_path / "m.eml"
    path.write_bytes(mail("From: a@example.com", "Subject: from disk"))
    assert parse_file(path).subject == "from disk"


def test_parsed_email_has_no_reference_cycle():
    parsed = parse_bytes(forwarded_phish())
    assert parsed == parse_bytes(forwarded_phish())
    assert "evidence" not in dataclasses.asdict(parsed)
    assert "ParsedEmail(" in repr(parsed)


# ---------------------------------------------------------------------------
# Attachments
# ---------------------------------------------------------------------------

PDF_BYTES = b"%PDF-1.4 fake invoice"


def with_attachment(filename_header: str, data: bytes = PDF_BYTES, ctype: str = "application/pdf") -> bytes:
    return multipart(
        "att",
        part("Content-Type: text/plain", body="see attached"),
        part(f"Content-Type: {ctype}", f"Content-Disposition: attachment; {filename_header}",
             "Content-Transfer-Encoding: base64", body=base64.encodebytes(data)),
    )


def test_attachment_has_hashes_size_and_data():
    parsed = parse_bytes(with_attachment('filename="invoice.pdf"'))
    [attachment] = parsed.attachments
    assert attachment.filename == "invoice.pdf"
    assert attachment.content_type == "application/pdf"
    assert attachment.size == len(PDF_BYTES)
    assert attachment.sha256 == hashlib.sha256(PDF_BYTES).hexdigest()
    assert attachment.md5 == hashlib.md5(PDF_BYTES).hexdigest()
    assert attachment.data == PDF_BYTES and attachment.path is None


def test_attachments_are_written_content_addressed(tmp_path):
    raw = multipart(
        "att",
        part("Content-Type: application/pdf", 'Content-Disposition: attachment; filename="a.pdf"', body=PDF_BYTES),
        part("Content-Type: application/pdf", 'Content-Disposition: attachment; filename="b.pdf"', body=PDF_BYTES),
    )
    parsed = parse_bytes(raw, attachments_dir=tmp_path / "blobs")
    first, second = parsed.attachments
    assert first.path == second.path == tmp_path / "blobs" / hashlib.sha256(PDF_BYTES).hexdigest()
    assert first.path.read_bytes() == PDF_BYTES
    assert first.data is None
    assert [p.name for p in (tmp_path / "blobs").iterdir()] == [first.sha256]


@pytest.mark.parametrize(("header", "expected"), [
    ('filename="../../etc/passwd"', "passwd"),
    ('filename="C:\\\\Windows\\\\evil.exe"', "evil.exe"),
    ("filename*=utf-8''%E2%80%AEfdp.exe", "fdp.exe"),  # right-to-left override removed
    ('filename="=?utf-8?q?r=C3=A9sum=C3=A9.doc?="', "résumé.doc"),
    ('filename="bell\x07tab\tname.txt"', "belltabname.txt"),
    ('filename=".."', "attachment"),
    ('filename="a<b>c|d?.txt"', "a_b_c_d_.txt"),
])
def test_attachment_filenames_are_sanitized(header, expected):
    [attachment] = parse_bytes(with_attachment(header)).attachments
    assert attachment.filename == expected


def test_long_filename_is_capped_keeping_the_extension():
    name = sanitize_filename("x" * 1000 + ".docm")
    assert len(name) == 200 and name.endswith(".docm")


def test_bidi_override_in_filename_is_recorded_as_defect():
    parsed = parse_bytes(with_attachment("filename*=utf-8''invoice%E2%80%AEfdp.exe"))
    assert any("bidirectional" in d for d in parsed.defects)


def test_tnef_winmail_dat_is_kept_as_an_attachment():
    tnef = b"\x78\x9f\x3e\x22" + bytes(range(64))
    raw = with_attachment('filename="winmail.dat"', data=tnef, ctype="application/ms-tnef")
    [attachment] = parse_bytes(raw).attachments
    assert attachment.filename == "winmail.dat"
    assert attachment.content_type == "application/ms-tnef"
    assert attachment.size == len(tnef)


def test_bad_base64_decodes_best_effort_with_defect():
    raw = multipart("b", part("Content-Type: application/octet-stream", 'Content-Disposition: attachment; filename="x.bin"',
                              "Content-Transfer-Encoding: base64", body=b"aGVs!!bG8g*d29y\r\nbGQ=garbage="))
    parsed = parse_bytes(raw)
    assert parsed.attachments[0].data.startswith(b"hello world")
    assert any("base64" in d for d in parsed.defects)


# ---------------------------------------------------------------------------
# Forwarded as attachment: the evidence
# ---------------------------------------------------------------------------

INNER_PHISH = mail(
    "From: PayPal Security <security@paypa1-alerts.example>",
    "To: victim@corp.example",
    "Subject: Your account is locked",
    "Message-ID: <phish-1@paypa1-alerts.example>",
    body="Verify now: http://paypa1-alerts.example/login?id=42\r\n",
)


def forwarded_phish(encoding: str = "") -> bytes:
    inner = base64.encodebytes(INNER_PHISH) if encoding == "base64" else INNER_PHISH
    headers = ["Content-Type: message/rfc822", 'Content-Disposition: attachment; filename="locked.eml"']
    if encoding:
        headers.append(f"Content-Transfer-Encoding: {encoding}")
    return multipart(
        "report",
        part("Content-Type: text/plain", body="Looks like phishing, please check."),
        part(*headers, body=inner),
        headers=("To: phishing@corp.example", "Subject: FW: Your account is locked"),
    )


@pytest.mark.parametrize("encoding", ["", "base64"])
def test_forwarded_as_attachment_exposes_the_inner_message_as_evidence(encoding):
    parsed = parse_bytes(forwarded_phish(encoding))
    assert parsed.subject == "FW: Your account is locked"
    evidence = parsed.evidence
    assert evidence is parsed.nested[0]
    assert evidence.from_.address == "security@paypa1-alerts.example"
    assert evidence.subject == "Your account is locked"
    assert "http://paypa1-alerts.example/login?id=42" in evidence.text


def test_eml_file_attached_as_octet_stream_is_parsed_too():
    raw = multipart("r", part("Content-Type: application/octet-stream",
                              'Content-Disposition: attachment; filename="suspicious.eml"',
                              "Content-Transfer-Encoding: base64", body=base64.encodebytes(INNER_PHISH)))
    parsed = parse_bytes(raw)
    assert parsed.evidence.from_.address == "security@paypa1-alerts.example"
    assert parsed.attachments[0].filename == "suspicious.eml"


def test_attachments_of_the_inner_message_belong_to_the_evidence():
    inner = with_attachment('filename="payload.pdf"')
    raw = multipart("r", part("Content-Type: message/rfc822", body=inner))
    parsed = parse_bytes(raw)
    assert parsed.attachments == []
    assert parsed.evidence.attachments[0].filename == "payload.pdf"


# ---------------------------------------------------------------------------
# Not an email
# ---------------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "reason"), [
    (b"", "empty"),
    (b"   \r\n\r\n  ", "empty"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(512), "not_mime"),
    (b"\x78\x9f\x3e\x22\x01\x02", "not_mime"),
    (b'{\n  "value": [1, 2, 3]\n}\n', "no_headers"),
    (b"<?xml version='1.0'?><soap:Envelope/>", "no_headers"),
    (b"Note: this is a README, not an email\n", "no_headers"),
    (bytes(random.Random(1).getrandbits(8) for _ in range(4096)), "no_headers"),
])
def test_content_that_is_not_email_raises_parse_error_with_reason(raw, reason):
    with pytest.raises(ParseError) as info:
        parse_bytes(raw)
    assert info.value.reason == reason


def test_input_over_the_size_limit_is_refused():
    with pytest.raises(ParseError) as info:
        parse_bytes(mail("From: a@example.com", body=b"x" * 2000), limits=Limits(max_bytes=1000))
    assert info.value.reason == "too_large"


def test_unexpected_bug_becomes_internal_error_parse_error(monkeypatch):
    def explode(*args, **kwargs):
        raise KeyError("boom")
    monkeypatch.setattr(parse_module, "_build_message", explode)
    with pytest.raises(ParseError) as info:
        parse_bytes(mail("From: a@example.com"))
    assert info.value.reason == "internal_error"
    assert isinstance(info.value.__cause__, KeyError)


# ---------------------------------------------------------------------------
# Limits
# ---------------------------------------------------------------------------

def test_thousands_of_sibling_parts_stop_at_the_part_limit():
    siblings = [part("Content-Type: application/octet-stream", body=f"{i}") for i in range(3100)]
    parsed = parse_bytes(multipart("s", *siblings))
    assert len(parsed.attachments) == Limits().max_parts - 1  # the root counts as a part
    assert any("more than 1000 MIME parts" in d for d in parsed.defects)


def test_attached_messages_nest_only_to_max_depth():
    raw = mail("From: leaf@example.com", body="leaf")
    for level in range(15):
        raw = mail(f"From: level{level}@example.com", "Content-Type: message/rfc822", body=raw)
    parsed = parse_bytes(raw, limits=Limits(max_depth=3))
    depth, node = 0, parsed
    while node.nested:
        node, depth = node.nested[0], depth + 1
    assert depth == 3
    assert any("deeper than 3" in d for d in node.defects + parsed.defects + _all_defects(parsed))


def _all_defects(parsed: ParsedEmail) -> list[str]:
    found = list(parsed.defects)
    for nested in parsed.nested:
        found += _all_defects(nested)
    return found


def test_long_text_body_is_cut_with_a_defect():
    parsed = parse_bytes(mail("From: a@example.com", body=b"x" * 5000), limits=Limits(max_text_chars=1000))
    assert len(parsed.text) == 1000
    assert any("text body longer" in d for d in parsed.defects)


# ---------------------------------------------------------------------------
# Malformed mail: parse with defects or ParseError, never anything else, fast
# ---------------------------------------------------------------------------

def deep_multipart(depth: int) -> bytes:
    body = b"".join(b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (i, i + 1) for i in range(depth))
    body += b"--b%d\r\nContent-Type: text/plain\r\n\r\ndeep\r\n" % depth
    body += b"".join(b"--b%d--\r\n" % i for i in range(depth, -1, -1))
    return mail("From: a@example.com", "Content-Type: multipart/mixed; boundary=b0", body=body)


def deep_messages(depth: int) -> bytes:
    raw = mail("From: leaf@example.com")
    for _ in range(depth):
        raw = mail("From: a@example.com", "Content-Type: message/rfc822", body=raw)
    return raw


def folded_encoded_subject(size: int) -> bytes:
    word = "=?utf-8?q?Die_hei=C3=9Fe_Zypernsonne_qu=C3=A4lte_Max?="
    return mail("From: a@example.com", "Subject: " + "\r\n ".join([word] * (size // len(word))))


def huge_to_header() -> bytes:
    word = "=?utf-8?Q?date=3E2017-08-20T10:08:28.617=3C/pr?="
    return mail("From: a@example.com", "To: \"test\" <test@example.com>,\r\n\t" + "\r\n\t".join([word] * 3000))


MALFORMED = {
    "boundary never appears": multipart("declared", part("Content-Type: text/plain", body="x")).replace(
        b"--declared", b"--other"),
    "boundary parameter missing": mail("From: a@example.com", "Content-Type: multipart/mixed",
                                       body=b"--x\r\nContent-Type: text/plain\r\n\r\nhi\r\n--x--\r\n"),
    "nested identical boundaries": multipart("same", part('Content-Type: multipart/mixed; boundary="same"',
                                                          body=b"--same\r\n\r\ninner\r\n--same--")),
    "unterminated multipart": mail("From: a@example.com", "Content-Type: multipart/mixed; boundary=z",
                                   body=b"--z\r\nContent-Type: text/plain\r\n\r\nnever closed"),
    "unknown charset": mail("From: a@example.com", "Content-Type: text/plain; charset=\"x-\xff-bogus\"".encode("latin-1"),
                            body=b"\xe9t\xe9"),
    "200 KB folded encoded-word subject": folded_encoded_subject(200_000),
    "135 KB To header with colons": huge_to_header(),
    "deeply nested comments in From": mail("From: " + "(" * 5000 + "a@example.com"),
    "thousands of groups in To": mail("From: a@example.com", "To: " + "g:" * 20000 + "x@example.com"),
    "thousands of sibling parts": multipart("s", *[part("Content-Type: text/plain", body="x")] * 5000),
    "2000-deep multipart nesting": deep_multipart(2000),
    "100-deep multipart nesting": deep_multipart(100),
    "2000-deep message/rfc822 nesting": deep_messages(2000),
    "header line that is only a space": b"From: a@example.com\r\nSubject: s\r\n \r\nbody after space line\r\n",
    "no blank line between header and body": b"From: a@example.com\r\nSubject: s\r\nbody starts here\r\n",
    "bad base64 body": mail("From: a@example.com", "Content-Transfer-Encoding: base64", body=b"@@@=\r\n====\r\nQQ"),
    "bad quoted-printable": mail("From: a@example.com", "Content-Transfer-Encoding: quoted-printable", body=b"=ZZ=\r\n=4"),
    "NUL bytes everywhere": b"From: a\x00@example.com\r\nSubject: \x00\x00\r\n\r\n\x00body\x00",
    "8-bit raw headers": b"From: \xff\xfe <a@example.com>\r\nSubject: \x81\x8d\x8f\x90\x9d\r\n\r\nbody",
    "encoded-words inside encoded-words": mail("From: a@example.com",
                                              "Subject: =?UTF-8?Q?=3D=3Futf-8=3FQ=3F=3D3D=3D3F=3F=3D?="),
    "malformed encoded-words": mail("From: a@example.com", "Subject: =?utf-8?b?###?= =?nope?x?y?= =?utf-8?q?=ZZ?="),
    "100k semicolons in Content-Type": mail("From: a@example.com", "Content-Type: text/plain" + ";" * 100_000),
    "2 MB line without newline": b"From: a@example.com\r\n\r\n" + b"x" * 2_000_000,
    "bare CR line endings": b"From: a@example.com\rSubject: cr\r\rbody\r",
    "truncated mid-header": b"From: a@example.com\r\nContent-Type: multipart/mi",
    "garbage Date": mail("From: a@example.com", "Date: Sat, 99 Foo 99999 99:99:99 +9999"),
    "empty file": b"",
    "random bytes": bytes(random.Random(7).getrandbits(8) for _ in range(100_000)),
    "message/rfc822 with empty body": multipart("m", part("Content-Type: message/rfc822")),
    "base64 message/rfc822 that is garbage": multipart("m", part("Content-Type: message/rfc822",
                                                                 "Content-Transfer-Encoding: base64", body=b"!!!!")),
    "many boundary lines": mail("From: a@example.com", "Content-Type: multipart/mixed; boundary=q",
                                body=b"--q\r\n" * 100_000),
}


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_mail_parses_with_defects_or_raises_parse_error_quickly(raw):
    started = time.process_time()
    try:
        parsed = parse_bytes(raw)
    except ParseError as exc:
        assert exc.reason != "internal_error", exc
    else:
        assert isinstance(parsed, ParsedEmail)
        assert all(isinstance(d, str) for d in parsed.defects)
        assert "\x00" not in parsed.subject + "".join(v for _, v in parsed.headers)
    assert time.process_time() - started < 2.0


def test_deep_nesting_beyond_the_stdlib_recursion_limit_is_a_too_deep_parse_error():
    with pytest.raises(ParseError) as info:
        parse_bytes(deep_messages(2000))
    assert info.value.reason == "too_deep"


def test_huge_subject_is_capped_with_a_defect():
    parsed = parse_bytes(folded_encoded_subject(200_000))
    assert parsed.subject.startswith("Die heiße Zypernsonne")
    assert len(parsed.subject) <= Limits().max_header_chars
    assert any("Subject" in d for d in parsed.defects)


def test_hostile_to_header_still_yields_the_first_address():
    parsed = parse_bytes(huge_to_header())
    assert parsed.to[0].address == "test@example.com"
    assert len(parsed.to) <= Limits().max_addresses


def test_missing_boundary_keeps_the_body_as_text():
    parsed = parse_bytes(MALFORMED["boundary parameter missing"])
    assert "hi" in parsed.text
    assert any("boundary" in d for d in parsed.defects)


def test_empty_attached_message_does_not_become_blank_evidence():
    parsed = parse_bytes(MALFORMED["message/rfc822 with empty body"])
    assert parsed.nested == []
    assert parsed.evidence is parsed


def test_obsolete_header_fix_does_not_touch_the_body():
    raw = b"Subject : s\r\nFrom: a@example.com\r\nbody line\r\nNote : keep my space\r\n"
    parsed = parse_bytes(raw)
    assert parsed.subject == "s"
    assert "Note : keep my space" in parsed.text
