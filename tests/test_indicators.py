"""Indicator extraction from parsed mail. All mail is generated here."""
from __future__ import annotations

import hashlib
import time

import pytest

from ingest.indicators import (
    Indicator, _attribute_urls, _LinkCollector, extract_indicators, normalize_domain, refang,
    strip_trailing_punctuation,
)
from ingest.parse import Address, Attachment, ParsedEmail, parse_bytes


def values(indicators: list[Indicator], kind: str) -> list[str]:
    return [i.value for i in indicators if i.kind == kind]


def text_mail(text: str = "", html: str = "", **fields) -> ParsedEmail:
    return ParsedEmail(text=text, html=html, **fields)


# ---------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------

def test_urls_in_text_lose_trailing_punctuation():
    found = extract_indicators(text_mail("Go to http://evil.example/login. Or (https://evil.example/b), ok?"))
    assert values(found, "url") == ["http://evil.example/login", "https://evil.example/b"]


def test_balanced_parentheses_inside_a_url_are_kept():
    assert strip_trailing_punctuation("https://en.wikipedia.org/wiki/Foo_(bar))") == "https://en.wikipedia.org/wiki/Foo_(bar)"


def test_defanged_urls_domains_and_addresses_are_refanged():
    found = extract_indicators(text_mail(
        "Bad: hxxps://login-micros0ft[.]example/auth and evil[.]example, mail admin[@]evil[.]example"))
    assert "https://login-micros0ft.example/auth" in values(found, "url")
    assert {"login-micros0ft.example", "evil.example"} <= set(values(found, "domain"))
    assert "admin@evil.example" in values(found, "email")


def test_ordinary_dotted_words_are_not_domains():
    found = extract_indicators(text_mail("See file.txt, e.g. version 2.0 and report.pdf"))
    assert values(found, "domain") == []


def test_www_links_without_scheme_are_urls():
    found = extract_indicators(text_mail("visit www.evil.example/path now"))
    assert values(found, "url") == ["http://www.evil.example/path"]


def test_www_links_are_found_in_any_case():
    found = extract_indicators(text_mail("visit WWW.Evil.example/a or wWw2.evil.example/b"))
    assert values(found, "url") == ["http://WWW.Evil.example/a", "http://wWw2.evil.example/b"]


def test_text_without_www_or_at_sign_still_finds_scheme_urls():
    found = extract_indicators(text_mail("Reset at https://reset.example/now (expires today)."))
    assert values(found, "url") == ["https://reset.example/now"]
    assert values(found, "email") == []


def test_defanged_scheme_without_brackets_is_refanged_in_any_case():
    found = extract_indicators(text_mail("open HXXP://evil.example/a or FxP://files.example/b"))
    assert values(found, "url") == ["http://evil.example/a", "ftp://files.example/b"]


def test_defanged_www_link_is_found():
    found = extract_indicators(text_mail("see www[.]evil[.]example/x"))
    assert "http://www.evil.example/x" in values(found, "url")


@pytest.mark.parametrize(("text", "expected"), [
    ("from 203.0.113.7 today", ["203.0.113.7"]),
    ("bad 999.1.1.1 and 01.2.3.4", []),
    ("version 1.2.3.4.5 is not an IP", []),
    ("v6 2001:db8::1 and fe80::1%eth0", ["2001:db8::1", "fe80::1"]),
    ("times 12:30:45, std::cout, dead::beef", []),
    ("full 2001:0db8:85a3:0000:0000:8a2e:0370:7334.", ["2001:db8:85a3::8a2e:370:7334"]),
    ("8.8.8.8", ["8.8.8.8"]),
    ("1234.5.6.7, x1.2.3.4, 1.2.3.4.5.6 and 1.2.3.4567", []),
    ("(192.0.2.1). 9.9.9.9.", ["192.0.2.1", "9.9.9.9"]),
    ("1:2:3:4:5:6:7:8", ["1:2:3:4:5:6:7:8"]),
    ("12345:1:2:3:4:5:6:7 g1:2:3:4:5:6:7:8 1:2:3:4:5:6:7:8:9", []),
])
def test_ip_addresses_are_validated(text, expected):
    assert values(extract_indicators(text_mail(text)), "ip") == expected


def test_url_host_that_is_an_ip_becomes_an_ip_indicator():
    found = extract_indicators(text_mail("http://198.51.100.9:8080/x and http://[2001:db8::5]/y"))
    assert values(found, "ip") == ["198.51.100.9", "2001:db8::5"]
    assert values(found, "domain") == []


def test_url_hosts_that_only_look_numeric_are_not_ips():
    found = extract_indicators(text_mail("http://123.example/x http://1.2.3/y http://[::1]/z"))
    assert values(found, "domain") == ["123.example"]
    assert values(found, "ip") == ["::1"]


