"""Split a message into its MIME tree fast, exactly as the stdlib would.

Why not just ``email.parser.BytesParser``: its feedparser reads the whole
message line by line in Python. A 5 MB base64 attachment is some 70,000
``readline()`` calls and boundary regex matches, and the parser keeps the
message as one str plus a str copy of every part: about 9x the message size
in memory and most of the time spent processing an email.

Here part boundaries are found with ``bytes.find`` (C speed), leaf bodies are
``memoryview`` slices of the caller's bytes (no copies), and every header
block is still parsed by the stdlib itself, so header values and header
defects are the stdlib's own. The tree is the one ``BytesParser(policy=
compat32)`` builds: the same ``Message`` objects, headers, preambles,
epilogues and defects; only leaf payloads are bytes-like instead of str.

It accepts only input it can split *exactly* like the feedparser (see
``tests/test_mimesplit.py``, which compares the two). Anything unusual makes
``split`` return None and the caller falls back to the stdlib parser, which
records the defects the analyst should see: a bare CR line end where lines
matter (headers, boundary lines; inside a body it changes nothing), a multipart
without a usable boundary or with a transfer encoding, a missing start or
close boundary, doubled boundary lines, a header block ended by a non-header
line, an envelope ("From ") line at the end of a header block,
multipart/digest (its parts default to message/rfc822),
message/delivery-status, nesting deeper than ``MAX_DEPTH``.
"""
from __future__ import annotations

import re
from email import policy
from email.message import Message
from email.parser import BytesHeaderParser

MAX_DEPTH = 40

# The feedparser's headerRE, for bytes and without "^" (match() anchors at pos).
_HEADER_LINE = re.compile(rb"From |[\x21-\x39\x3b-\x7e]*:|[\t ]")
_EOL = re.compile(r"(\r\n|\r|\n)\Z")
# What may follow "--boundary" or "--boundary--" on a delimiter line: the
# feedparser's `[ \t]*(\r\n|\r|\n)?$` without compiling a regex per boundary.
_LINE_ENDS = (b"", b"\n", b"\r\n", b"\r")


class _Unusual(Exception):
    """The stdlib parser must handle this input (it may record defects)."""


def split(raw: bytes) -> Message | None:
    """The stdlib's compat32 tree for ``raw``, or None when only the stdlib
    parser can say what it is."""
    try:
        msg, _last = _Splitter(raw).part(0, len(raw), 0)
    except _Unusual:
        return None
    return msg


