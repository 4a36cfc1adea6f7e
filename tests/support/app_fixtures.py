"""The app, its clients, users and a burst worker: what most tests need."""
from __future__ import annotations

import re
import uuid

import pytest
from cryptography.fernet import Fernet

TEST_KEY = Fernet.generate_key().decode()


@pytest.fixture(scope="session")
def instance_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("instance")


def empty_database(url: str) -> None:
    """TEST_DATABASE_URL belongs to the suite: each session starts with it
    empty, as SQLite does with its new file (tests count rows globally)."""
    from playhouse.db_url import connect

    database = connect(url, unquote_password=True)
    with database.connection_context():
        tables = database.get_tables()
        if tables and url.startswith("postgres"):
            database.execute_sql("DROP TABLE " + ", ".join(f'"{t}"' for t in tables) + " CASCADE")
        else:
            for t in tables:  # e.g. a sqlite:/// file (no foreign keys enforced on this connection)
                database.execute_sql(f'DROP TABLE IF EXISTS "{t}"')


@pytest.fixture(scope="session")
def app_config(instance_dir, redis_url):
    import os

    if os.environ.get("TEST_DATABASE_URL"):
        empty_database(os.environ["TEST_DATABASE_URL"])
    return {
        "TESTING": True,
        "INSTANCE_PATH": str(instance_dir),
        "DATABASE_URL": os.environ.get("TEST_DATABASE_URL") or f"sqlite:///{instance_dir / 'intake.db'}",
        "REDIS_URL": redis_url,
        "ENCRYPTION_KEYS": TEST_KEY,
        "SECRET_KEY": "test-secret-key-not-for-production",
        "LOG_FILE": str(instance_dir / "intake.log"),
        "DATA_DIR": str(instance_dir / "data"),
        "BASE_URL": "http://127.0.0.1:5000",
    }


@pytest.fixture
def app(app_config, redis_conn):
    from app import create_app

    return create_app(dict(app_config))


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def make_admin(app):
    """make_admin(org=None, admin=True) -> (email, password, org): a user of a fresh organization."""
    from models import Membership, Organization, User, db

    def make(org_name: str | None = None, admin: bool = True):
        email, password = f"{unique('admin')}@example.com", "correct horse battery"
        with db.connection_context():
            org, _ = Organization.get_or_create(name=org_name or unique("Org"))
            user = User(email=email)
            user.set_password(password)
            user.save()
            Membership.create(user=user, organization=org, is_admin=admin)
        return email, password, org
    return make


def csrf_token(client, path: str = "/login") -> str:
    html = client.get(path).get_data(as_text=True)
    m = re.search(r'name="csrf-token" content="([^"]+)"', html)
    assert m, f"no CSRF token on {path}"
    return m.group(1)


def login(client, email: str, password: str):
    token = csrf_token(client)
    return client.post("/login", data={"email": email, "password": password, "csrf_token": token})


class AdminClient:
    """A signed-in test client that sends the CSRF header like htmx does."""

    def __init__(self, client, email, org):
        self.client, self.email, self.org = client, email, org
        self.token = csrf_token(client, "/settings/")

    def get(self, path, **kw):
        return self.client.get(path, **kw)

    def _send(self, method, path, htmx=True, **kw):
        headers = kw.pop("headers", {})
        headers.setdefault("X-CSRFToken", self.token)
        if htmx:
            headers.setdefault("HX-Request", "true")
        return getattr(self.client, method)(path, headers=headers, **kw)

    def post(self, path, **kw):
        return self._send("post", path, **kw)

    def delete(self, path, **kw):
        return self._send("delete", path, **kw)


@pytest.fixture
def admin_client(app, make_admin):
    email, password, org = make_admin()
    c = app.test_client()
    resp = login(c, email, password)
    assert resp.status_code == 302, resp.get_data(as_text=True)
    return AdminClient(c, email, org)


@pytest.fixture
def run_jobs(app, redis_conn):
    """Run every queued job now, in this process, with a real RQ worker."""
    from rq import SimpleWorker

    from services import queue

    def run(timeout: float = 60):
        import time

        from rq.registry import StartedJobRegistry

        queues = [queue.queue(n) for n in queue.QUEUE_NAMES]
        deadline = time.monotonic() + timeout
        while True:
            SimpleWorker(queues, connection=queue.connection()).work(burst=True, with_scheduler=False)
            # A browser test's real worker.py may hold a job: wait for it too.
            busy = any(q.count or StartedJobRegistry(queue=q).count for q in queues)
            if not busy:
                return
            assert time.monotonic() < deadline, "jobs still running after the timeout"
            time.sleep(0.05)
    return run