def test_internationalized_domains_become_punycode():
    found = extract_indicators(text_mail("http://bücher.example/ and user@Bücher.Example"))
    assert values(found, "domain") == ["xn--bcher-kva.example"]
    assert values(found, "email") == ["user@xn--bcher-kva.example"]


@pytest.mark.parametrize("host", ["a" * 64 + ".example", "..example", "x" * 300, "localhost", "ex ample.com", "ex\udcff.com"])
def test_invalid_hosts_are_dropped_without_raising(host):
    assert normalize_domain(host) is None


def test_refang_leaves_normal_text_alone():
    assert refang("nothing to see here") == "nothing to see here"


# ---------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------

def test_html_attributes_yield_urls_including_forms_and_meta_refresh():
    html = """
    <meta http-equiv="refresh" content="0; url=http://refresh.example/r">
    <a href="http://evil.example/a?x=1&amp;y=2">Click</a>
    <img src="https://pixel.example/p.gif" srcset="https://img1.example/a.png 1x, https://img2.example/b.png 2x">
    <form action="https://harvest.example/post"><input formaction="https://alt.example/go"></form>
    <a href="mailto:Phisher@Evil.Example?subject=hi">mail</a>
    <p>Also in text: https://text.example/t &amp; more</p>
    """
    found = extract_indicators(text_mail(html=html))
    urls = values(found, "url")
    for url in ["http://refresh.example/r", "http://evil.example/a?x=1&y=2", "https://pixel.example/p.gif",
                "https://img1.example/a.png", "https://img2.example/b.png", "https://harvest.example/post",
                "https://alt.example/go", "https://text.example/t"]:
        assert url in urls
    assert "phisher@evil.example" in values(found, "email")
    assert all(i.source == "html" for i in found)


def test_html_without_attribute_values_still_yields_its_text_indicators():
    html = "<p>See <a href>http://text.example/x</a></p><table><tr><td>8.8.4.4</td></tr></table>"
    found = extract_indicators(text_mail(html=html))
    assert [(i.kind, i.value) for i in found] == [
        ("url", "http://text.example/x"), ("domain", "text.example"), ("ip", "8.8.4.4")]


@pytest.mark.parametrize("tags", [
    '<a href="http://a.example/?x=1&amp;y=&quot;2&quot;&lt;&gt;&nbsp;"><img src="" alt="x">',
    '<img srcset=" a.png 1x, http://s.example/b.png 2x ,"><source srcset="">',
    '<meta http-equiv="refresh" content="0; URL=\'http://r.example/\'"><meta http-equiv="x" content="url=http://no.example/">',
    '<a href="http&#58;//e&#46;example/&#x2F;&bogus;&#0;\n"></a><a href="a" href="b"></a>',
    '<form action="\thttp://f.example/\n"><input formaction="mailto:A@B.example"></form>',
    '<style><a href="http://inside-style.example/"></style><a href="http://after.example/">',
    '<A HREF="http://upper.example/"><br/><img src=bare.png>',
])
def test_link_attributes_are_read_exactly_as_html_parser_reads_them(tags):
    parser = _LinkCollector()
    parser.feed(tags)
    parser.close()
    assert _attribute_urls(tags) == parser.urls


def test_a_link_repeated_in_html_keeps_its_first_source():
    html = '<a href="http://dup.example/x">http://dup.example/x</a>'
    found = extract_indicators(text_mail("go to http://dup.example/x", html=html))
    assert [(i.kind, i.value, i.source) for i in found] == [
        ("url", "http://dup.example/x", "body"), ("domain", "dup.example", "body")]


def test_entity_obfuscated_href_is_decoded():
    found = extract_indicators(text_mail(html='<a href="http&#58;//evil&#46;example/x">x</a>'))
    assert values(found, "url") == ["http://evil.example/x"]


def test_hostile_html_is_handled_quickly():
    hostile = ["<div>" * 200_000, "<a" * 200_000 + ' href="http://late.example/">', "</" * 200_000,
               "<b><div></b>" * 60_000 + '<a href="http://deep.example/">x</a>']
    for html in hostile:
        started = time.process_time()
        extract_indicators(text_mail(html=html))
        assert time.process_time() - started < 2.0


def test_links_after_deep_nesting_are_still_found_in_the_text_fallback():
    found = extract_indicators(text_mail(html="<div>" * 5000 + '<a href="http://hidden.example/x">x</a>'))
    assert "http://hidden.example/x" in values(found, "url")


# ---------------------------------------------------------------------------
# Headers and attachments
# ---------------------------------------------------------------------------

