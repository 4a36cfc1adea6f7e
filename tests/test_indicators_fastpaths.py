"""The shortcuts in ingest/indicators.py against the standard behaviour they
stand in for: each must give exactly what the slow path gives, on tricky
and on generated input. All input is generated here."""
from __future__ import annotations

import ipaddress
import random
import re
import sys
from urllib.parse import urlsplit

from ingest import indicators
from ingest.indicators import (
    _CANONICAL_IPV4, _PLAIN_AUTHORITY, _URL_FROM_SEP, Indicator, _urls_in, extract_indicators,
)
from ingest.parse import Address, Attachment, ParsedEmail

TRICKY_URLS = [
    "http://evil.example/login", "HTTPS://EVIL.Example:8443/x?y#z", "http://evil.example", "http://evil.example?q",
    "http://evil.example#f", "http://evil.example:/x", "http://evil.example:80", "ftp://1.2.3.4/", "http://:80/x",
    "http:///x", "http://", "http://a_b-c.d.example/", "http://under_score.example./x", "http://[::1]/x",
    "http://[2001:db8::1]:8080/", "http://[fe80::1%25eTh0]/", "http://[fe80::1%eTh0]/", "http://[v1.x]/",
    "http://[::1/x", "http://::1]/x", "http://user@evil.example/", "http://user:pass@Evil.Example:1/",
    "http://a@b@c.example/", "http://evil.example\\@good.example/", "http://evil.example;x/", "http://ev\til.example/",
    "http://evil.example\t/", "ht\ttp://evil.example/", "http://evil.example\n/x", " http://evil.example/",
    "\x01http://evil.example/", "http://evil.example/\x00", "http://münchen.example/", "http://MÜNCHEN.example/",
    "http://xn--mnchen-3ya.example/", "http://evil\u2100.example/", "http://evil.example:８０/", "http://ＥＶＩＬ.example/",
    "http://evil。example/", "http://e%41vil.example/", "http://evil.example%2F@good.example/", "http://evil.example:8o/",
    "http://evil.example:-1/", "http://evil.example:99999/", "http://evil.example: 80/", "http://evil.example:80:90/",
    "1http://evil.example/", "h-t.t+p://evil.example/", "ſhttp://evil.example/", "httpſ://evil.example/",
    "mailto://evil.example/", "javascript://evil.example/%0aalert(1)", "//evil.example/x", "evil.example/x",
    "http:evil.example", "http:/evil.example", "http:\\\\evil.example", "http://evil.example\\x", "http://evil.example ",
    "http://" + "a" * 300 + ".example/", "http://1.2.3.4:80/", "http://01.2.3.4/", "http://256.1.1.1/",
    "http://1.2.3/", "http://123.example/", "http://0x7f.1/", "http://2130706433/", "http://127.0.0.1/",
    "http://0.0.0.0/", "http://İstanbul.example/", "http://K.example/", "http://a.b.c.d.e.f.g.h.i.j.k.l.example/",
    "http://-dash.example/", "http://evil.example.../", "http://.evil.example/", "http://evil..example/",
]


def _url_alphabet_mutations(seed: int, n: int) -> list[str]:
    rnd = random.Random(seed)
    alphabet = list("azAZ09.-_:/@[]%?#\\ \t\n+~") + ["ü", "\u2100", "\uff0e", "ſ", "K", "%25", "８"]
    out = []
    for _ in range(n):
        url = list(rnd.choice(TRICKY_URLS))
        for _ in range(rnd.randint(1, 4)):
            position = rnd.randint(0, len(url))
            if rnd.random() < 0.5:
                url.insert(position, rnd.choice(alphabet))
            elif url:
                del url[min(position, len(url) - 1)]
        out.append("".join(url))
    return out


def _hostname_or_error(url: str) -> str | None | type:
    try:
        return urlsplit(url).hostname
    except ValueError:
        return ValueError


def test_plain_authority_host_is_exactly_urlsplit_hostname():
    urls = TRICKY_URLS + _url_alphabet_mutations(1, 5000)
    matched = 0
    for url in urls:
        plain = _PLAIN_AUTHORITY.match(url)
        if plain is not None:
            matched += 1
            # _add_url treats "" and None alike (no host, no indicator).
            assert plain.group(1).lower() == (_hostname_or_error(url) or ""), url
    assert matched > 500  # the comparison is not vacuous


def test_plain_authority_covers_the_usual_urls():
    for url in ["https://secure-login-verify.com/login?id=123", "http://203.0.113.7/x.php", "HTTP://Evil.Example",
                "ftp://files.example:21/a", "http://evil.example#top"]:
        assert _PLAIN_AUTHORITY.match(url) is not None, url


