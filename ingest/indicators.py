"""Indicators of compromise from a parsed email: URLs, domains, IPs, email
addresses and attachment hashes, deduplicated in a stable order.

When the message carries the real evidence as an attached message (a
forwarded-as-attachment phishing report), that message's indicators come
first and their source is prefixed with ``evidence:``; the reporter's own
message follows with unprefixed sources.

Every regular expression here is written so its run time stays linear on
hostile text: no nested unbounded quantifiers, bounded label lengths, and
look-behinds so a match can only start at the beginning of a token.
"""
from __future__ import annotations

import functools
import html as htmllib
import ipaddress
import re
from dataclasses import dataclass
from html.parser import HTMLParser
from urllib.parse import urlsplit

import nh3

from ingest.parse import ParsedEmail
from ingest.sanitize import MAX_HTML_CHARS, html_is_tractable

KINDS = ("url", "domain", "ip", "email", "sha256", "md5")


@dataclass(frozen=True)
class Indicator:
    kind: str  # one of KINDS
    value: str
    source: str  # "body", "html", "header:From", "attachment:<name>", "evidence:…"


def extract_indicators(parsed: ParsedEmail) -> list[Indicator]:
    found = _Collector()
    evidence = parsed.evidence
    if evidence is not parsed:
        _collect_message(evidence, found, "evidence:")
    _collect_message(parsed, found, "")
    return found.items


class _Collector:
    """Keeps the first (kind, value) seen, in insertion order."""

    def __init__(self) -> None:
        self.items: list[Indicator] = []
        self._seen: set[tuple[str, str]] = set()
        self._done: set[tuple[str, str]] = set()

    def add(self, kind: str, value: str, source: str) -> None:
        if value:
            key = (kind, value)
            if key not in self._seen:
                self._seen.add(key)
                self.items.append(Indicator(kind, value, source))

    def first_time(self, step: str, raw: str) -> bool:
        """False when ``raw`` already went through ``step`` for this message.

        The steps are pure functions of ``raw``, so a repeat (the same link in
        the text and in the HTML) could only re-add pairs already seen, under
        a later source that ``add`` ignores: it can be skipped outright.
        """
        key = (step, raw)
        if key in self._done:
            return False
        self._done.add(key)
        return True


def _collect_message(msg: ParsedEmail, found: _Collector, prefix: str) -> None:
    _collect_headers(msg, found, prefix)
    _collect_text(msg.subject, found, prefix + "header:Subject")
    text = msg.text
    hinted = _collect_text(text, found, prefix + "body")
    # The HTML part of a multipart/alternative mail usually repeats the text
    # part paragraph for paragraph; see _collect_html for why those repeats
    # can be skipped when the text part has no defanging.
    body_lines = set(text.splitlines()) if text and msg.html and not hinted else None
    _collect_html(msg.html, found, prefix + "html", body_lines)
    for attachment in msg.attachments:
        source = f"{prefix}attachment:{attachment.filename}"
        found.add("sha256", attachment.sha256, source)
        found.add("md5", attachment.md5, source)


# ---------------------------------------------------------------------------
# Headers
# ---------------------------------------------------------------------------

_SENDER_HEADERS = ("Sender", "Return-Path")
_RELAY_HEADERS = ("Received", "X-Originating-IP", "X-Sender-IP")


def _collect_headers(msg: ParsedEmail, found: _Collector, prefix: str) -> None:
    # To/Cc are the recipients (usually our own users), not indicators.
    _add_email(msg.from_.address, found, prefix + "header:From")
    for address in msg.reply_to:
        _add_email(address.address, found, prefix + "header:Reply-To")
    for name in _SENDER_HEADERS:
        for value in msg.header(name):
            for match in _EMAIL.finditer(value):
                _add_email(match.group(0), found, f"{prefix}header:{name}")
    for name in _RELAY_HEADERS:
        for value in msg.header(name):
            # Relay IPs are only interesting when public: internal hops are noise.
            for address in _ips_in(value):
                if address.is_global:
                    found.add("ip", str(address), f"{prefix}header:{name}")


# ---------------------------------------------------------------------------
# Plain text
# ---------------------------------------------------------------------------