class _Splitter:
    def __init__(self, raw: bytes):
        self.raw = raw
        self.view = memoryview(raw)

    def line_end(self, pos: int, end: int) -> int:
        i = self.raw.find(b"\n", pos, end)
        return end if i < 0 else i + 1

    def part(self, start: int, end: int, depth: int) -> tuple[Message, Message]:
        """Parse [start, end) as one message or part. ``end`` is where the
        feedparser would see a false EOF (an enclosing boundary line, or the
        end of the input). Returns the message and the last message created
        inside it, whose trailing line break belongs to the next boundary."""
        if depth > MAX_DEPTH:
            raise _Unusual
        raw = self.raw
        pos, body = start, end
        while pos < end:
            if raw[pos] in (10, 13):  # the blank line that ends the headers
                body = self.line_end(pos, end)
                break
            if not _HEADER_LINE.match(raw, pos):
                raise _Unusual  # MissingHeaderBodySeparatorDefect
            pos = self.line_end(pos, end)
        block = raw[start:body]
        if _has_lone_cr(block):
            raise _Unusual  # the feedparser would end lines (perhaps the headers) there
        msg = BytesHeaderParser(policy=policy.compat32).parsebytes(block)
        if msg._payload:
            raise _Unusual  # a trailing "From " line was pushed back into the body
        ctype = msg.get_content_type()
        maintype = ctype.partition("/")[0]
        if ctype in ("message/delivery-status", "multipart/digest"):
            raise _Unusual
        if maintype == "message":
            inner, last = self.part(body, end, depth + 1)
            msg._payload = [inner]
            return msg, last
        if maintype == "multipart":
            self.multipart(msg, body, end, depth)
            return msg, msg
        msg._payload = self.view[body:end]
        return msg, msg

    def multipart(self, msg: Message, body: int, end: int, depth: int) -> None:
        boundary = msg.get_boundary()
        if boundary is None:
            raise _Unusual
        if str(msg.get("content-transfer-encoding", "8bit")).lower() not in ("7bit", "8bit", "binary"):
            raise _Unusual
        try:
            separator = ("--" + boundary).encode("ascii", "surrogateescape")
        except UnicodeEncodeError:
            raise _Unusual from None  # an RFC 2231 boundary no ASCII line can match
        found = self.delimiter(separator, body, end)
        if found is None or found[2]:
            raise _Unusual  # StartBoundaryNotFoundDefect
        at, line_end, _close = found
        if at > body:  # RFC 2046: the preamble's last line break belongs to the boundary
            msg.preamble = _strip_eol(self.raw[body:at].decode("ascii", "surrogateescape"))
        msg._payload = []
        while True:
            if line_end < end and self.raw.startswith(separator, line_end) and \
                    self.delimiter_line(separator, line_end, end)[0]:
                raise _Unusual  # doubled boundary lines
            found = self.delimiter(separator, line_end, end)
            part_end = found[0] if found else end
            sub, last = self.part(line_end, part_end, depth + 1)
            _strip_last_eol(last)
            msg._payload.append(sub)
            if found is None:
                raise _Unusual  # CloseBoundaryNotFoundDefect
            at, line_end, close = found
            if close:
                msg.epilogue = self.raw[line_end:end].decode("ascii", "surrogateescape")
                return

    def delimiter(self, separator: bytes, lo: int, hi: int):
        """(start, end of line, is close delimiter) of the first boundary line
        in [lo, hi), or None."""
        raw = self.raw
        at = raw.find(separator, lo, hi)
        while at >= 0:
            before = raw[at - 1] if at else 10
            if before == 13:
                raise _Unusual  # after a lone CR: a line start for the feedparser only
            if before == 10:
                is_delimiter, close, line_end = self.delimiter_line(separator, at, hi)
                if is_delimiter:
                    return at, line_end, close
            at = raw.find(separator, at + 1, hi)
        return None

    def delimiter_line(self, separator: bytes, at: int, hi: int) -> tuple[bool, bool, int]:
        """Whether the line at ``at`` (which starts with the separator) is a
        boundary line, whether it closes, and where it ends."""
        line_end = self.line_end(at, hi)
        rest = self.raw[at + len(separator):line_end]
        if _has_lone_cr(rest):
            raise _Unusual  # the feedparser would cut this line short
        close = rest.startswith(b"--")
        return (rest[2:] if close else rest).lstrip(b" \t") in _LINE_ENDS, close, line_end


def _has_lone_cr(data: bytes) -> bool:
    return data.count(b"\r") != data.count(b"\r\n")


def _strip_eol(text: str) -> str:
    match = _EOL.search(text)
    return text[:-len(match.group(0))] if match else text


def _strip_last_eol(last: Message) -> None:
    """The feedparser gives the line break before a boundary to the boundary:
    it comes off the last part's payload, or off a nested multipart's
    epilogue (an empty epilogue becomes None)."""
    if last.get_content_maintype() == "multipart":
        if last.epilogue == "":
            last.epilogue = None
        elif last.epilogue is not None:
            last.epilogue = _strip_eol(last.epilogue)
        return
    payload = last._payload
    if isinstance(payload, memoryview) and len(payload):
        if payload[-1] == 10:
            cut = 2 if len(payload) >= 2 and payload[-2] == 13 else 1
            last._payload = payload[:-cut]
        elif payload[-1] == 13:
            last._payload = payload[:-1]