def _ipv4_strings() -> list[str]:
    octets = [str(i) for i in range(1000)] + [f"0{i}" for i in range(100)]
    octets += ["00", "000", "0000", "", "1234", "١", "٢٥٥", "²", "1 ", "+1", "-0", "0x1"]
    rnd = random.Random(2)
    out = [f"1.2.3.{o}" for o in octets] + [f"{o}.2.3.4" for o in octets] + [f"10.{o}.0.1" for o in octets]
    out += [".".join(rnd.choice(octets) for _ in range(rnd.choice([3, 4, 4, 4, 5]))) for _ in range(3000)]
    out += ["1.2.3.4/24", "1.2.3.4\n", "1.2.3.4.", "0.0.0.0", "127.0.0.1", "127.255.255.255", "128.0.0.1"]
    return out


def test_canonical_ipv4_is_exactly_what_ipaddress_accepts_and_prints_back():
    for candidate in _ipv4_strings():
        try:
            expected = str(ipaddress.IPv4Address(candidate))
        except ValueError:
            expected = None
        matched = candidate if _CANONICAL_IPV4.fullmatch(candidate) else None
        assert matched == expected, candidate


def test_text_ip_filter_is_unspecified_and_loopback():
    for candidate in _ipv4_strings():
        if _CANONICAL_IPV4.fullmatch(candidate):
            address = ipaddress.IPv4Address(candidate)
            fast = candidate != "0.0.0.0" and not candidate.startswith("127.")
            assert fast == (not (address.is_unspecified or address.is_loopback)), candidate


_OLD_SCHEME_SEP = re.compile(r"://[^\s<>\"'`{}|\\^]+")
_OLD_SCHEME_BEFORE = re.compile(r"(?:https?|ftp)\Z", re.I)


def _old_scheme_urls(text: str) -> list[str]:
    """The scan _URL_FROM_SEP replaced: "://" runs, then the scheme looked up in Python."""
    urls = []
    for match in _OLD_SCHEME_SEP.finditer(text):
        scheme = _OLD_SCHEME_BEFORE.search(text, max(0, match.start() - 5), match.start())
        before = text[scheme.start() - 1] if scheme and scheme.start() > 0 else ""
        if scheme and not (before.isalnum() or before == "_"):
            urls.append(text[scheme.start():match.end()])
    return urls


def _scheme_texts(seed: int, n: int) -> list[str]:
    rnd = random.Random(seed)
    pieces = ["http", "https", "HTTPS", "ftp", "FTP", "fTp", "httpſ", "ſ", "x", "_", "é", "1", " ", "\n", ".", "/",
              "://", "://", "://", ":/", "a.example", "<", ">", '"', "[", "]", "h", "t", "p", "s", "f", "K",
              "https://", "http://", "ftp://", "HTTP://", "ttps://", "tp://"]
    return ["".join(rnd.choice(pieces) for _ in range(rnd.randint(1, 14))) for _ in range(n)]


def test_url_scan_finds_what_the_two_step_scan_found():
    texts = [
        "see https://a.example/x and http://b.example", "xhttps://a", "ahttp://b", "_ftp://c", "éhttp://d",
        "http://a://http://b", "zzz://x http://y", "httpſ://q", "HtTpS://Q", "ftp://", "://x", "ps://x", "1https://x",
        ".http://a", "(https://a)", "https://a\nhttps://b", "https://https://x",
    ] + _scheme_texts(3, 5000)
    found = 0
    for text in texts:
        expected = _old_scheme_urls(text)
        assert _urls_in(text, may_have_www=False) == expected, text
        found += len(expected)
    assert found > 800  # the comparison is not vacuous


def test_regex_classes_are_the_str_predicates_the_comments_rely_on():
    # \s is str.isspace() (what str.strip() strips), \w is isalnum() or "_",
    # and every line boundary of str.splitlines() is white space.
    every = "".join(chr(c) for c in range(sys.maxunicode + 1) if not 0xD800 <= c <= 0xDFFF)
    assert re.findall(r"\s", every) == [c for c in every if c.isspace()]
    assert re.findall(r"\w", every) == [c for c in every if c.isalnum() or c == "_"]
    assert all(c.isspace() for c in every if len(f"a{c}b".splitlines()) > 1)


