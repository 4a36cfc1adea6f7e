"""Incidents, Inbox and Quarantine in a real browser. Above all: hostile
HTML in an email cannot run script or reach the network, with or without
the sanitizer (the sandboxed frame and its CSP hold on their own)."""
from __future__ import annotations

import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from playwright.sync_api import expect

from models import StoredMessage, db
from tests.support.certs import free_port
from tests.test_incidents_ui import add_attachment, add_incident, add_message, fresh, make_raw

pytestmark = pytest.mark.browser

# Each payload would call the canary and retitle the top page if it ran.
HOSTILE = """
<h1>Quarterly invoice</h1>
<script>top.document.title='PWNED script';fetch('{c}/script')</script>
<img src="x" onerror="top.document.title='PWNED onerror';fetch('{c}/onerror')">
<svg onload="top.document.title='PWNED svg';fetch('{c}/svg')"><circle r="4"></circle></svg>
<a id="js" href="javascript:top.document.title='PWNED link';fetch('{c}/link')">Open the invoice</a>
<a id="web" href="{c}/clicked">Pay here</a>
<meta http-equiv="refresh" content="0;url={c}/meta">
<iframe src="{c}/iframe"></iframe>
<img src="{c}/remote-image" alt="logo">
<div style="background:url({c}/css)">styled</div>
<link rel="stylesheet" href="{c}/link-css">
<object data="{c}/object"></object><embed src="{c}/embed">
<form action="{c}/form"><button id="go">Submit</button></form>
<body onload="fetch('{c}/body')">
"""


def hostile_incident(app, org, canary):
    """Payloads in the title, subject and text too: those must come out escaped."""
    inc = add_incident(org, "<img src=x onerror=\"top.document.title='PWNED title'\">")
    add_message(app, org, inc, html_body=HOSTILE.format(c=canary.url),
                subject="<script>top.document.title='PWNED subject'</script>",
                text_body=f"<img src='{canary.url}/text' onerror=\"top.document.title='PWNED text'\">")
    return inc


class Canary:
    """An HTTP server on another port that records every request it gets."""

    def __init__(self):
        hits = self.hits = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                hits.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(b"hit")

            do_POST = do_GET

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def canary():
    c = Canary()
    yield c
    c.server.shutdown()


@pytest.fixture
def live_app(live_server):
    """Stands in for the live server's app where rows and files are written."""
    class LiveApp:
        config = live_server.app_config
    return LiveApp


def open_and_try_everything(page, inc):
    page.goto(f"/incidents/{inc.number}")
    title = page.title()
    frame = page.frame_locator("iframe.email-frame")
    expect(frame.get_by_role("heading", name="Quarterly invoice")).to_be_visible()
    for link in ("Open the invoice", "Pay here"):
        if frame.get_by_text(link).count():
            frame.get_by_text(link).click()
    if frame.locator("#go").count():
        frame.locator("#go").click()
    page.wait_for_timeout(700)  # time for anything that would run
    return title


def assert_nothing_ran(page, canary, title):
    assert canary.hits == []
    assert page.title() == title and not title.startswith("PWNED")
    sandbox = page.locator("iframe.email-frame").get_attribute("sandbox")
    assert sandbox == ""  # sandboxed, with no allow-scripts / allow-same-origin
    assert page.locator("main script").count() == 0


def test_hostile_html_cannot_run_script(admin_page, live_app, canary):
    page = admin_page
    inc = hostile_incident(live_app, page.org, canary)
    title = open_and_try_everything(page, inc)
    assert_nothing_ran(page, canary, title)
    assert "<script>top.document.title='PWNED subject'</script>" in page.get_by_role("main").inner_text()
    # Remote images on request: https only, so this http canary still gets nothing.
    with page.expect_response(lambda r: "body.html?remote=1" in r.url):
        page.get_by_role("link", name="Show remote images").click()
    page.wait_for_timeout(700)
    assert_nothing_ran(page, canary, title)
    assert page.js_errors == []