_REFANG = [
    (re.compile(r"\bhxxp", re.I), "http"),
    (re.compile(r"\bh\[xx\]p", re.I), "http"),
    (re.compile(r"\bfxp", re.I), "ftp"),
    (re.compile(r"\[:\]//|\[://\]"), "://"),
    (re.compile(r"\[\.\]|\(\.\)|\{\.\}|\[dot\]|\(dot\)", re.I), "."),
    (re.compile(r"\[@\]|\(@\)|\[at\]", re.I), "@"),
]
# Each scanner starts on a literal or a rare character class so the regex
# engine can skip ahead; token boundaries (what a look-behind would check)
# are tested in Python on the few candidates, or in look-behinds placed
# after the literal. A look-behind at the start of a pattern makes the
# engine try every position, 5-10x slower on 1 MB bodies.
#
# A URL is a "://" run with a scheme right before it that does not continue
# a word (\w is exactly str.isalnum() or "_"); the scheme is an optional
# group of look-behinds, so a run without one is still consumed (a "://"
# inside it never starts a URL) and the test costs no Python call. At most
# one of the three can match, as their last letters differ; its group
# (1, 2 or 3) is the scheme.
_URL_FROM_SEP = re.compile(
    r"://(?:(?<=(?<!\w)(https)://)|(?<=(?<!\w)(http)://)|(?<=(?<!\w)(ftp)://))?[^\s<>\"'`{}|\\^]+", re.I)
_WWW = re.compile(r"[Ww][Ww][Ww]\d{0,3}\.[^\s<>\"'`{}|\\^]+")
_AT = re.compile(r"@")
# \w rather than ASCII classes: internationalised addresses (RFC 6531) exist.
_EMAIL_LOCAL = re.compile(r"[\w.%+-]{1,64}\Z")
_EMAIL_DOMAIN = re.compile(r"(?:[\w-]{1,63}\.){1,10}[^\W\d_]{2,63}(?![\w-])")
_EMAIL = re.compile(r"[\w.%+-]{1,64}@(?:[\w-]{1,63}\.){1,10}[^\W\d_]{2,63}")  # short values only
# The IP scanners are anchored on the first separator rather than on the
# first digit: digits and hex letters are everywhere in text, so a pattern
# starting with a digit class is tried (and fails) at most positions. The
# digits before the separator are taken afterwards; an address must start
# at the beginning of its digit run anyway (see _ipv4s_in). The look-ahead
# drops in C most of what the checks in Python would reject, so version
# strings and runs like "1.1.1.1.1…" cost no Python per candidate; it never
# shortens a match, since a shorter last octet is followed by a digit.
_IPV4_TAIL = re.compile(r"\.\d{1,3}\.\d{1,3}\.\d{1,3}(?!\d|\.\d)")  # "a.b.c.d" from the first "."
_DIGITS_BEFORE = re.compile(r"\d{1,4}\Z")
_IPV6_FULL_TAIL = re.compile(r":[0-9A-Fa-f]{1,4}(?::[0-9A-Fa-f]{1,4}){6}")  # 8 groups, from the first ":"
_HEX_BEFORE = re.compile(r"[0-9A-Fa-f]{1,5}\Z")
_IPV6_COMPRESSED = re.compile(r"::[0-9A-Fa-f:]{0,37}")
_COLON_HEX = re.compile(r":[0-9A-Fa-f:]")
_HEX_COLON_BEFORE = re.compile(r"[0-9A-Fa-f:]{1,37}\Z")
_DEFANGED_DOMAIN = re.compile(
    r"(?<![\w.\-\[\](){}])[A-Za-z0-9-]{1,63}(?:(?:\[\.\]|\(\.\)|\{\.\}|\[dot\]|\(dot\)|\.)[A-Za-z0-9-]{1,63}){1,10}",
    re.I,
)
_DEFANG_MARK = re.compile(r"\[\.\]|\(\.\)|\{\.\}|\[dot\]|\(dot\)", re.I)