# Words of phishing mail: links, hosts, addresses, IPs, their defanged
# forms and punctuation around them; plain words in between.
_TOKENS = [
    "Please", "verify", "your", "account", "at", "now.", "(see", "below)", "--", "&", "<b>",
    "https://login.example.com/verify?id=1&x=2", "http://198.51.100.7:8080/a", "ftp://files.example.org/x.zip",
    "www.example.net/path", "http://[2001:db8::1]/x", "https://user@host.example/", "http://b%C3%BCro.example/",
    "https://xn--bcher-kva.example/", "http://münchen.example/", "(https://en.example.org/wiki/A_(b))",
    "help@corp.example", "alerts@198.51.100.9", "10.0.0.1", "203.0.113.5,", "127.0.0.1", "0.0.0.0",
    "2001:db8::42", "fe80::1%eth0", "v1.2.3.4.5", "192.168.1.256",
    "hxxp://evil[.]example/login", "hxxps://bad(.)example", "evil[.]example[.]com", "user[@]evil.example",
    "fxp://x[.]example", "bad(dot)example(dot)com",
]


def _alternative_mail(rnd: random.Random, defanged: bool) -> ParsedEmail:
    tokens = [t for t in _TOKENS if defanged or not any(h in t.lower() for h in ("hxxp", "fxp", "[", "("))]
    lines = [" ".join(rnd.choice(tokens) for _ in range(rnd.randint(0, 5))) for _ in range(rnd.randint(1, 6))]
    parts = []
    for line in lines:
        escaped = line.replace("&", "&amp;").replace("<", "&lt;")
        shape = rnd.random()
        if shape < 0.5:
            parts.append(f"<p>{escaped}</p>")
        elif shape < 0.65:
            parts.append(f"<p>\n  {escaped}\n</p>")
        elif shape < 0.8:
            words = escaped.split(" ")
            cut = rnd.randint(0, len(words))
            parts.append(f"<p>{' '.join(words[:cut])}<b>{' '.join(words[cut:])}</b></p>")
        else:
            parts.append(f"<div>{rnd.choice(tokens)} {escaped}</div>")
    text = "\r\n".join(lines) if rnd.random() < 0.3 else "\n".join(lines)
    return ParsedEmail(text=text, html="<html><body>" + "".join(parts) + "</body></html>",
                       from_=Address("", "sender@corp.example"),
                       attachments=[Attachment("a.pdf", "application/pdf", 1, "ab" * 32, "cd" * 16)])


def _without_skipping(parsed: ParsedEmail, monkeypatch) -> list[Indicator]:
    original = indicators._collect_html
    with monkeypatch.context() as patch:
        patch.setattr(indicators, "_collect_html",
                      lambda html, found, source, body_lines=None: original(html, found, source, None))
        return extract_indicators(parsed)


def test_skipping_html_repeats_of_text_lines_changes_nothing(monkeypatch):
    rnd = random.Random(4)
    html_text = {"skipping": 0, "not": 0}
    collect_text = indicators._collect_text

    def measuring(text, found, source):
        if source.endswith("html"):
            html_text[mode] += len(text)
        return collect_text(text, found, source)

    monkeypatch.setattr(indicators, "_collect_text", measuring)
    for _ in range(800):
        parsed = _alternative_mail(rnd, defanged=rnd.random() < 0.3)
        if rnd.random() < 0.2:
            parsed = ParsedEmail(text="cover note http://cover.example/", html="<p>cover</p>", nested=[parsed])
        mode = "skipping"
        fast = extract_indicators(parsed)
        mode = "not"
        assert fast == _without_skipping(parsed, monkeypatch)
    assert html_text["skipping"] < html_text["not"] * 0.75  # the skipping was exercised


def test_html_repeating_the_text_keeps_the_text_sources():
    text = "Visit https://evil.example/login now\nor 203.0.113.9"
    html = "<p>Visit https://evil.example/login now</p><p>or 203.0.113.9</p><p>new http://only-html.example/</p>"
    found = extract_indicators(ParsedEmail(text=text, html=html))
    assert [(i.kind, i.value, i.source) for i in found] == [
        ("url", "https://evil.example/login", "body"), ("domain", "evil.example", "body"),
        ("ip", "203.0.113.9", "body"),
        ("url", "http://only-html.example/", "html"), ("domain", "only-html.example", "html"),
    ]


def test_url_scan_keeps_a_consumed_run_whole():
    # A "://" run without a scheme is consumed: the http:// inside it is not a URL.
    assert _URL_FROM_SEP.search("xyz://a://http://b").lastindex is None
    assert _urls_in("xyz://a://http://b c http://d.example", may_have_www=False) == ["http://d.example"]
