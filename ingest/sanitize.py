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
MAX_TAGS = 30_000
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
    return "<p><em>[This HTML is too large or too deeply nested to display; showing its text.]</em></p><p>" + body + "</p>"


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
    if html.count("<") <= min(max_depth, max_tags) and "template" not in html.lower():
        return True  # the model pushes at most one element per tag: too few tags to get deep
    if len(_TAG_TOKEN.findall(html)) > max_tags:  # counted in C before the slower walk
        return False
    model = _DepthModel()
    for is_end, name, plain in _tag_events(html):
        if name == "template":
            # Template contents switch html5ever into insertion modes with
            # their own super-linear paths; mail has no use for templates.
            return False
        if is_end:
            model.end_tag(name)
        else:
            model.start_tag(name, certain=plain)
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
    """Yield (is_end_tag, lower-case name, outside raw text) in document order."""
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
        yield is_end, name, True
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
            yield False, match.group(2).lower(), False
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
_TABLE_TAGS = _TABLE_PARTS | {"td", "th", "caption", "table", "col", "colgroup"}


class _DepthModel:
    """An upper bound of html5ever's stack of open elements, built from tags.

    Every element is pushed, but marked *certain* only where html5ever
    surely pushes it too (ordinary content; not inside svg/math or select,
    not raw text, not a table part outside a table, not a reopened
    formatting element). Pops happen only where the HTML5 tree-building
    rules surely pop, anchored on a certain element with nothing that might
    be a scope boundary in the way. Everything uncertain therefore errs
    towards a deeper stack. O(1) amortized per tag.
    """

    def __init__(self) -> None:
        self.stack: list[str] = []
        self.certain: list[bool] = []
        self.live = 0
        self.where: dict[str, list[int]] = defaultdict(list)
        self.barriers: list[int] = []
        self.specials: list[int] = []
        self.lists: list[int] = []  # ul/ol: the extra boundary for li
        self.foreign = 0
        self.forms_open = False

    # -- primitives ---------------------------------------------------------
    def _push(self, name: str, certain: bool) -> None:
        index = len(self.stack)
        self.stack.append(name)
        self.certain.append(certain)
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
        self.certain.pop()
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

    def _pop_to(self, index: int) -> None:
        """Pop down to and including ``index``; formatting elements popped on
        the way come back (html5ever reconstructs them), as uncertain."""
        reopen: list[str] = []
        while len(self.stack) > index:
            name = self._pop()
            if name in _MARKERS:
                reopen.clear()  # a marker clears the formatting list above it
            elif name in _FORMATTING and len(self.stack) > index:
                reopen.append(name)
        for name in reversed(reopen):
            self._push(name, certain=False)

    def _floor(self) -> int:
        return self.barriers[-1] if self.barriers else -1

    def _anchor(self, name: str) -> int:
        """Index of the topmost ``name`` if html5ever surely has it open and
        no scope boundary lies above it; else -1."""
        found = self.where.get(name)
        if not found:
            return -1
        index = found[-1]
        return index if index > self._floor() and self.certain[index] else -1

    def _head(self) -> str | None:
        """The topmost scope boundary, if html5ever surely has it."""
        if self.barriers and self.certain[self.barriers[-1]]:
            return self.stack[self.barriers[-1]]
        return None

    def _top(self) -> str | None:
        return self.stack[-1] if self.stack and self.certain[-1] else None

    def _plain_context(self) -> bool:
        """Ordinary HTML content, where html5ever's rules are predictable."""
        return not self.foreign and self._head() != "select" and not (
            self.barriers and not self.certain[self.barriers[-1]])

    # -- tokens -------------------------------------------------------------
    def start_tag(self, name: str, *, certain: bool = True) -> None:
        if name in _MERGED:
            return
        if name in _VOID and not self.foreign:
            return
        certain = certain and self._plain_context()
        if certain:
            if name in _TABLE_TAGS and name != "table" and self._head() not in ("table", "td", "th", "caption"):
                return  # in body content html5ever drops table parts entirely
            certain = self._implied_closes(name)
        self._push(name, certain)

    def _implied_closes(self, name: str) -> bool:
        """Apply the pops this start tag surely causes; False when html5ever
        might ignore or re-route the tag (so it must not anchor later pops)."""
        if name in _P_CLOSERS:
            self._close_to(self._anchor("p"))
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
        elif name in _TABLE_TAGS:
            return self._table_start(name)
        elif name in ("button", "select") and self._head() == name:
            self._pop_to(self.barriers[-1])
        elif name == "form":
            # Ignored while another form is open; its end tag only removes
            # the form itself, so forms never anchor anything.
            return False
        return name != "image"

    def _table_start(self, name: str) -> bool:
        if name == "table":
            if self._head() == "table" and self._top() in _TABLE_PARTS | {"table"}:
                self._pop_to(self.barriers[-1])  # <table> directly in a table closes it
            return True
        if self._head() in ("td", "th", "caption"):
            self._pop_to(self.barriers[-1])  # a new cell, row or section closes the cell
        if self._head() != "table":
            return False
        if name == "tr":
            self._close_to(self._anchor("tr"))
        elif name in ("tbody", "thead", "tfoot"):
            self._close_to(max(self._anchor(n) for n in ("tbody", "thead", "tfoot")))
        return True

    def end_tag(self, name: str) -> None:
        if name in _MERGED or name in _VOID or name == "form":
            return
        if name in _TABLE_TAGS:
            self._table_end(name)
        elif name in _BARRIERS:
            if self._head() == name:
                self._pop_to(self.barriers[-1])
        elif name in _FORMATTING:
            self._end_formatting(name)
        elif name in _HEADINGS:
            self._close_to(max(self._anchor(h) for h in _HEADINGS))
        elif name == "li":
            index = self._anchor("li")
            if not self.lists or self.lists[-1] < index:
                self._close_to(index)
        elif name in _SPECIAL:
            self._close_to(self._anchor(name))
        else:
            # "Any other end tag" stops at the first special element.
            index = self._anchor(name)
            if not self.specials or self.specials[-1] <= index:
                self._close_to(index)

    def _table_end(self, name: str) -> None:
        if name in ("td", "th", "caption", "table") and self._head() == name:
            self._pop_to(self.barriers[-1])
            return
        if name == "table" or name in _TABLE_PARTS:
            # Inside a cell, </tr> </table>… close the cell first, but only
            # when that element really is in table scope below it.
            if self._head() in ("td", "th") and len(self.barriers) >= 2:
                below = self.barriers[-2]
                if self.stack[below] == "table" and self.certain[below] and (
                        name == "table" or self._anchor_below(name, below)):
                    self._pop_to(self.barriers[-1])
            if self._head() == "table":
                if name == "table":
                    self._pop_to(self.barriers[-1])
                else:
                    self._close_to(self._anchor(name))

    def _anchor_below(self, name: str, floor: int) -> bool:
        found = self.where.get(name)
        return bool(found) and found[-1] > floor and self.certain[found[-1]]

    # -- rules --------------------------------------------------------------
    def _close_to(self, index: int) -> None:
        if index >= 0:
            self._pop_to(index)

    def _close_list_item(self, names: set[str]) -> None:
        index = max(self._anchor(n) for n in names)
        if index < 0 or (self.lists and self.lists[-1] > index):
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
        index = self._anchor(name)
        if index < 0:
            return
        if self.specials and self.specials[-1] > index:
            # With a "furthest block" the adoption agency re-parents instead
            # of shrinking the stack: count it as still open.
            return
        self._pop_to(index)
