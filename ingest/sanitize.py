"""Sanitize hostile email HTML for display.

This is the first of two layers. The caller must show the result inside
``<iframe sandbox srcdoc="…">`` (no ``allow-scripts``, no ``allow-same-origin``;
add ``allow-popups allow-popups-to-escape-sandbox`` only if links should open)
served with a strict CSP such as ``default-src 'none'; img-src data:;
style-src 'unsafe-inline'``. If this sanitizer ever lets something through,
the sandbox and the CSP still stop scripts, forms, and remote loads.

Two things here are about denial of service rather than XSS: html5ever (the
parser inside nh3) and the stdlib ``html.parser`` both take quadratic time on
some hostile input (thousands of nested ``<div>``s; runs of ``<a<a<a``).
``html_is_tractable`` is a cheap linear check that every caller runs before
handing HTML to a real parser; intractable HTML is shown as plain text.
"""
from __future__ import annotations

import html as htmllib
import re
from collections import defaultdict

import nh3

# HTML larger than this is cut before parsing; real mail bodies are far
# smaller, and the worst-case parse cost grows with size.
MAX_HTML_CHARS = 1_000_000
# Bounds that keep html5ever's per-token stack scans cheap (see _DepthModel).
MAX_TAGS = 50_000
MAX_DEPTH = 128

_ALLOWED_TAGS = {
    "a", "abbr", "b", "bdi", "bdo", "big", "blockquote", "br", "caption", "center",
    "cite", "code", "col", "colgroup", "dd", "del", "dfn", "div", "dl", "dt", "em",
    "font", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "i", "img", "ins", "kbd", "li",
    "mark", "ol", "p", "pre", "q", "s", "samp", "small", "span", "strike", "strong",
    "sub", "sup", "table", "tbody", "td", "tfoot", "th", "thead", "tr", "tt", "u",
    "ul", "var", "wbr",
}
# Dropped together with everything inside them: their content is code or
# chrome, never message text.
_DROP_WITH_CONTENT = {
    "script", "style", "title", "template", "noscript", "iframe", "object",
    "embed", "svg", "math", "select", "textarea", "frameset", "noembed", "noframes",
}
# Presentational attributes only. No style (CSS can load remote resources and
# overlay the UI), no class/id (could target the host page's CSS), no
# background (a remote load).
_ALLOWED_ATTRIBUTES = {
    "*": {"title", "lang", "dir", "align", "valign"},
    "a": {"href", "name"},
    "img": {"src", "alt", "width", "height", "border"},
    "font": {"color", "face", "size"},
    "table": {"width", "border", "cellpadding", "cellspacing", "bgcolor"},
    "td": {"width", "height", "colspan", "rowspan", "bgcolor", "nowrap"},
    "th": {"width", "height", "colspan", "rowspan", "bgcolor", "nowrap"},
    "tr": {"bgcolor"},
    "col": {"span", "width"},
    "colgroup": {"span", "width"},
    "ol": {"start", "type"},
    "ul": {"type"},
    "li": {"value", "type"},
}
_URL_SCHEMES = {"http", "https", "mailto", "data"}
_INLINE_IMAGE = re.compile(r"data:image/(?:png|gif|jpeg|jpg|webp|bmp);", re.I)
_REMOTE = re.compile(r"\s*(?:https?:|//|\\\\)", re.I)


def sanitize_html(html: str, *, allow_remote_images: bool = False) -> str:
    """Return markup that is safe to render from hostile email HTML.

    Links keep their href (http, https, mailto, in-page #anchors) and get
    ``target="_blank" rel="noopener noreferrer nofollow"``. Remote images are
    blocked by default: the ``<img>`` stays (with its alt text and size, so the
    layout holds) but ``src`` becomes ``data-blocked-src``, which loads nothing
    and lets the UI say "N remote images blocked". ``cid:`` inline images are
    dropped for now (alt text remains).
    """
    html = (html or "")[:MAX_HTML_CHARS]
    if not html_is_tractable(html):
        return _as_plain_text(html)
    cleaned = nh3.clean(
        html,
        tags=_ALLOWED_TAGS,
        clean_content_tags=_DROP_WITH_CONTENT,
        attributes=_ALLOWED_ATTRIBUTES,
        url_schemes=_URL_SCHEMES,
        link_rel="noopener noreferrer nofollow",
        set_tag_attribute_values={"a": {"target": "_blank"}},
        strip_comments=True,
        attribute_filter=_filter_attribute,
    )
    return cleaned if allow_remote_images else _block_remote_images(cleaned)