# The defanging hints as they appear in lower-cased text: "hxxp", "fxp" and
# these, which all contain a bracket, so text without "[", "(" and "{" (most
# mail) needs only the first two looked for. Lower-casing maps only "A-Z"
# onto the letters in the hints, so "hint in text.lower()" is exact.
_BRACKETED_HINTS = ("h[xx]p", "[:]", "[://]", "[.]", "(.)", "{.}", "[dot]", "(dot)", "[@]", "(@)", "[at]")


def _has_defang_hint(text: str, lowered: str) -> bool:
    if "hxxp" in lowered or "fxp" in lowered:
        return True
    # Single-character tests run at memchr speed, far faster than the
    # substring tests or a regex with a character class.
    has_bracket = "[" in text or "(" in text or "{" in text
    return has_bracket and any(hint in lowered for hint in _BRACKETED_HINTS)


def refang(text: str) -> str:
    """Undo the usual defanging: hxxp://, example[.]com, user[@]example.com."""
    if not _has_defang_hint(text, text.lower()):
        return text  # the common case, without six passes over a large body
    return _refang_all(text)


def _refang_all(text: str) -> str:
    for pattern, replacement in _REFANG:
        text = pattern.sub(replacement, text)
    return text


def _collect_text(text: str, found: _Collector, source: str) -> bool:
    """Collects from ``text``; True when it has a defanging hint."""
    if not text:
        return False
    # One lower-cased copy answers the cheap "could there be any?" questions
    # that let whole passes be skipped.
    lowered = text.lower()
    hinted = _has_defang_hint(text, lowered)
    if hinted:
        # Every defanged-domain marker is also a defanging hint.
        _collect_defanged_domains(text, found, source)
        plain = _refang_all(text)
    else:
        plain = text
    may_have_www = "www" in (lowered if plain is text else plain.lower())
    for url in _urls_in(plain, may_have_www):
        # A part of a text without any hint has none either: refang() would
        # return it unchanged (and the scanners never include whitespace).
        _add_url(url, found, source, refanged=not hinted)
    if "@" in plain:
        for address in _emails_in(plain):
            _add_email(address, found, source)
    for candidate in _ipv4_candidates(plain):
        # Not 0.0.0.0 or 127.x.x.x: is_unspecified and is_loopback.
        if candidate != "0.0.0.0" and not candidate.startswith("127.") and _CANONICAL_IPV4.fullmatch(candidate):
            found.add("ip", candidate, source)
    for address in _ipv6s_in(plain):
        if not (address.is_unspecified or address.is_loopback):
            found.add("ip", str(address), source)
    return hinted


def _urls_in(text: str, may_have_www: bool = True) -> list[str]:
    urls = []
    for match in _URL_FROM_SEP.finditer(text):
        scheme = match.lastindex
        if scheme:
            urls.append(text[match.start(scheme):match.end()])
    # _WWW starts with a character class, which costs a step at every
    # position; the caller knows from a plain substring test whether "www"
    # occurs at all.
    if may_have_www:
        for match in _WWW.finditer(text):
            if not _is_word_char(text, match.start() - 1, "./@-"):
                urls.append("http://" + match.group(0))
    return urls


def _emails_in(text: str) -> list[str]:
    found = []
    for at in _AT.finditer(text):
        i = at.start()
        local = _EMAIL_LOCAL.search(text, max(0, i - 64), i)
        domain = _EMAIL_DOMAIN.match(text, i + 1)
        if local and domain and not _is_word_char(text, local.start() - 1, ".%+-"):
            found.append(text[local.start():domain.end()])
    return found


def _is_word_char(text: str, index: int, extra: str = "") -> bool:
    if not 0 <= index < len(text):
        return False
    char = text[index]
    return char.isalnum() or char == "_" or char in extra


def _collect_defanged_domains(text: str, found: _Collector, source: str) -> None:
    """Bare domains only when defanged: an ordinary "file.txt" or "e.g." is
    not one. Scans only windows around the markers (a domain is at most
    ~700 characters with its markers), not the whole body."""
    reach = 720
    start = end = -1
    windows = []
    for mark in _DEFANG_MARK.finditer(text):
        if mark.start() - reach > end:
            if end >= 0:
                windows.append((start, end))
            start = max(0, mark.start() - reach)
        end = mark.end() + reach
    if end >= 0:
        windows.append((start, end))
    for start, end in windows:
        for match in _DEFANGED_DOMAIN.finditer(text, start, end):
            if _DEFANG_MARK.search(match.group(0)):
                _add_domain(refang(match.group(0)), found, source)


