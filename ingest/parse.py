"""Parse hostile email into plain data, best-effort, without ever crashing.

Contract: ``parse_bytes``/``parse_file`` either return a ``ParsedEmail``
(possibly with ``defects`` describing what was wrong) or raise ``ParseError``
with a short ``reason`` code, which sends the stored raw message to
quarantine. Any other exception is a bug; a safety net turns it into
``ParseError("internal_error")`` so one bad message cannot stop a worker.
``OSError`` (writing attachments) is the exception: it is an environment
problem, not a property of the message, so it propagates and the job retries.

Why the stdlib parser with ``policy.compat32``: it only splits the MIME
structure and leaves header values as raw strings (8-bit bytes kept via
surrogateescape). ``policy.default`` parses every header it touches with
``_header_value_parser``, which is far slower on hostile headers and raises in
places; here header decoding is done by small functions below that are
linear, capped, and cannot raise.
"""
from __future__ import annotations

import binascii
import codecs
import email.utils
import hashlib
import os
import re
import tempfile
import unicodedata
from dataclasses import dataclass, field
from email import policy
from email.message import Message
from email.parser import BytesParser
from pathlib import Path

import pybase64

from . import mimesplit


class ParseError(Exception):
    """The input cannot be treated as an email; ``reason`` is a stable code.

    Reasons: ``empty``, ``too_large``, ``not_mime`` (a recognised non-mail
    format such as an Outlook .msg file), ``no_headers``, ``too_deep``
    (nesting deeper than the stdlib parser's recursion allows),
    ``internal_error`` (a bug in this module; details in ``__cause__``).
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Limits:
    """Caps that keep hostile input cheap. Exceeding one is a defect, not an error."""

    max_bytes: int = 64 * 1024 * 1024  # larger input is refused (too_large)
    max_depth: int = 10  # attached messages inside attached messages
    max_multipart_depth: int = 40  # multipart inside multipart
    max_parts: int = 1000  # MIME parts walked, whole tree, nested messages included
    max_headers: int = 500  # header fields kept per message
    max_header_bytes: int = 256 * 1024  # decoded header text kept per message
    max_header_chars: int = 16 * 1024  # one decoded header value (Subject etc.)
    max_addresses: int = 1000  # per address header
    max_text_chars: int = 2_000_000  # text and html bodies, each
    max_references: int = 100
    max_defects: int = 200


@dataclass
class Address:
    name: str = ""
    address: str = ""

    def __str__(self) -> str:
        return f"{self.name} <{self.address}>" if self.name else self.address


@dataclass
class Attachment:
    filename: str  # sanitized: no path, no control/bidi characters, length-capped
    content_type: str
    size: int
    sha256: str
    md5: str
    disposition: str = ""  # "attachment", "inline" or ""
    content_id: str = ""
    path: Path | None = None  # set when attachments_dir was given (file named by sha256)
    data: bytes | None = None  # set otherwise


@dataclass
class ParsedEmail:
    subject: str = ""
    from_: Address = field(default_factory=Address)
    to: list[Address] = field(default_factory=list)
    cc: list[Address] = field(default_factory=list)
    reply_to: list[Address] = field(default_factory=list)
    date: str = ""  # ISO 8601, "" when missing or unparseable
    message_id: str = ""  # with angle brackets, as written
    in_reply_to: str = ""
    references: list[str] = field(default_factory=list)
    headers: list[tuple[str, str]] = field(default_factory=list)  # decoded, in order, capped
    text: str = ""
    html: str = ""  # raw and unsanitized: pass through sanitize_html before display
    attachments: list[Attachment] = field(default_factory=list)
    nested: list[ParsedEmail] = field(default_factory=list)  # attached messages, in order
    defects: list[str] = field(default_factory=list)

    @property
    def evidence(self) -> ParsedEmail:
        """The message to investigate.

        A phishing report usually forwards the suspicious mail *as an
        attachment*; then the first attached message is the evidence and
        this message is just the reporter's cover note. A property rather
        than a field so the dataclass holds no reference cycle (``==``,
        ``asdict`` and ``repr`` stay finite).
        """
        return self.nested[0] if self.nested else self

    def header(self, name: str) -> list[str]:
        """All decoded values of header ``name`` (case-insensitive)."""
        wanted = name.lower()
        return [value for key, value in self.headers if key.lower() == wanted]


def parse_file(path: str | os.PathLike, *, attachments_dir: str | os.PathLike | None = None,
               limits: Limits = Limits()) -> ParsedEmail:
    return parse_bytes(read_raw(path, limits), attachments_dir=attachments_dir, limits=limits)


def read_raw(path: str | os.PathLike, limits: Limits = Limits()) -> bytes:
    """A stored message's bytes, or ParseError("too_large") before reading
    one larger than parsing would take."""
    size = os.stat(path).st_size
    if size > limits.max_bytes:
        raise ParseError("too_large", f"{size} bytes > {limits.max_bytes}")
    with open(path, "rb") as handle:
        return handle.read()


def parse_bytes(raw: bytes, *, attachments_dir: str | os.PathLike | None = None,
                limits: Limits = Limits()) -> ParsedEmail:
    raw = bytes(raw)
    try:
        return _parse_top(raw, _Context(limits, attachments_dir))
    except ParseError:
        raise
    except RecursionError as exc:
        raise ParseError("too_deep", "MIME nesting exceeds what the parser can recurse into") from exc
    except (OSError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - the safety net promised above
        raise ParseError("internal_error", f"{type(exc).__name__}: {exc}"[:300]) from exc


# ---------------------------------------------------------------------------
# Top level
# ---------------------------------------------------------------------------

class _Context:
    """State shared by a message and everything nested in it."""

    def __init__(self, limits: Limits, attachments_dir: str | os.PathLike | None) -> None:
        self.limits = limits
        self.attachments_dir = Path(attachments_dir) if attachments_dir is not None else None
        self.parts_seen = 0
        self.part_limit_hit = False


_MAGIC = [
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "Outlook .msg / OLE2 compound file"),
    (b"\x78\x9f\x3e\x22", "TNEF (winmail.dat) stream"),
    (b"%PDF-", "PDF document"),
    (b"PK\x03\x04", "ZIP archive"),
    (b"\x1f\x8b", "gzip data"),
    (b"\x89PNG", "PNG image"),
    (b"\xff\xd8\xff", "JPEG image"),
]


def _parse_top(raw: bytes, ctx: _Context) -> ParsedEmail:
    limits = ctx.limits
    if len(raw) > limits.max_bytes:
        raise ParseError("too_large", f"{len(raw)} bytes > {limits.max_bytes}")
    if not raw or raw.isspace():  # not raw.strip(): that would copy the whole message
        raise ParseError("empty", "no content")
    for magic, what in _MAGIC:
        if raw.startswith(magic):
            raise ParseError("not_mime", what)
    raw, early_defects = _repair_input(raw, limits)
    msg = _split(raw)
    _require_mail_headers(msg)
    parsed = _build_message(msg, ctx, depth=0)
    parsed.defects[:0] = early_defects
    return parsed


def _split(raw: bytes) -> Message:
    """The MIME tree: the fast splitter for the usual well-formed message,
    the stdlib parser (which records what is wrong) for everything else."""
    msg = mimesplit.split(raw)
    return msg if msg is not None else BytesParser(policy=policy.compat32).parsebytes(raw)


def _repair_input(raw: bytes, limits: Limits) -> tuple[bytes, list[str]]:
    """Byte-level fixes the stdlib parser cannot make itself."""
    defects = []
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
        defects.append("UTF-8 byte order mark before the headers removed")
    raw, fixed = _fix_obsolete_header_names(raw)
    if fixed:
        defects.append("obsolete header syntax (white space before the colon) accepted")
    raw, cut = _cut_runaway_parts(raw, limits)
    if cut:
        defects.append(cut)
    return raw, defects


# The leading run of header-looking lines (an mbox "From " line, fields,
# continuations): where the stdlib will look for headers, and nowhere else.
_HEADER_BLOCK = re.compile(
    rb"(?:From [^\r\n]*(?:\r\n|\r|\n))?(?:(?:[!-9;-~]+[ \t]*:|[ \t])[^\r\n]*(?:\r\n|\r|\n))*")
_OBSOLETE_NAME = re.compile(rb"^([!-9;-~]+)[ \t]+:", re.M)


def _fix_obsolete_header_names(raw: bytes) -> tuple[bytes, bool]:
    # RFC 5322 4.5 obsolete syntax "Subject :" must still be read; the stdlib
    # would instead end the header block at the first such line.
    head_end = _HEADER_BLOCK.match(raw).end()
    fixed, count = _OBSOLETE_NAME.subn(rb"\1:", raw[:head_end])
    return (fixed + raw[head_end:], True) if count else (raw, False)


def _cut_runaway_parts(raw: bytes, limits: Limits) -> tuple[bytes, str]:
    """Cut input with absurdly many boundary lines before the stdlib builds a
    Message object for each (memory and time grow with the count)."""
    allowed = limits.max_parts * 4
    if raw.count(b"\n--") <= allowed:
        return raw, ""
    offset = -1
    for _ in range(allowed):
        offset = raw.find(b"\n--", offset + 1)
    return raw[:offset + 1], f"input cut after {allowed} MIME boundary lines"


# Field names that mark a header block as mail. Anything with a colon on its
# first line parses as "headers", so a JSON or text file would otherwise pass.
_MAIL_FIELDS = {
    "from", "to", "cc", "bcc", "subject", "date", "message-id", "received", "return-path",
    "mime-version", "content-type", "content-transfer-encoding", "content-disposition",
    "sender", "reply-to", "in-reply-to", "references", "delivered-to", "user-agent",
    "dkim-signature", "authentication-results", "thread-topic", "thread-index",
    "importance", "newsgroups", "path", "organization", "envelope-to",
}
_MAIL_FIELD_PREFIXES = ("x-", "resent-", "list-", "arc-")


def _require_mail_headers(msg: Message) -> None:
    names = [str(name).strip().lower() for name, _ in msg.raw_items()]
    if not names:
        raise ParseError("no_headers", "no header block found (not an email)")
    if not any(n in _MAIL_FIELDS or n.startswith(_MAIL_FIELD_PREFIXES) for n in names):
        raise ParseError("no_headers", "no email header fields found (not an email)")


# ---------------------------------------------------------------------------
# One message
# ---------------------------------------------------------------------------

def _build_message(msg: Message, ctx: _Context, depth: int) -> ParsedEmail:
    limits = ctx.limits
    out = ParsedEmail()
    defects = _Defects(out.defects, limits.max_defects)
    raw_headers = _raw_headers(msg)
    out.headers = _decoded_headers(raw_headers, limits, defects)

    def first(name: str) -> str:
        for key, value in raw_headers:
            if key.lower() == name:
                return value
        return ""

    # Already decoded (and any defect recorded) for out.headers; quiet here.
    out.subject = _decode_header_value(first("subject"), limits.max_header_chars, _Defects([], 0))
    senders = _addresses(first("from"), limits, defects)
    out.from_ = senders[0] if senders else Address()
    out.to = _addresses(first("to"), limits, defects)
    out.cc = _addresses(first("cc"), limits, defects)
    out.reply_to = _addresses(first("reply-to"), limits, defects)
    out.date = _parse_date(first("date"), defects)
    out.message_id = _message_id(first("message-id"))
    out.in_reply_to = _message_id(first("in-reply-to"))
    out.references = _references(first("references"), limits.max_references, defects)
    _walk_parts(msg, out, ctx, depth, defects)
    return out


class _Defects:
    """Append-only defect list with a cap, so 3,000 broken parts stay readable."""

    def __init__(self, target: list[str], cap: int) -> None:
        self.target = target
        self.cap = cap

    def add(self, text: str) -> None:
        if len(self.target) < self.cap:
            self.target.append(text)
        elif len(self.target) == self.cap:
            self.target.append("further defects omitted")


def _raw_headers(msg: Message) -> list[tuple[str, str]]:
    """(name, value) pairs with 8-bit bytes decoded and folding removed."""
    pairs = []
    for name, value in msg.raw_items():
        pairs.append((_to_text(str(name)).strip(), _unfold(_to_text(str(value)))))
    return pairs


def _to_text(value: str) -> str:
    """Undo surrogateescape: RFC 6532 allows UTF-8 headers; else assume cp1252."""
    try:
        data = value.encode("ascii", "surrogateescape")
    except UnicodeEncodeError:
        return value
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", "replace")


def _unfold(value: str) -> str:
    return value.replace("\r", "").replace("\n", "")


def _decoded_headers(raw_headers: list[tuple[str, str]], limits: Limits, defects: _Defects) -> list[tuple[str, str]]:
    kept: list[tuple[str, str]] = []
    budget = limits.max_header_bytes
    for name, value in raw_headers:
        if len(kept) >= limits.max_headers:
            defects.add(f"more than {limits.max_headers} header fields; rest not kept")
            break
        decoded = _decode_header_value(value, limits.max_header_chars, defects, name=name)
        cost = len(name) + len(decoded)
        if cost > budget:
            defects.add(f"header block larger than {limits.max_header_bytes} characters; rest not kept")
            break
        budget -= cost
        kept.append((_clean_control(name)[:200], decoded))
    return kept


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _clean_control(text: str) -> str:
    # Decoded headers can carry CR/LF/NUL (e.g. "=0A" in an encoded-word);
    # they would break logs, the UI and Postgres text columns.
    return _CONTROL.sub(" ", text)


def _decode_header_value(value: str, cap: int, defects: _Defects, *, name: str = "") -> str:
    if len(value) > cap * 4:
        defects.add(f"header {name or 'value'} longer than {cap * 4} characters; cut")
        value = value[:cap * 4]
    decoded = _clean_control(decode_encoded_words(value, defects)).strip()
    if len(decoded) > cap:
        defects.add(f"header {name or 'value'} decoded to more than {cap} characters; cut")
        decoded = decoded[:cap]
    return decoded


# RFC 2047 encoded-word. The charset and text exclude "?" so each match ends
# at the first "?=" after its start: matching stays linear on hostile input.
_ENCODED_WORD = re.compile(r"=\?([^?\s]{1,75})\?([bBqQ])\?([^?]*)\?=")
_BETWEEN_WORDS = re.compile(r"[ \t]*")


def decode_encoded_words(value: str, defects: _Defects | None = None) -> str:
    """Decode RFC 2047 encoded-words once (never recursively: a decoded word
    that looks like another encoded-word stays literal text).

    Adjacent words in the same charset are joined as bytes before decoding,
    so a multi-byte character split across two words survives.
    """
    pieces: list[str] = []
    pending: list[bytes] = []
    pending_charset = ""
    position = 0

    def flush() -> None:
        if pending:
            pieces.append(_decode_bytes(b"".join(pending), pending_charset, defects, "header"))
            pending.clear()

    for match in _ENCODED_WORD.finditer(value):
        gap = value[position:match.start()]
        if not (pending and _BETWEEN_WORDS.fullmatch(gap)):
            flush()
            pieces.append(gap)
        charset = match.group(1).split("*", 1)[0]  # RFC 2231 language suffix
        if pending and charset.lower() != pending_charset.lower():
            flush()
        pending_charset = charset
        pending.append(_decode_word_bytes(match.group(2), match.group(3)))
        position = match.end()
    flush()
    pieces.append(value[position:])
    return "".join(pieces)


def _decode_word_bytes(encoding: str, text: str) -> bytes:
    data = text.encode("ascii", "replace")
    if encoding in "bB":
        return _b64decode_lenient(data)
    return binascii.a2b_qp(data, header=True)


_B64_CLEAN = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\r\n\t "


def _b64decode_lenient(data: bytes | memoryview, defects: _Defects | None = None) -> bytes:
    """Base64 that never raises: junk characters are skipped, bad padding is
    repaired, and concatenated padded chunks are decoded one by one."""
    # Fast path for the usual well-formed body: only alphabet and line
    # breaks, padding only at the very end. Anything else, or a padding
    # error, takes the careful path below. pybase64 decodes with SIMD, ~10x
    # binascii's speed (attachments are most of a mailbox's bytes); on such
    # input it gives exactly what binascii.a2b_base64 gives (pinned by
    # tests/test_parse_base64.py).
    if _plain_base64(data):
        try:
            return pybase64.b64decode(data, validate=False)
        except (binascii.Error, ValueError):
            pass
    if defects is not None and re.search(rb"[^A-Za-z0-9+/=\s]", data):
        defects.add("invalid characters in base64 data skipped")
    chunks = []
    for segment in re.split(rb"=+", re.sub(rb"[^A-Za-z0-9+/=]", b"", data)):
        if len(segment) % 4 == 1:
            if defects is not None:
                defects.add("truncated base64 data")
            segment = segment[:-1]
        segment += b"=" * (-len(segment) % 4)
        chunks.append(binascii.a2b_base64(segment))
    return b"".join(chunks)


_B64_SCAN = 1 << 20


def _plain_base64(data: bytes | memoryview) -> bool:
    """Only alphabet and white space, "=" only in the trailing padding.
    Scanned in 1 MiB pieces so a large body is never copied whole."""
    first_pad = -1
    for offset in range(0, len(data), _B64_SCAN):
        chunk = bytes(data[offset:offset + _B64_SCAN])
        if chunk.translate(None, _B64_CLEAN):
            return False
        if first_pad < 0 and (pad := chunk.find(b"=")) >= 0:
            first_pad = offset + pad
    if first_pad < 0:
        return True
    return b"=" not in bytes(data[first_pad:]).rstrip(b"\r\n\t ").rstrip(b"=")


# Labels mail commonly carries that should decode as a superset: Windows
# clients label cp1252 as latin-1 or ascii (as browsers assume), GB2312 text
# is usually GBK/GB18030.
_CHARSET_ALIASES = {
    "us-ascii": "cp1252", "ascii": "cp1252", "iso-8859-1": "cp1252", "latin1": "cp1252",
    "latin-1": "cp1252", "iso8859-1": "cp1252", "gb2312": "gb18030", "gbk": "gb18030",
    "x-gbk": "gb18030", "ks_c_5601-1987": "cp949", "euc-kr": "cp949", "shift_jis": "cp932",
    "x-sjis": "cp932", "sjis": "cp932", "unicode-1-1-utf-7": "utf-7",
}
# Python codecs that decode text but are not charsets anyone means in mail.
_NOT_CHARSETS = {"undefined", "unicode_escape", "raw_unicode_escape", "idna", "punycode", "mbcs", "oem"}


def lookup_charset(label: str | None) -> str | None:
    """Python codec name for a MIME charset label, or None if unusable."""
    if not label:
        return None
    label = label.strip().strip('"').lower()[:60].removeprefix("charset=").strip('"')[:40]
    label = _CHARSET_ALIASES.get(label, label)
    try:
        info = codecs.lookup(label)
    except (LookupError, ValueError, TypeError):
        return None
    if not getattr(info, "_is_text_encoding", True) or info.name in _NOT_CHARSETS:
        return None
    return info.name


def _decode_bytes(data: bytes, charset: str | None, defects: _Defects | None, where: str) -> str:
    """Bytes to text without raising; records unknown charsets and bad bytes."""
    codec = lookup_charset(charset)
    if codec:
        try:
            text = data.decode(codec, "replace")
        except (UnicodeError, LookupError, ValueError, TypeError):
            text = None
        if text is not None:
            if defects is not None and "\ufffd" in text and b"\xef\xbf\xbd" not in data:
                defects.add(f"{where}: bytes invalid in charset {charset!r} replaced")
            return text
    if charset and defects is not None and charset.strip().lower() not in ("unknown-8bit", "x-unknown"):
        defects.add(f"{where}: unknown charset {charset[:40]!r}; decoded as UTF-8 or Windows-1252")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", "replace")


# email.utils.getaddresses recurses once per ":" (group syntax) and per
# nested "(", so a hostile To: header raises RecursionError, and it is
# quadratic in the number of groups. Split the list ourselves in one linear
# pass and hand parseaddr only single, group-free entries.
_MAX_COMMENT_DEPTH = 20
_ADDR_SPEC = re.compile(r"[^\s<>()\[\],;:\"@]{1,64}@[^\s<>()\[\],;:\"@]{1,255}")


def _addresses(value: str, limits: Limits, defects: _Defects) -> list[Address]:
    if not value:
        return []
    cap = limits.max_header_chars * 4
    if len(value) > cap:
        defects.add(f"address header longer than {cap} characters; cut")
        value = value[:cap]
    found: list[Address] = []
    for entry in split_address_list(value):
        if len(found) >= limits.max_addresses:
            defects.add(f"more than {limits.max_addresses} addresses in one header; rest dropped")
            break
        address = _one_address(entry, defects)
        if address is not None:
            found.append(address)
    return found


def _one_address(entry: str, defects: _Defects) -> Address | None:
    if not entry.strip():
        return None
    if _comment_depth(entry) > _MAX_COMMENT_DEPTH:
        defects.add("address with deeply nested comments; address found by pattern")
        match = _ADDR_SPEC.search(entry)
        name, address = "", match.group(0) if match else ""
    else:
        name, address = email.utils.parseaddr(entry)
    if not address and "@" in entry:
        match = _ADDR_SPEC.search(entry)
        address = match.group(0) if match else ""
    if not (name or address):
        return None
    name = _clean_control(decode_encoded_words(name, defects)).strip()[:500]
    return Address(name=name, address=_clean_control(address).strip()[:500])


def split_address_list(value: str) -> list[str]:
    """Split an address header at top-level commas and semicolons, dropping
    group names ("Team: a@x, b@y;"). Quotes, comments, <angle> and [domain
    literal] sections are respected. Linear in the input."""
    entries: list[str] = []
    current: list[str] = []
    closer = ""  # the character that ends the current quoted section
    depth = 0  # comment nesting
    escaped = False
    for char in value:
        if escaped:
            escaped = False
        elif closer or depth:
            if char == "\\":
                escaped = True
            elif depth and char == "(":
                depth += 1
            elif depth and char == ")":
                depth -= 1
            elif not depth and char == closer:
                closer = ""
        elif char == "(":
            depth = 1
        elif char in "\"<[":
            closer = {"\"": "\"", "<": ">", "[": "]"}[char]
        elif char in ",;":
            entries.append("".join(current))
            current = []
            continue
        elif char == ":":
            current = []  # a group's display name
            continue
        current.append(char)
    entries.append("".join(current))
    return entries


def _comment_depth(value: str) -> int:
    depth = deepest = 0
    for char in value:
        if char == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif char == ")" and depth:
            depth -= 1
    return deepest


def _parse_date(value: str, defects: _Defects) -> str:
    if not value.strip():
        return ""
    try:
        return email.utils.parsedate_to_datetime(value[:200]).isoformat()
    except (TypeError, ValueError, OverflowError, IndexError):
        defects.add(f"unparseable Date header {value[:80]!r}")
        return ""


_MSG_ID = re.compile(r"<[^<>\s]{1,998}>")


def _message_id(value: str) -> str:
    match = _MSG_ID.search(value)
    if match:
        return match.group(0)
    words = value.split()
    return _clean_control(words[0])[:998] if words else ""


def _references(value: str, cap: int, defects: _Defects) -> list[str]:
    ids = _MSG_ID.findall(value)
    if len(ids) > cap:
        defects.add(f"References lists {len(ids)} ids; kept the first and the last {cap - 1}")
        ids = ids[:1] + ids[-(cap - 1):]
    return ids


# ---------------------------------------------------------------------------
# MIME parts
# ---------------------------------------------------------------------------

_NESTED_MESSAGE_TYPES = {"message/rfc822", "message/global", "message/news"}


def _walk_parts(msg: Message, out: ParsedEmail, ctx: _Context, depth: int, defects: _Defects) -> None:
    """Depth-first over the MIME tree without recursion; attached messages
    become ``out.nested`` (recursion there is bounded by max_depth)."""
    limits = ctx.limits
    texts: list[str] = []
    htmls: list[str] = []
    stack: list[tuple[Message, str, int]] = [(msg, "1", 0)]
    while stack:
        part, where, level = stack.pop()
        if not _count_part(ctx, defects):
            break
        _note_stdlib_defects(part, where, defects)
        _cap_param_headers(part, defects, where)
        ctype = part.get_content_type()
        payload = part.get_payload() if part.is_multipart() else None
        if isinstance(payload, list) and ctype in _NESTED_MESSAGE_TYPES:
            _add_nested(part, payload, out, ctx, depth, defects, where)
        elif isinstance(payload, list) and ctype.startswith("message/"):
            # delivery-status, feedback-report, disposition-notification are
            # header blocks about a message, not messages; only these two
            # hide content that is worth telling the analyst about.
            if ctype in ("message/partial", "message/external-body"):
                defects.add(f"part {where}: {ctype} not expanded")
        elif isinstance(payload, list):
            if level >= limits.max_multipart_depth:
                defects.add(f"part {where}: multipart nesting deeper than {limits.max_multipart_depth}; skipped")
                continue
            for index in range(len(payload), 0, -1):
                stack.append((payload[index - 1], f"{where}.{index}", level + 1))
        else:
            _leaf_part(part, ctype, out, ctx, depth, defects, where, texts, htmls)
    out.text = _join_capped(texts, limits.max_text_chars, "text", defects)
    out.html = _join_capped(htmls, limits.max_text_chars, "html", defects)


def _count_part(ctx: _Context, defects: _Defects) -> bool:
    ctx.parts_seen += 1
    if ctx.parts_seen <= ctx.limits.max_parts:
        return True
    if not ctx.part_limit_hit:
        ctx.part_limit_hit = True
        defects.add(f"more than {ctx.limits.max_parts} MIME parts; the rest were not processed")
    return False


def _note_stdlib_defects(part: Message, where: str, defects: _Defects) -> None:
    for defect in getattr(part, "defects", []):
        name = type(defect).__name__.removesuffix("Defect")
        defects.add(f"part {where}: {name}")


_PARAM_HEADER_CAP = 8192


def _cap_param_headers(part: Message, defects: _Defects, where: str) -> None:
    # The stdlib's parameter parser is quadratic in the number of ";" in a
    # header; cap Content-Type/-Disposition before anything reads them.
    for name in ("Content-Type", "Content-Disposition"):
        value = part.get(name)
        if value is not None and len(str(value)) > _PARAM_HEADER_CAP:
            part.replace_header(name, str(value)[:_PARAM_HEADER_CAP])
            defects.add(f"part {where}: {name} longer than {_PARAM_HEADER_CAP} characters; cut")


def _leaf_part(part: Message, ctype: str, out: ParsedEmail, ctx: _Context, depth: int,
               defects: _Defects, where: str, texts: list[str], htmls: list[str]) -> None:
    disposition = (part.get_content_disposition() or "").lower()
    filename = _raw_filename(part, defects)
    data = _payload_bytes(part, defects, where)
    if part.get_content_maintype() == "multipart":
        # Boundary missing or never found: the stdlib left the body as text.
        defects.add(f"part {where}: {ctype} without a usable boundary; body kept as text")
        ctype = "text/plain"
    if ctype in ("text/plain", "text/html") and disposition != "attachment" and not filename:
        text = _decode_bytes(data, _charset(part), defects, f"part {where}")
        if "\x00" in text:
            defects.add(f"part {where}: NUL characters replaced")
            text = text.replace("\x00", "\ufffd")
        (htmls if ctype == "text/html" else texts).append(text)
        return
    attachment = _store_attachment(data, filename, ctype, disposition, part, ctx, defects)
    out.attachments.append(attachment)
    if filename.lower().endswith(".eml") and ctype not in _NESTED_MESSAGE_TYPES:
        _add_nested_bytes(data, out, ctx, depth, defects, where)


def _charset(part: Message) -> str | None:
    try:
        return part.get_content_charset()
    except (LookupError, ValueError, TypeError, UnicodeError):
        return None


def _join_capped(chunks: list[str], cap: int, what: str, defects: _Defects) -> str:
    joined = "\n".join(chunks)
    if len(joined) > cap:
        defects.add(f"{what} body longer than {cap} characters; cut")
        joined = joined[:cap]
    return joined


def _payload_bytes(part: Message, defects: _Defects, where: str) -> bytes:
    # The public get_payload() re-decodes 8-bit bytes through the declared
    # charset with errors="replace" (lossy for unknown charsets and for raw
    # bytes inside QP/base64 bodies); the stdlib's own BytesGenerator reads
    # _payload for the same reason. From the fast splitter it is a
    # memoryview of the raw message: base64 and quoted-printable decode
    # straight from it, without a copy of the encoded text.
    payload = getattr(part, "_payload", None)
    if payload is None:
        return b""
    if isinstance(payload, str):
        try:
            data = payload.encode("ascii", "surrogateescape")
        except UnicodeEncodeError:
            data = payload.encode("utf-8", "surrogateescape")
    elif isinstance(payload, memoryview):
        data = payload
    else:
        data = bytes(payload)
    cte = _transfer_encoding(part)
    if cte == "base64":
        return _b64decode_lenient(data, defects)
    if cte == "quoted-printable":
        return binascii.a2b_qp(data)
    if cte == "x-uuencode":
        return _uudecode_lenient(bytes(data))
    if cte not in ("", "7bit", "8bit", "binary"):
        defects.add(f"part {where}: unknown Content-Transfer-Encoding {cte!r}; kept as is")
    return bytes(data)


def _transfer_encoding(part: Message) -> str:
    """Normalised Content-Transfer-Encoding: "7-bit", "Quoted Printable" and
    "base64 " are all seen in the wild."""
    value = str(part.get("Content-Transfer-Encoding", "")).strip().lower()[:40]
    squashed = re.sub(r"[\s_-]", "", value)
    known = {"base64": "base64", "quotedprintable": "quoted-printable", "7bit": "7bit",
             "8bit": "8bit", "binary": "binary", "xuuencode": "x-uuencode", "uuencode": "x-uuencode",
             "xuue": "x-uuencode", "uue": "x-uuencode"}
    return known.get(squashed, value)


def _uudecode_lenient(data: bytes) -> bytes:
    out = []
    inside = False
    for line in data.splitlines():
        if not inside:
            inside = line.startswith(b"begin ")
            continue
        if line.strip() in (b"end", b"`", b""):
            if line.strip() == b"end":
                break
            continue
        try:
            out.append(binascii.a2b_uu(line))
        except binascii.Error:
            continue
    return b"".join(out)


def _add_nested(part: Message, payload: list, out: ParsedEmail, ctx: _Context, depth: int,
                defects: _Defects, where: str) -> None:
    inner = payload[0] if payload else None
    if not isinstance(inner, Message):
        return
    cte = _transfer_encoding(part)
    if cte in ("base64", "quoted-printable") and not list(inner.raw_items()):
        # The stdlib parses message/rfc822 bodies as-is; an encoded one must
        # be decoded first and parsed again.
        _add_nested_bytes(_payload_bytes(_inner_as_part(inner, cte), defects, where), out, ctx, depth, defects, where)
        return
    if not list(inner.raw_items()):
        # Not a message after all: an empty or header-less body would make a
        # blank "evidence". Keep any content as a plain attachment instead.
        defects.add(f"part {where}: attached message has no headers; kept as an attachment")
        data = _payload_bytes(inner, defects, where)
        if data.strip():
            out.attachments.append(_store_attachment(data, "", "message/rfc822", "attachment", part, ctx, defects))
        return
    if depth + 1 > ctx.limits.max_depth:
        defects.add(f"part {where}: attached message deeper than {ctx.limits.max_depth}; skipped")
        return
    out.nested.append(_build_message(inner, ctx, depth + 1))


def _inner_as_part(inner: Message, cte: str) -> Message:
    """A header-less parsed body re-labelled with its transfer encoding."""
    shell = Message()
    shell["Content-Transfer-Encoding"] = cte
    shell.set_payload(getattr(inner, "_payload", ""))
    return shell


def _add_nested_bytes(data: bytes, out: ParsedEmail, ctx: _Context, depth: int,
                      defects: _Defects, where: str) -> None:
    if depth + 1 > ctx.limits.max_depth:
        defects.add(f"part {where}: attached message deeper than {ctx.limits.max_depth}; skipped")
        return
    try:
        if not data or data.isspace() or any(data.startswith(magic) for magic, _ in _MAGIC):
            raise ParseError("not_mime")
        msg = _split(data)
        _require_mail_headers(msg)
    except ParseError as exc:
        defects.add(f"part {where}: attached message unreadable ({exc.reason})")
        return
    out.nested.append(_build_message(msg, ctx, depth + 1))


# ---------------------------------------------------------------------------
# Attachments
# ---------------------------------------------------------------------------

def _raw_filename(part: Message, defects: _Defects) -> str:
    name = part.get_filename() or ""
    if not isinstance(name, str):
        name = str(name)
    return decode_encoded_words(_to_text(name), defects)  # common though non-standard


_BIDI = set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_WINDOWS_RESERVED = re.compile(r'[<>:"|?*]')


def sanitize_filename(name: str, *, limit: int = 200, defects: _Defects | None = None) -> str:
    """Display-safe file name: last path component only, no control or
    format characters, no Windows-reserved characters, at most ``limit``
    characters with the extension kept. Bidi overrides (the "gpj.exe"
    trick) are removed and recorded as a defect, since they signal intent."""
    name = unicodedata.normalize("NFC", name)
    name = re.split(r"[\\/]", name)[-1]
    if defects is not None and any(char in _BIDI for char in name):
        defects.add(f"attachment name contained bidirectional control characters: {name.encode('unicode_escape').decode()[:120]}")
    name = "".join(char for char in name if unicodedata.category(char) not in ("Cc", "Cf"))
    name = _WINDOWS_RESERVED.sub("_", name).strip()
    if name in ("", ".", ".."):
        return ""
    if len(name) > limit:
        stem, dot, extension = name.rpartition(".")
        if dot and 0 < len(extension) <= 16:
            name = stem[:limit - len(extension) - 1] + "." + extension
        else:
            name = name[:limit]
    return name


def _store_attachment(data: bytes, filename: str, ctype: str, disposition: str, part: Message,
                      ctx: _Context, defects: _Defects) -> Attachment:
    safe_name = sanitize_filename(filename, defects=defects) or _fallback_name(ctype)
    sha256 = hashlib.sha256(data).hexdigest()
    attachment = Attachment(
        filename=safe_name,
        content_type=ctype,
        size=len(data),
        sha256=sha256,
        md5=hashlib.md5(data, usedforsecurity=False).hexdigest(),
        disposition=disposition,
        content_id=_clean_control(str(part.get("Content-ID", ""))).strip()[:500],
    )
    if ctx.attachments_dir is None:
        attachment.data = data
    else:
        attachment.path = _write_content_addressed(ctx.attachments_dir, sha256, data)
    return attachment


def _fallback_name(ctype: str) -> str:
    if ctype in _NESTED_MESSAGE_TYPES:
        return "message.eml"
    if ctype == "application/ms-tnef":
        return "winmail.dat"
    return "attachment"


def _write_content_addressed(directory: Path, sha256: str, data: bytes) -> Path:
    """Write once under the hash; a temp file + rename means readers never
    see a half-written file and concurrent workers cannot collide."""
    target = directory / sha256
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(dir=directory, prefix=".tmp-", delete=False)
    try:
        with handle:
            handle.write(data)
        os.replace(handle.name, target)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    return target
