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

    def add(self, kind: str, value: str, source: str) -> None:
        if value and (kind, value) not in self._seen:
            self._seen.add((kind, value))
            self.items.append(Indicator(kind, value, source))


def _collect_message(msg: ParsedEmail, found: _Collector, prefix: str) -> None:
    _collect_headers(msg, found, prefix)
    _collect_text(msg.subject, found, prefix + "header:Subject")
    _collect_text(msg.text, found, prefix + "body")
    _collect_html(msg.html, found, prefix + "html")
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
# are tested in Python on the few candidates. A look-behind at the start of
# a pattern makes the engine try every position, 5-10x slower on 1 MB bodies.
_SCHEME_SEP = re.compile(r"://[^\s<>\"'`{}|\\^]+")
_SCHEME_BEFORE = re.compile(r"(?:https?|ftp)\Z", re.I)
_WWW = re.compile(r"[Ww][Ww][Ww]\d{0,3}\.[^\s<>\"'`{}|\\^]+")
_AT = re.compile(r"@")
# \w rather than ASCII classes: internationalised addresses (RFC 6531) exist.
_EMAIL_LOCAL = re.compile(r"[\w.%+-]{1,64}\Z")
_EMAIL_DOMAIN = re.compile(r"(?:[\w-]{1,63}\.){1,10}[^\W\d_]{2,63}(?![\w-])")
_EMAIL = re.compile(r"[\w.%+-]{1,64}@(?:[\w-]{1,63}\.){1,10}[^\W\d_]{2,63}")  # short values only
_IPV4 = re.compile(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}")
_IPV6_FULL = re.compile(r"[0-9A-Fa-f]{1,4}(?::[0-9A-Fa-f]{1,4}){7}")
_IPV6_COMPRESSED = re.compile(r"::[0-9A-Fa-f:]{0,37}")
_HEX_COLON_BEFORE = re.compile(r"[0-9A-Fa-f:]{1,37}\Z")
_DEFANGED_DOMAIN = re.compile(
    r"(?<![\w.\-\[\](){}])[A-Za-z0-9-]{1,63}(?:(?:\[\.\]|\(\.\)|\{\.\}|\[dot\]|\(dot\)|\.)[A-Za-z0-9-]{1,63}){1,10}",
    re.I,
)
_DEFANG_MARK = re.compile(r"\[\.\]|\(\.\)|\{\.\}|\[dot\]|\(dot\)", re.I)


_DEFANG_HINTS = ("hxxp", "h[xx]p", "fxp", "[:]", "[://]", "[.]", "(.)", "{.}", "[dot]", "(dot)", "[@]", "(@)", "[at]")


def refang(text: str) -> str:
    """Undo the usual defanging: hxxp://, example[.]com, user[@]example.com."""
    lowered = text.lower()
    if not any(hint in lowered for hint in _DEFANG_HINTS):
        return text  # the common case, without six passes over a large body
    for pattern, replacement in _REFANG:
        text = pattern.sub(replacement, text)
    return text


def _collect_text(text: str, found: _Collector, source: str) -> None:
    if not text:
        return
    _collect_defanged_domains(text, found, source)
    plain = refang(text)
    for url in _urls_in(plain):
        _add_url(url, found, source)
    for address in _emails_in(plain):
        _add_email(address, found, source)
    for address in _ips_in(plain):
        if not (address.is_unspecified or address.is_loopback):
            found.add("ip", str(address), source)


def _urls_in(text: str) -> list[str]:
    urls = []
    for match in _SCHEME_SEP.finditer(text):
        scheme = _SCHEME_BEFORE.search(text, max(0, match.start() - 5), match.start())
        if scheme and not _is_word_char(text, scheme.start() - 1):
            urls.append(text[scheme.start():match.end()])
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
    for match in _IPV4.finditer(text):
        start, end = match.span()
        following = text[end:end + 2]
        if _is_word_char(text, start - 1, ".") or following[:1].isdigit() or (
                following[:1] == "." and following[1:].isdigit()):
            continue  # part of a longer dotted number such as a version string
        try:
            found.append(ipaddress.IPv4Address(match.group(0)))
        except ValueError:  # octet > 255 or a leading zero
            continue
    return found


def _ipv6s_in(text: str) -> list[ipaddress.IPv6Address]:
    spans = []
    if "::" in text:
        for match in _IPV6_COMPRESSED.finditer(text):
            before = _HEX_COLON_BEFORE.search(text, max(0, match.start() - 37), match.start())
            spans.append((before.start() if before else match.start(), match.end()))
    if text.count(":") >= 7:
        spans.extend(match.span() for match in _IPV6_FULL.finditer(text))
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


def _add_url(url: str, found: _Collector, source: str) -> None:
    url = strip_trailing_punctuation(refang(url.strip()))
    if not url or len(url) > _MAX_URL:
        return
    try:
        host = urlsplit(url).hostname
    except ValueError:  # e.g. an unbalanced "[" in the host
        return
    if not host:
        return
    found.add("url", url, source)
    _add_host(host, found, source)


def _add_host(host: str, found: _Collector, source: str) -> None:
    try:
        found.add("ip", str(ipaddress.ip_address(host.strip("[]"))), source)
        return
    except ValueError:
        pass
    _add_domain(host, found, source)


def _add_email(address: str, found: _Collector, source: str) -> None:
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
# _split_canonical relies on. An iframe's src is lost; mail clients never
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


def _collect_html(html: str, found: _Collector, source: str) -> None:
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
    tags, text = _split_canonical(canonical)
    collector = _LinkCollector()
    collector.feed(tags)
    collector.close()
    for url in collector.urls:
        _add_attribute_url(url, found, source)
    _collect_text(text, found, source)


# In nh3 output "<" and ">" occur only as tag delimiters: text and attribute
# values carry them as &lt; / &gt;. So this split is exact there (and only
# there), and text needs only the few entities html5ever's serializer emits.
_CANONICAL_TAG = re.compile(r"(<[^<>]*>)")
_SERIALIZER_ENTITIES = (("&lt;", "<"), ("&gt;", ">"), ("&quot;", '"'), ("&nbsp;", "\xa0"), ("&amp;", "&"))


def _split_canonical(canonical: str) -> tuple[str, str]:
    pieces = _CANONICAL_TAG.split(canonical)
    tags = "".join(pieces[1::2])
    text = " ".join(pieces[0::2])
    for entity, char in _SERIALIZER_ENTITIES:
        text = text.replace(entity, char)
    return tags, text


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