def _ips_in(text: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    return _ipv4s_in(text) + _ipv6s_in(text)


def _ipv4s_in(text: str) -> list[ipaddress.IPv4Address]:
    found = []
    for candidate in _ipv4_candidates(text):
        address = _ipv4_address(candidate)
        if address is not None:
            found.append(address)
    return found


def _ipv4_candidates(text: str) -> list[str]:
    """The dotted quads that stand alone, not yet checked as addresses."""
    found = []
    digits_before = _DIGITS_BEFORE.search
    for match in _IPV4_TAIL.finditer(text):
        # The first octet is the whole digit run before the first ".": when
        # the run is longer than 3 the address would have to start inside
        # it, after a digit, and that is rejected below anyway.
        tail = match.start()
        digits = digits_before(text, tail - 4 if tail > 4 else 0, tail)
        if digits is None:
            continue
        start = digits.start()
        if tail - start > 3:
            continue
        end = match.end()
        if start:
            before = text[start - 1]
            if before.isalnum() or before in "_.":
                continue  # part of a longer dotted number such as a version string
        following = text[end:end + 2]
        if following and (following[0].isdigit() or (following[0] == "." and following[1:].isdigit())):
            continue
        found.append(text[start:end])
    return found


# A message repeats its addresses (text, HTML, link hosts) and parsing one
# costs more than finding it. The keys are at most 15 characters.
@functools.lru_cache(maxsize=1024)
def _ipv4_address(candidate: str) -> ipaddress.IPv4Address | None:
    try:
        return ipaddress.IPv4Address(candidate)
    except ValueError:  # octet > 255 or a leading zero
        return None


# Exactly the strings IPv4Address() accepts (four decimal octets up to 255,
# ASCII digits, no leading zero), for which str() of the address gives the
# string back: a match is the indicator value without building the object.
_IPV4_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9][0-9]|[0-9])"
_CANONICAL_IPV4 = re.compile(rf"{_IPV4_OCTET}(?:\.{_IPV4_OCTET}){{3}}")


def _ipv6s_in(text: str) -> list[ipaddress.IPv6Address]:
    # Both shapes need a ":" followed by a hex digit or a ":"; in most mail
    # every ":" is in "://" or before a space, and one scan says so.
    if _COLON_HEX.search(text) is None:
        return []
    spans = []
    if "::" in text:
        for match in _IPV6_COMPRESSED.finditer(text):
            before = _HEX_COLON_BEFORE.search(text, max(0, match.start() - 37), match.start())
            spans.append((before.start() if before else match.start(), match.end()))
    if text.count(":") >= 7:
        for match in _IPV6_FULL_TAIL.finditer(text):
            # As for IPv4: the first group is the whole hex run before the
            # first ":" (a longer run would put the start after a hex digit).
            hex_run = _HEX_BEFORE.search(text, max(0, match.start() - 5), match.start())
            if hex_run is not None and hex_run.end() - hex_run.start() <= 4:
                spans.append((hex_run.start(), match.end()))
    found = []
    for start, end in spans:
        if _is_word_char(text, start - 1, ":.") or _is_word_char(text, end, ":"):
            continue
        candidate = text[start:end]
        # "std::cout" or "dead::beef" are not addresses: want digits in 2+ groups.
        if sum(any(c.isdigit() for c in group) for group in candidate.split(":")) < 2:
            continue
        try:
            found.append(ipaddress.IPv6Address(candidate))
        except ValueError:
            continue
    return found


# ---------------------------------------------------------------------------
# Single values
# ---------------------------------------------------------------------------

_MAX_URL = 4096
_TRAILING = ".,;:!?'\"*"
_PAIRS = {")": "(", "]": "[", "}": "{", ">": "<"}