def _filter_attribute(tag: str, attr: str, value: str) -> str | None:
    """Per-attribute rules nh3's allowlists cannot express."""
    if attr == "href":
        # Relative links have no meaning in a mail body and would resolve
        # against the app; keep only absolute http(s)/mailto and #anchors.
        v = value.strip().lower()
        if v.startswith(("http:", "https:", "mailto:", "#")):
            return value
        return None
    if tag == "img" and attr == "src":
        if _INLINE_IMAGE.match(value.strip()):
            return value  # inline raster image: no request, no script
        if _REMOTE.match(value):
            return value  # decided by _block_remote_images
        return None  # cid:, relative, svg data: and anything else
    return value


# nh3 serializes canonically: every attribute is written as name="value"
# with " escaped as &quot;, so these patterns match its output exactly. They
# are only ever applied to nh3 output, never to input HTML.
_IMG_TAG = re.compile(r'<img((?: [^\s="/>]+="[^"]*")*)>')
_SRC_ATTR = re.compile(r' src="([^"]*)"')


def _block_remote_images(cleaned: str) -> str:
    def rewrite(tag: re.Match) -> str:
        def rename(attr: re.Match) -> str:
            if _REMOTE.match(htmllib.unescape(attr.group(1))):
                return f' data-blocked-src="{attr.group(1)}"'
            return attr.group(0)
        return "<img" + _SRC_ATTR.sub(rename, tag.group(1)) + ">"
    return _IMG_TAG.sub(rewrite, cleaned)


def _as_plain_text(html: str) -> str:
    """Fallback rendering for HTML too hostile to parse: escaped text only."""
    text = _SPACES.sub(" ", html_to_text_roughly(html))
    body = htmllib.escape(text).replace("\n", "<br>")
    return "<p><em>[This HTML was too deeply nested to display; showing its text.]</em></p><p>" + body + "</p>"


_ANY_TAG = re.compile(r"<[^<>]*>")  # [^<>], not [^>]: stays linear on "<<<<"
_SPACES = re.compile(r"[ \t]{2,}")


def html_to_text_roughly(html: str) -> str:
    """Text of HTML without a parser: linear, lossy, for the fallback path only."""
    return htmllib.unescape(_ANY_TAG.sub(" ", html))


# ---------------------------------------------------------------------------
# Tractability guard
# ---------------------------------------------------------------------------

_TAG_TOKEN = re.compile(r"<(/?)([A-Za-z][^\t\n\f\r />]*)")


def html_is_tractable(html: str, *, max_tags: int = MAX_TAGS, max_depth: int = MAX_DEPTH) -> bool:
    """True when ``html`` is small and shallow enough for html5ever/html.parser.

    html5ever's tree builder scans the stack of open elements for many tokens,
    so its cost is roughly tokens x depth; both are bounded here. Depth comes
    from ``_DepthModel``, which errs towards over-estimating, so odd but
    harmless HTML may be declared intractable (and shown as text), but hostile
    HTML cannot slip under the bound.
    """
    if len(_TAG_TOKEN.findall(html)) > max_tags:  # counted in C before the slower walk
        return False
    model = _DepthModel()
    for is_end, name in _tag_events(html):
        if is_end:
            model.end_tag(name)
        else:
            model.start_tag(name)
        if model.live > max_depth:
            return False
    return True


# The tokenizer below follows html5ever's (WHATWG) data-state rules for where
# tags, comments and attribute values begin and end, because an end tag seen
# where the browser sees text (inside a comment or a quoted attribute) would
# make the depth estimate too low. Where the rules depend on tree state it
# cannot see (raw-text elements, CDATA), it reports start tags but drops end
# tags: that can only raise the estimate.
_MARKUP = re.compile(
    r"<!--(?:>|->|[\s\S]*?(?:-->|--!>|\Z))"  # comment, with the abrupt forms
    r"|<!\[CDATA\[[^>]*>?"  # CDATA, or a bogus comment outside foreign content
    r"|<[!?][^>]*>?|</(?![A-Za-z])[^>]*>?"  # doctype and other bogus comments
    r"|<(/?)([A-Za-z][^\t\n\f\r />]*)"  # a tag: the name only, the rest below
)
_TAG_TAIL = re.compile(
    r"(?:[\t\n\f\r /]+"
    r"|[^\t\n\f\r />][^\t\n\f\r />=]*"
    r"(?:[\t\n\f\r ]*=[\t\n\f\r ]*(?:\"[^\"]*\"?|'[^']*'?|[^\t\n\f\r >]*))?)*>?"
)
# Elements whose content html5ever reads as text (in HTML content) up to the
# matching end tag. script and plaintext never reliably end, so after them
# end tags are ignored for the rest of the document.
_RAW_TEXT = {"style", "textarea", "title", "xmp", "iframe", "noembed", "noframes", "noscript"}
_RAW_FOREVER = {"script", "plaintext"}