def test_sender_headers_give_emails_and_domains_lowercased():
    parsed = ParsedEmail(
        from_=Address("PayPal", "Service@PayPa1.Example"),
        reply_to=[Address("", "drop@Collector.Example")],
        headers=[("Return-Path", "<bounce@bulk.example>"), ("To", "victim@corp.example")],
    )
    found = extract_indicators(parsed)
    assert [(i.kind, i.value, i.source) for i in found] == [
        ("email", "service@paypa1.example", "header:From"),
        ("domain", "paypa1.example", "header:From"),
        ("email", "drop@collector.example", "header:Reply-To"),
        ("domain", "collector.example", "header:Reply-To"),
        ("email", "bounce@bulk.example", "header:Return-Path"),
        ("domain", "bulk.example", "header:Return-Path"),
    ]


def test_only_public_relay_ips_are_taken_from_received_headers():
    parsed = ParsedEmail(headers=[
        ("Received", "from mx.example (mx.example [8.8.4.4]) by 10.0.0.5"),
        ("Received", "from internal (192.168.1.10) by [127.0.0.1]"),
    ])
    assert [(i.value, i.source) for i in extract_indicators(parsed) if i.kind == "ip"] == [("8.8.4.4", "header:Received")]


def test_attachment_hashes_are_indicators():
    data = b"MZ fake"
    parsed = ParsedEmail(attachments=[Attachment("invoice.exe", "application/octet-stream", len(data),
                                                 hashlib.sha256(data).hexdigest(), hashlib.md5(data).hexdigest())])
    found = extract_indicators(parsed)
    assert [(i.kind, i.source) for i in found] == [("sha256", "attachment:invoice.exe"), ("md5", "attachment:invoice.exe")]
    assert found[0].value == hashlib.sha256(data).hexdigest()


def test_indicators_are_deduplicated_in_first_seen_order():
    found = extract_indicators(text_mail("http://b.example/ http://a.example/ http://b.example/",
                                         html='<a href="http://a.example/">a</a>'))
    assert values(found, "url") == ["http://b.example/", "http://a.example/"]
    assert len(found) == len({(i.kind, i.value) for i in found})


# ---------------------------------------------------------------------------
# Forwarded phish: the evidence comes first and is marked
# ---------------------------------------------------------------------------

def forwarded_phish_report() -> bytes:
    payload = b"MZ\x90\x00 evil payload"
    inner = (
        b"From: IT Helpdesk <helpdesk@corp-support.example>\r\n"
        b"Reply-To: harvest@collector.example\r\n"
        b"Subject: Password expires\r\n"
        b"Content-Type: multipart/mixed; boundary=in\r\n\r\n"
        b"--in\r\nContent-Type: text/html\r\n\r\n"
        b'<p>Keep your password: <a href="https://corp-support.example/reset">reset</a></p>\r\n'
        b"--in\r\nContent-Type: application/octet-stream\r\n"
        b'Content-Disposition: attachment; filename="update.exe"\r\n\r\n' + payload + b"\r\n--in--\r\n"
    )
    return (
        b"From: Alice <alice@corp.example>\r\nTo: phishing@corp.example\r\nSubject: FW: Password expires\r\n"
        b"Content-Type: multipart/mixed; boundary=out\r\n\r\n"
        b"--out\r\nContent-Type: text/plain\r\n\r\nSuspicious, see attached.\r\n"
        b"--out\r\nContent-Type: message/rfc822\r\n\r\n" + inner + b"\r\n--out--\r\n"
    ), payload


def test_forwarded_phish_exposes_inner_sender_urls_and_attachment_hashes():
    raw, payload = forwarded_phish_report()
    found = extract_indicators(parse_bytes(raw))
    by_value = {(i.kind, i.value): i.source for i in found}
    assert by_value[("email", "helpdesk@corp-support.example")] == "evidence:header:From"
    assert by_value[("email", "harvest@collector.example")] == "evidence:header:Reply-To"
    assert by_value[("url", "https://corp-support.example/reset")] == "evidence:html"
    assert by_value[("sha256", hashlib.sha256(payload).hexdigest())] == "evidence:attachment:update.exe"
    assert by_value[("md5", hashlib.md5(payload).hexdigest())] == "evidence:attachment:update.exe"
    # The reporter is recorded too, after the evidence and without the prefix.
    assert by_value[("email", "alice@corp.example")] == "header:From"
    assert found[0].source.startswith("evidence:")


def test_line_breaks_inside_an_href_are_removed_like_browsers_do():
    found = extract_indicators(text_mail(html='<a href="http://evil.example/very\n/long\t/path">x</a>'))
    assert values(found, "url") == ["http://evil.example/very/long/path"]


@pytest.mark.parametrize("html", [
    "<iframe>" + ']]>"<!--' * 40_000,
    "<noscript>" + "<!--<a" * 40_000,
    "<textarea>" + "</x<!--" * 40_000,
    "<svg><style>" + "<!--" * 40_000,
])
def test_raw_text_content_cannot_slow_down_link_extraction(html):
    started = time.process_time()
    extract_indicators(text_mail(html=html))
    assert time.process_time() - started < 2.0