def strip_trailing_punctuation(url: str) -> str:
    """Drop sentence punctuation after a URL; keep a ")" that closes a "("
    inside it, as in Wikipedia links."""
    while url:
        last = url[-1]
        if last in _TRAILING:
            url = url[:-1]
        elif last in _PAIRS and url.count(_PAIRS[last]) < url.count(last):
            url = url[:-1]
        else:
            break
    return url


def _add_url(url: str, found: _Collector, source: str, refanged: bool = False) -> None:
    """``refanged``: the caller knows refang(url.strip()) is ``url``."""
    if not found.first_time("url", url):
        return
    url = strip_trailing_punctuation(url if refanged else refang(url.strip()))
    if not url or len(url) > _MAX_URL:
        return
    plain = _PLAIN_AUTHORITY.match(url)
    if plain is not None:
        host = plain.group(1).lower()
        if not host:
            return
        found.add("url", url, source)
        if _CANONICAL_IPV4.fullmatch(host):
            found.add("ip", host, source)  # what _add_host would add
        else:
            _add_host_cached(host, found, source)
        return
    try:
        host = urlsplit(url).hostname
    except ValueError:  # e.g. an unbalanced "[" in the host
        return
    if not host:
        return
    found.add("url", url, source)
    _add_host_cached(host, found, source)


def _add_host_cached(host: str, found: _Collector, source: str) -> None:
    if len(host) > 253:  # not a domain, and not worth a cache entry
        _add_host(host, found, source)
        return
    indicator = _host_indicator(host)
    if indicator is not None:
        found.add(indicator[0], indicator[1], source)


# Nearly every URL has a plain authority: an ASCII host name or IPv4
# address and maybe a numeric port, then "/", "?", "#" or the end. For
# those, urlsplit(url).hostname is the host lower-cased (no "@", "[", "%"
# or non-ASCII for it to treat specially; tab and newline, which it
# deletes, are not allowed either), and this match costs a sixth of it.
# Anything else goes to urlsplit. tests/test_indicators_fastpaths.py pins it.
_PLAIN_AUTHORITY = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://([A-Za-z0-9._-]*)(?::[0-9]*)?(?=[/?#]|\Z)")


# The same hosts recur (a campaign's domain, the addresses also in the
# text); keys are host names (the caller passes longer ones uncached).
@functools.lru_cache(maxsize=2048)
def _host_indicator(host: str) -> tuple[str, str] | None:
    """The ("ip" or "domain", value) pair _add_host adds for ``host``."""
    collector = _Collector()
    _add_host(host, collector, "")
    return (collector.items[0].kind, collector.items[0].value) if collector.items else None


def _add_host(host: str, found: _Collector, source: str) -> None:
    address = host.strip("[]")
    # Only ASCII digits and dots can make an IPv4 address, and an IPv6 one
    # needs colons: skip the two failing parses (and their exceptions) for
    # the usual host name.
    if ":" in address or address.replace(".", "").isdigit():
        # ip_address() tries IPv4 first too; the cache is shared with the
        # text scanner, which usually finds the same address again.
        ipv4 = _ipv4_address(address) if len(address) <= 15 else None
        if ipv4 is not None:
            found.add("ip", str(ipv4), source)
            return
        try:
            found.add("ip", str(ipaddress.ip_address(address)), source)
            return
        except ValueError:
            pass
    _add_domain(host, found, source)


def _add_email(address: str, found: _Collector, source: str) -> None:
    if not found.first_time("email", address):
        return
    address = refang(address.strip().strip("<>")).lower()
    local, at, host = address.rpartition("@")
    if not (local and at and host):
        return
    domain = normalize_domain(host)
    if domain is None:
        return
    found.add("email", f"{local}@{domain}", source)
    found.add("domain", domain, source)


def _add_domain(host: str, found: _Collector, source: str) -> None:
    domain = normalize_domain(host)
    if domain is not None:
        found.add("domain", domain, source)


_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")


def normalize_domain(host: str) -> str | None:
    """Lower-case ASCII (punycode) form of a host name, or None if it is not
    a plausible domain. Internationalised names become xn-- labels; names the
    IDNA codec rejects are dropped rather than raising."""
    host = host.strip().rstrip(".").lower()
    if not host or len(host) > 253:
        return None
    return _normalize_short_host(host)