def test_without_the_sanitizer_the_frame_still_runs_nothing(admin_page, live_app, canary, monkeypatch):
    """The live server runs in this process: take the sanitizer away."""
    monkeypatch.setattr("ingest.sanitize.sanitize_html", lambda html, allow_remote_images=False: html)
    page = admin_page
    inc = hostile_incident(live_app, page.org, canary)
    title = open_and_try_everything(page, inc)
    assert_nothing_ran(page, canary, title)


def test_downloads_and_close_reopen_on_the_incident_page(admin_page, live_app):
    page = admin_page
    raw = make_raw("Download me")
    inc = add_incident(page.org, "Downloads")
    msg = add_message(live_app, page.org, inc, raw=raw)
    add_attachment(live_app, msg, b"<script>alert(1)</script>", "../invoice.html")
    page.goto(f"/incidents/{inc.number}")
    page.evaluate("window.__same_page = true")
    page.get_by_role("button", name="Close incident").click()
    expect(page.locator("#incident-status .badge")).to_have_text("Closed")
    page.get_by_role("button", name="Reopen incident").click()
    expect(page.locator("#incident-status .badge")).to_have_text("Open")
    with page.expect_download() as info:
        page.get_by_role("link", name="Download invoice.html").click()
    assert info.value.suggested_filename == "invoice.html"
    assert open(info.value.path(), "rb").read() == b"<script>alert(1)</script>"
    with page.expect_download() as info:
        page.get_by_role("link", name="Download raw email (.eml)").click()
    assert info.value.suggested_filename == f"INC-{inc.number}-message-{msg.id}.eml"
    assert open(info.value.path(), "rb").read() == raw
    assert page.url.endswith(f"/incidents/{inc.number}")  # nothing opened in the page
    assert page.evaluate("window.__same_page") is True  # no reloads


def test_inbox_create_incident_and_add_to_case(admin_page, live_app):
    page = admin_page
    case = add_incident(page.org, "Existing case")
    first = add_message(live_app, page.org, subject="Make a new incident")
    second = add_message(live_app, page.org, subject="Belongs to the case")
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Inbox").click()
    row = page.get_by_role("row", name=re.compile("Make a new incident"))
    row.get_by_role("button", name="Create incident").click()
    expect(row.get_by_role("status")).to_contain_text(re.compile(r"Created INC-\d+"))
    row = page.get_by_role("row", name=re.compile("Belongs to the case"))
    row.get_by_label("Case number").fill("INC-99999")
    row.get_by_role("button", name="Add to case").click()
    expect(row.locator(".field-error")).to_have_text("There is no case INC-99999 in this organization.")
    row.get_by_label("Case number").fill(case.tag)
    row.get_by_role("button", name="Add to case").click()
    expect(row.get_by_role("status")).to_have_text(f"Added to {case.tag}")
    assert fresh(StoredMessage, first).incident.title == "Make a new incident"
    assert fresh(StoredMessage, second).incident_id == case.id
    row.get_by_role("link", name=case.tag).click()
    expect(page.get_by_role("heading", name="Belongs to the case")).to_be_visible()
    assert page.js_errors == []


def test_quarantine_reprocess_in_place(admin_page, live_app):
    page = admin_page
    msg = add_message(live_app, page.org, raw=make_raw("Parses now"), state="quarantined", attempts=3,
                      subject="", route="", error="Processing failed 3 times: a bug since fixed")
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Quarantine").click()
    row = page.locator(f"#quarantine-{msg.id}")
    expect(row).to_contain_text("Processing failed 3 times: a bug since fixed")
    row.get_by_role("button", name="Reprocess").click()
    # The real worker.py picks it up; the row polls until it is done.
    expect(row.get_by_role("status")).to_contain_text(re.compile(r"Processed: now\s+in INC-\d+"), timeout=15000)
    with db.connection_context():
        assert StoredMessage.get_by_id(msg.id).state == "processed"
