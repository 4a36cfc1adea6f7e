"""A real browser against a real server: Playwright drives Debian's
Chromium; the app is served on a free port and a real `worker.py` process
runs the jobs, exactly as `make run` would."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support.certs import free_port
from tests.support.requires import missing, require_binary

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]


class LiveServer:
    def __init__(self, app, port: int):
        from werkzeug.serving import make_server

        self.port = port
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = make_server("127.0.0.1", self.port, app, threaded=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self):
        self._server.shutdown()


def worker_env(app_config: dict) -> dict:
    env = dict(os.environ)
    env.update({
        "INTAKE_INSTANCE": app_config["INSTANCE_PATH"], "DATABASE_URL": app_config["DATABASE_URL"],
        "REDIS_URL": app_config["REDIS_URL"], "ENCRYPTION_KEYS": app_config["ENCRYPTION_KEYS"],
        "SECRET_KEY": app_config["SECRET_KEY"], "LOG_FILE": app_config["LOG_FILE"],
        "DATA_DIR": app_config["DATA_DIR"], "BASE_URL": app_config["BASE_URL"],
    })
    return env


@pytest.fixture(scope="session")
def live_config(app_config):
    """The live server's config: BASE_URL is its real address, so the
    Grant Access redirect URI (BASE_URL + /email-oauth) leads back to it."""
    port = free_port()
    return dict(app_config, BASE_URL=f"http://127.0.0.1:{port}", LIVE_PORT=port)


@pytest.fixture(scope="module")
def worker_process(live_config):
    """A real `python worker.py` on the suite's Redis and database, for one
    test module: tests that run jobs in-process must not race it."""
    from app import create_app

    create_app(dict(live_config))  # migrations applied before the worker starts
    proc = subprocess.Popen([sys.executable, "worker.py"], cwd=ROOT, env=worker_env(live_config),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    if proc.poll() is not None:
        pytest.fail(f"worker.py exited with {proc.returncode}; see {live_config['LOG_FILE']}")
    yield proc
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def live_server(live_config, redis_url, worker_process):
    from app import create_app

    cfg = dict(live_config)
    server = LiveServer(create_app(cfg), cfg["LIVE_PORT"])
    assert server.url == cfg["BASE_URL"]
    server.app_config = cfg
    yield server
    server.stop()


@pytest.fixture(scope="session")
def chromium():
    executable = require_binary("chromium", "chromium-browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("the playwright Python package")
    pw = sync_playwright().start()
    browser = pw.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
    yield browser
    browser.close()
    pw.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.failed_call = report.failed


@pytest.fixture
def page(request, chromium, live_server, redis_conn, tmp_path_factory):
    context = chromium.new_context(base_url=live_server.url, viewport={"width": 1280, "height": 1000})
    context.set_default_timeout(15000)
    p = context.new_page()
    errors: list[str] = []
    p.on("pageerror", lambda e: errors.append(str(e)))
    p.js_errors = errors
    yield p
    if getattr(request.node, "failed_call", False):
        # What the browser showed when the test failed, to look at afterwards.
        shot = tmp_path_factory.getbasetemp() / "screenshots" / (re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name) + ".png")
        shot.parent.mkdir(exist_ok=True)
        p.screenshot(path=str(shot), full_page=True)
        print(f"Screenshot of the failure: {shot}")
    context.close()


def browser_login(page, email: str, password: str) -> None:
    page.goto("/login")
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(lambda url: "/login" not in url)


@pytest.fixture
def admin_page(page, make_admin):
    email, password, org = make_admin()
    browser_login(page, email, password)
    page.org = org
    return page