# The same few domains recur across messages (the organisation's own, the
# big senders) and the IDNA codec is slow; keys are at most 253 characters.
@functools.lru_cache(maxsize=4096)
def _normalize_short_host(host: str) -> str | None:
    try:
        host = host.encode("idna").decode("ascii").lower()
    except (UnicodeError, ValueError):
        return None
    labels = host.split(".")
    if len(labels) < 2 or not all(_LABEL.fullmatch(label) for label in labels):
        return None
    tld = labels[-1]
    if not (tld.isalpha() or tld.startswith("xn--")):
        return None
    return host


# ---------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------

_URL_ATTRIBUTES = {
    "href", "src", "action", "formaction", "background", "poster", "data", "cite",
    "longdesc", "lowsrc", "dynsrc", "srcset", "xlink:href",
}
# Everything that can carry a link or a resource, including what the display
# sanitizer removes (forms are exactly the interesting ones). No raw-text
# element (iframe, textarea, style, noscript, xmp…): html5ever writes their
# content unescaped, which would break the "< only in tags" property that
# _split_canonical_pieces relies on. An iframe's src is lost; mail clients never
# load iframes, so phishing does not rely on them.
_INDICATOR_TAGS = {
    "a", "abbr", "area", "audio", "b", "base", "big", "blockquote", "body", "br", "button",
    "center", "div", "em", "embed", "font", "form", "frame", "h1", "h2", "h3", "h4", "h5",
    "h6", "i", "img", "input", "li", "link", "map", "meta", "object", "ol", "p",
    "pre", "section", "small", "source", "span", "strong", "table", "tbody", "td", "th",
    "tr", "track", "u", "ul", "video",
}
_INDICATOR_SCHEMES = {"http", "https", "hxxp", "hxxps", "ftp", "mailto"}
_REFRESH_URL = re.compile(r"url\s*=\s*['\"]?([^'\"\s>]+)", re.I)


def _collect_html(html: str, found: _Collector, source: str, body_lines: set[str] | None = None) -> None:
    if not html:
        return
    html = html[:MAX_HTML_CHARS]
    if not html_is_tractable(html):
        # Too hostile for any HTML parser in bounded time: scan the markup as
        # text, which still finds absolute URLs inside attribute values.
        _collect_text(_unescape_bounded(html), found, source)
        return
    # html.parser is quadratic on some malformed markup (runs of "<a<a<a"),
    # so it never sees the input: nh3's html5ever (a browser-grade parser)
    # first rewrites it into canonical markup, and html.parser reads only
    # the tags of that.
    canonical = nh3.clean(
        html,
        tags=_INDICATOR_TAGS,
        attributes={"*": _URL_ATTRIBUTES | {"http-equiv", "content"}},
        url_schemes=_INDICATOR_SCHEMES,
        link_rel=None,
        strip_comments=True,
    )
    tags, pieces = _split_canonical_pieces(canonical)
    # Every attribute html.parser reports with a value has an "=" (one
    # without a value gives "", which yields nothing): plain markup such as
    # <p>, <br> or <table> alone needs no parsing.
    if "=" in tags:
        for url in _attribute_urls(tags):
            _add_attribute_url(url, found, source)
    if body_lines:
        # A text piece (between two tags) that is also a line of the text
        # part, collected before, can only yield pairs already seen, so it
        # is left out. Every scanner (and refang) matches within a run of
        # non-space characters, and past its ends it only tests that the
        # next character is not part of a token, which white space never
        # is: what a piece yields does not depend on the text around it,
        # here (pieces are joined by spaces) or among the lines (strip()
        # and splitlines() cut only at white space). The line has no
        # defanging hint (body_lines is only given then), so neither does
        # the piece, and refanging the rest leaves it alone.
        # tests/test_indicators_fastpaths.py compares with and without.
        pieces = [piece for piece in pieces if piece.strip() not in body_lines]
    _collect_text(" ".join(pieces), found, source)