def _tag_events(html: str):
    """Yield (is_end_tag, lower-case name) in document order."""
    position = 0
    while True:
        match = _MARKUP.search(html, position)
        if match is None:
            return
        if match.group(2) is None:  # comment, doctype, bogus comment
            position = match.end()
            if match.group(0).startswith("<![CDATA["):
                position = yield from _start_tags_until(html, position, re.compile(r"\]\]>"))
            continue
        is_end, name = bool(match.group(1)), match.group(2).lower()
        position = _TAG_TAIL.match(html, match.end()).end()
        yield is_end, name
        if not is_end and name in _RAW_FOREVER:
            yield from _start_tags_until(html, position, None)
            return
        if not is_end and name in _RAW_TEXT:
            end_tag = re.compile(rf"</{re.escape(name)}(?=[\t\n\f\r />]|\Z)", re.I)
            position = yield from _start_tags_until(html, position, end_tag)


def _start_tags_until(html: str, position: int, terminator: re.Pattern | None):
    """Start tags up to ``terminator`` (end of input if None); returns the
    position of the terminator so normal tokenizing resumes there."""
    found = terminator.search(html, position) if terminator else None
    stop = found.start() if found else len(html)
    for match in _TAG_TOKEN.finditer(html, position, stop):
        if not match.group(1):
            yield False, match.group(2).lower()
    return stop


_VOID = {
    "area", "base", "basefont", "bgsound", "br", "col", "embed", "frame", "hr", "image",
    "img", "input", "keygen", "link", "meta", "param", "source", "track", "wbr",
}
_MERGED = {"html", "head", "body", "frameset"}  # never add depth beyond the first
_FORMATTING = {"a", "b", "big", "code", "em", "font", "i", "nobr", "s", "small", "strike", "strong", "tt", "u"}
_MARKERS = {"applet", "caption", "marquee", "object", "td", "th", "template"}
# Elements that stop html5ever's "in scope" searches (plus svg/math, which
# hold foreign content): end tags never close anything below them.
_BARRIERS = _MARKERS | {"table", "button", "select", "svg", "math"}
_HEADINGS = {"h1", "h2", "h3", "h4", "h5", "h6"}
_P_CLOSERS = _HEADINGS | {
    "address", "article", "aside", "blockquote", "center", "details", "dialog", "dir",
    "div", "dl", "fieldset", "figcaption", "figure", "footer", "form", "header", "hgroup",
    "hr", "listing", "main", "menu", "nav", "ol", "p", "pre", "section", "summary", "ul", "xmp",
}
_SPECIAL = _BARRIERS | _P_CLOSERS | _VOID | {
    "dd", "dt", "frameset", "head", "html", "body", "iframe", "li", "noembed", "noframes",
    "noscript", "plaintext", "script", "style", "tbody", "textarea", "tfoot", "thead",
    "title", "tr", "search", "colgroup",
}
_TABLE_PARTS = {"tr", "tbody", "thead", "tfoot"}