# In nh3 output "<" and ">" occur only as tag delimiters: text and attribute
# values carry them as &lt; / &gt;. So this split is exact there (and only
# there), and text needs only the few entities html5ever's serializer emits.
_CANONICAL_TAG = re.compile(r"(<[^<>]*>)")
_SERIALIZER_ENTITIES = (("&lt;", "<"), ("&gt;", ">"), ("&quot;", '"'), ("&nbsp;", "\xa0"), ("&amp;", "&"))


def _split_canonical_pieces(canonical: str) -> tuple[str, list[str]]:
    """The tags, and the text between them decoded, piece by piece (no
    entity contains a space, so decoding the pieces joined by spaces gives
    the same text)."""
    pieces = _CANONICAL_TAG.split(canonical)
    tags = "".join(pieces[1::2])
    texts = pieces[0::2]
    if "&" in canonical:  # five no-op passes over each piece otherwise
        texts = [_decode_serializer_entities(piece) if "&" in piece else piece for piece in texts]
    return tags, texts


def _decode_serializer_entities(text: str) -> str:
    for entity, char in _SERIALIZER_ENTITIES:
        text = text.replace(entity, char)
    return text


def _unescape_bounded(html: str) -> str:
    # html.unescape costs a Python call per entity; past this many, decode
    # only the entities that matter for finding URLs.
    if html.count("&") < 20_000:
        return htmllib.unescape(html)
    for entity, char in (("&colon;", ":"), ("&#58;", ":"), ("&sol;", "/"), ("&#47;", "/"), ("&period;", "."),
                         ("&#46;", "."), ("&quot;", '"'), ("&amp;", "&")):
        html = html.replace(entity, char)
    return html


_URL_IGNORED_CHARS = re.compile(r"[\t\r\n]")


def _add_attribute_url(value: str, found: _Collector, source: str) -> None:
    # Browsers drop tabs and newlines inside URLs (WHATWG URL parsing), and
    # mailers wrap long hrefs, so the value to match on is without them.
    value = _URL_IGNORED_CHARS.sub("", value).strip()
    lowered = value.lower()
    if lowered.startswith("mailto:"):
        for match in _EMAIL.finditer(value[7:].split("?", 1)[0]):
            _add_email(match.group(0), found, source)
    elif lowered.startswith("www."):
        _add_url("http://" + value, found, source)
    else:
        _add_url(value, found, source)


# html5ever's serializer writes every tag in one shape: "</name>", or
# "<name>" followed by ' name="value"' for each attribute, all lower-case,
# values with "&", '"', "<" and ">" escaped. For that shape html.parser's
# reading is plain (attribute values unquoted, then unescaped when not
# empty), and a regex gets it several times faster. Anything else goes to
# html.parser, and so does script/style, which switch it to raw text.
_SERIALIZED_TAGS = re.compile(r'(?:<[a-z][a-z0-9]*(?: [a-z][a-z:-]*="[^"<>]*")*>|</[a-z][a-z0-9]*>)*')
_SERIALIZED_START_TAG = re.compile(r"<([a-z][a-z0-9]*)( [^<>]*)>")  # those with attributes
_SERIALIZED_ATTRIBUTE = re.compile(r' ([a-z][a-z:-]*)="([^"]*)"')


def _attribute_urls(tags: str) -> list[str]:
    collector = _LinkCollector()
    if _SERIALIZED_TAGS.fullmatch(tags) and "<script" not in tags and "<style" not in tags:
        for match in _SERIALIZED_START_TAG.finditer(tags):
            attrs = [(name, htmllib.unescape(value) if value else value)
                     for name, value in _SERIALIZED_ATTRIBUTE.findall(match.group(2))]
            collector.handle_starttag(match.group(1), attrs)
    else:
        collector.feed(tags)
        collector.close()
    return collector.urls


class _LinkCollector(HTMLParser):
    """URLs from link/resource attributes and meta refresh."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        for name, value in values.items():
            if name == "srcset":
                self.urls.extend(item.split()[0] for item in value.split(",") if item.strip())
            elif name in _URL_ATTRIBUTES:
                self.urls.append(value)
        if tag == "meta" and values.get("http-equiv", "").lower() == "refresh":
            match = _REFRESH_URL.search(values.get("content", ""))
            if match:
                self.urls.append(match.group(1))