class _DepthModel:
    """An upper bound of html5ever's stack of open elements, built from tag names.

    It pops only where the HTML5 tree-building rules certainly pop (matching
    end tags with nothing in scope in the way, the implied closes of p, li,
    dd/dt, cells and rows) and keeps popped formatting elements, which
    html5ever reconstructs. Where a rule is uncertain it keeps elements open,
    so the estimate only errs upwards. Everything is O(1) amortized per tag.
    """

    def __init__(self) -> None:
        self.stack: list[str] = []
        self.live = 0
        self.where: dict[str, list[int]] = defaultdict(list)
        self.barriers: list[int] = []
        self.specials: list[int] = []
        self.lists: list[int] = []  # ul/ol: the extra boundary for li
        self.foreign = 0

    # -- primitives ---------------------------------------------------------
    def _push(self, name: str) -> None:
        index = len(self.stack)
        self.stack.append(name)
        self.where[name].append(index)
        self.live += 1
        if name in _BARRIERS:
            self.barriers.append(index)
        if name in _SPECIAL:
            self.specials.append(index)
        if name in ("ul", "ol"):
            self.lists.append(index)
        if name in ("svg", "math"):
            self.foreign += 1

    def _pop(self) -> str:
        name = self.stack.pop()
        index = len(self.stack)
        self.where[name].pop()
        self.live -= 1
        if self.barriers and self.barriers[-1] == index:
            self.barriers.pop()
        if self.specials and self.specials[-1] == index:
            self.specials.pop()
        if self.lists and self.lists[-1] == index:
            self.lists.pop()
        if name in ("svg", "math"):
            self.foreign -= 1
        return name

    def _pop_to(self, index: int, *, keep_target_formatting: bool = False) -> None:
        """Pop down to and including ``index``; reopen formatting elements."""
        reopen: list[str] = []
        while len(self.stack) > index:
            name = self._pop()
            last = len(self.stack) == index
            if name in _MARKERS:
                reopen.clear()  # a marker clears the formatting list above it
            elif name in _FORMATTING and (not last or keep_target_formatting):
                reopen.append(name)
        for name in reversed(reopen):
            self._push(name)

    def _floor(self) -> int:
        return self.barriers[-1] if self.barriers else -1

    def _topmost(self, name: str) -> int:
        found = self.where.get(name)
        return found[-1] if found else -1

    def _head(self) -> str | None:
        return self.stack[self.barriers[-1]] if self.barriers else None

    def _top(self) -> str | None:
        return self.stack[-1] if self.stack else None

    # -- tokens -------------------------------------------------------------
    def start_tag(self, name: str) -> None:
        if name in _MERGED:
            return
        if name in _VOID and not self.foreign:
            return
        self._implied_closes(name)
        self._push(name)

    def _implied_closes(self, name: str) -> None:
        if name in _P_CLOSERS:
            self._close_in_scope("p")
        if name in _HEADINGS and self._top() in _HEADINGS:
            self._pop()
        elif name == "li":
            self._close_list_item({"li"})
        elif name in ("dd", "dt"):
            self._close_list_item({"dd", "dt"})
        elif name in ("option", "optgroup") and self._top() == "option":
            self._pop()
        elif name in ("a", "nobr"):
            self._end_formatting(name)
        elif name in ("td", "th") or name in _TABLE_PARTS:
            # Only inside a table: in body content html5ever ignores these
            # tags (and the model, pushing them, merely over-counts).
            self._close_cell()
            if name in _TABLE_PARTS and self._head() == "table":
                self._close_in_scope(name)
        elif name == "table" and self._top() in _TABLE_PARTS | {"table"}:
            self._close_head("table")
        elif name in ("select", "button"):
            self._close_head(name)

    def end_tag(self, name: str) -> None:
        if name in _MERGED or name in _VOID:
            return
        if name == "table" or name in _TABLE_PARTS:
            self._close_cell_for(name)
        if name in _TABLE_PARTS:
            if self._head() == "table":  # elsewhere html5ever ignores them
                self._close_in_scope(name)
        elif name in _BARRIERS:
            self._close_head(name)
        elif name in _FORMATTING:
            self._end_formatting(name)
        elif name in _HEADINGS:
            tops = [self._topmost(h) for h in _HEADINGS]
            best = max(tops)
            if best > self._floor():
                self._pop_to(best)
        elif name == "li":
            index = self._topmost("li")
            if index > self._floor() and (not self.lists or self.lists[-1] < index):
                self._pop_to(index)
        elif name in _SPECIAL:
            self._close_in_scope(name)
        else:
            # "Any other end tag": stops at the first special element.
            index = self._topmost(name)
            if index > self._floor() and (not self.specials or self.specials[-1] <= index):
                self._pop_to(index)

    # -- rules --------------------------------------------------------------
    def _close_in_scope(self, name: str) -> None:
        index = self._topmost(name)
        if index > self._floor():
            self._pop_to(index)

    def _close_head(self, name: str) -> None:
        if self._head() == name:
            self._pop_to(self.barriers[-1])

    def _close_cell(self) -> None:
        if self._head() in ("td", "th"):
            self._pop_to(self.barriers[-1])

    def _close_cell_for(self, name: str) -> None:
        # </tr>, </table>… inside a cell close the cell first, but only when
        # the element really is in table scope below it.
        if self._head() not in ("td", "th") or len(self.barriers) < 2:
            return
        below = self.barriers[-2]
        if self.stack[below] == "table" and (name == "table" or self._topmost(name) > below):
            self._pop_to(self.barriers[-1])

    def _close_list_item(self, names: set[str]) -> None:
        index = max(self._topmost(n) for n in names)
        if index <= self._floor() or (self.lists and self.lists[-1] > index):
            return
        # html5ever stops at special elements other than address/div/p; look
        # at a few and treat anything longer as "stopped" (over-estimate).
        for checked, special in enumerate(reversed(self.specials)):
            if special <= index:
                break
            if checked > 8 or self.stack[special] not in ("address", "div", "p"):
                return
        self._pop_to(index)

    def _end_formatting(self, name: str) -> None:
        index = self._topmost(name)
        if index <= self._floor():
            return
        if self.specials and self.specials[-1] > index:
            # With a "furthest block" the adoption agency re-parents instead
            # of shrinking the stack: count it as still open.
            return
        self._pop_to(index)
