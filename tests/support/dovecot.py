"""A real Dovecot IMAP server for the tests (pytest plugin).

Each instance runs `/usr/sbin/dovecot -F -c <generated conf>` on free
loopback ports with its own certificate, passwd-file users and maildir
storage in a throw-away directory, so tests exercise the same TLS, STARTTLS,
login and folder behaviour a customer's server has. Nothing outside that
directory is read or written (not /etc/dovecot, not /var/run).

Fixtures:
  dovecot              implicit TLS (`ssl_port`) and STARTTLS (`plain_port`,
                       plaintext login allowed too, for Encryption "None")
  dovecot_wrong_name   certificate for mail.example.test only
  dovecot_no_starttls  `ssl = no`: STARTTLS is not offered
  dovecot_factory      `start(name, cert=..., ssl=True)` for other variants

Test data goes in over IMAP (APPEND, CREATE) as the user, never by writing
maildir files, so file ownership never matters to a test.
"""
from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

import pytest

from tests.support.certs import CertPair, free_port, make_cert
from tests.support.requires import require_binary

HOST = "127.0.0.1"
# Startup normally takes well under a second; this only bounds a broken one.
_START_TIMEOUT = 10.0
_STOP_GRACE = 2.0


class DovecotServer:
    """One running Dovecot. Users are unique per call to `add_user`, so tests
    sharing the session-wide server never see each other's mail."""

    def __init__(self, binary: str, directory: Path, name: str, cert: CertPair, *, tls: bool = True):
        self.binary = binary
        self.dir = directory
        self.name = name
        self.cert = cert
        self.host = HOST
        self.delimiter = "."  # Maildir++ (see the namespace in the config)
        self.tls = tls
        self.plain_port = free_port()
        # None when the instance has no TLS at all (dovecot_no_starttls).
        self.ssl_port: Optional[int] = free_port() if tls else None
        self.conf_path = directory / "dovecot.conf"
        self.log_path = directory / "dovecot.log"
        self.users_dir = directory / "users"  # one passwd-file per user
        self.mail_root = directory / "mail"
        self._users: dict[str, str] = {}
        self._lock = threading.Lock()
        self._proc: Optional[subprocess.Popen] = None

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> "DovecotServer":
        self._prepare_directories()
        self.conf_path.write_text(self._config())
        self._proc = subprocess.Popen(
            [self.binary, "-F", "-c", str(self.conf_path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so stop() can end all its children
        )
        self._wait_until_listening()
        return self

    def stop(self) -> None:
        self.request_stop()
        self.wait_stopped()

    def request_stop(self) -> None:
        # The master stops its own children on SIGTERM (takes about a second).
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()

    def wait_stopped(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            proc.wait(timeout=_STOP_GRACE)
        except subprocess.TimeoutExpired:
            # A master stopped while still starting its services can sit for
            # several seconds; nothing here needs a clean shutdown. The
            # group is the one this instance was started in (its own).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log file)"

    def _prepare_directories(self) -> None:
        uid, gid = self._mail_ids()
        self.mail_root.mkdir(parents=True, exist_ok=True)
        self.users_dir.mkdir(exist_ok=True)
        # Dovecot creates each user's maildir as the mail uid, and its auth
        # process (running as the `dovecot` user) reads the passwd file, so
        # the instance directory must be traversable by both.
        self.dir.chmod(0o755)
        if os.geteuid() == 0:
            os.chown(self.mail_root, uid, gid)

    def _wait_until_listening(self) -> None:
        ports = [p for p in (self.plain_port, self.ssl_port) if p]
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._fail_start(f"dovecot exited with code {self._proc.returncode}")
            if all(_port_open(self.host, p) for p in ports):
                return
            time.sleep(0.02)
        self.stop()
        self._fail_start(f"dovecot did not listen on {ports} within {_START_TIMEOUT:.0f}s")

    def _fail_start(self, why: str) -> None:
        output = ""
        if self._proc is not None and self._proc.stdout is not None and self._proc.poll() is not None:
            output = self._proc.stdout.read().decode(errors="replace")
        pytest.fail(
            f"Dovecot test server '{self.name}' did not start: {why}\n"
            f"config: {self.conf_path} (set INTAKE_KEEP_DOVECOT=1 to keep it after the run)\n"
            f"--- stdout/stderr ---\n{output}\n"
            f"--- tail of {self.log_path} ---\n{self.log_tail()}",
            pytrace=False,
        )

    # -- configuration -----------------------------------------------------

    @staticmethod
    def _mail_ids() -> tuple[int, int]:
        """The uid/gid mail processes run as. Dovecot refuses to access mail
        as root, so under root (CI containers) an unprivileged account is
        used; otherwise the current user, which is then the only one."""
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            return nobody.pw_uid, nobody.pw_gid
        return os.getuid(), os.getgid()

    def _config(self) -> str:
        uid, gid = self._mail_ids()
        d = self.dir
        if os.geteuid() == 0:
            # Dovecot's own accounts (Debian's package creates them).
            internal_user, login_user = "dovecot", "dovenull"
        else:
            # A non-root Dovecot can only run everything as the current user.
            internal_user = login_user = pwd.getpwuid(os.getuid()).pw_name
        if self.tls:
            ssl_settings = f"ssl = yes\nssl_cert = <{self.cert.cert_path}\nssl_key = <{self.cert.key_path}\n"
            imaps = f"  inet_listener imaps {{\n    port = {self.ssl_port}\n    ssl = yes\n  }}\n"
        else:
            ssl_settings = "ssl = no\n"
            imaps = "  inet_listener imaps {\n    port = 0\n  }\n"
        return f"""# Generated by tests/support/dovecot.py for test instance '{self.name}'.
instance_name = intake-test-{self.name}-{os.getpid()}
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
info_log_path = {d}/dovecot.log
auth_verbose = yes
protocols = imap
listen = {HOST}
shutdown_clients = yes

default_internal_user = {internal_user}
default_login_user = {login_user}
first_valid_uid = {min(uid, 500)}

{ssl_settings}
# Encryption "None" must be testable, so plaintext logins are allowed on the
# plain port even though STARTTLS is offered there.
disable_plaintext_auth = no
# xoauth2/oauthbearer hand the bearer token to the passdb like a password, so
# a user's password doubles as their access token in XOAUTH2 tests.
auth_mechanisms = plain login xoauth2 oauthbearer
auth_cache_size = 0

# One passwd file per user: Dovecot re-stats a passwd file at most once a
# second, so a user added to a shared file right after another login could be
# "unknown" for up to a second. A new user's file is always read fresh.
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {self.users_dir}/%u
}}
# Wrong-password tests should not wait the default 2 s.
auth_failure_delay = 0
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={self.mail_root}/%u allow_all_users=yes
}}
mail_location = maildir:~/Maildir
mail_fsync = never
# Maildir++'s hierarchy separator is "." (not "/"), like many real servers,
# so tests prove that folder paths typed with "/" are translated.
namespace inbox {{
  inbox = yes
}}

protocol imap {{
  mail_max_userip_connections = 200
}}

service imap-login {{
  # No chroot: it needs CAP_SYS_CHROOT, which some CI containers lack.
  chroot =
  inet_listener imap {{
    port = {self.plain_port}
  }}
{imaps}}}
service anvil {{
  chroot =
  # No brute-force penalty: wrong-password tests would slow every later
  # login from 127.0.0.1 by up to 15 s.
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
"""

    # -- users and mail ----------------------------------------------------

    def add_user(self, name: str | None = None, password: str | None = None) -> tuple[str, str]:
        """A new mailbox; returns (email, password). The user can log in
        right away (see the passdb in the config)."""
        local = name or f"user-{secrets.token_hex(4)}"
        email = local if "@" in local else f"{local}@example.test"
        password = password or secrets.token_urlsafe(12)
        with self._lock:
            if email in self._users:
                raise ValueError(f"test user {email} already exists")
            self._users[email] = password
            self._write_passwd(email, password)
        return email, password

    def password(self, user: str) -> str:
        return self._users[user]

    def _write_passwd(self, user: str, password: str) -> None:
        # Written to a new file and renamed, so Dovecot never reads half a file.
        path = self.users_dir / user
        tmp = path.with_name(f".{user}.tmp")
        tmp.write_text(f"{user}:{password}::::::\n")
        tmp.chmod(0o644)
        tmp.replace(path)

    @contextlib.contextmanager
    def client(self, user: str) -> Iterator["imapclient.IMAPClient"]:  # noqa: F821
        """A logged-in IMAPClient for the test's own setup and checks
        (over the plain port: loopback, and it works on every instance)."""
        import imapclient

        c = imapclient.IMAPClient(self.host, self.plain_port, ssl=False, timeout=10)
        try:
            c.login(user, self._users[user])
            yield c
        finally:
            with contextlib.suppress(Exception):
                c.logout()

    def append(self, user: str, raw: bytes, folder: str = "INBOX", seen: bool = False) -> int:
        """Store a message; returns its UID."""
        import imapclient

        with self.client(user) as c:
            response = c.append(self.folder_name(folder), raw, flags=[imapclient.SEEN] if seen else [])
        # Dovecot answers "[APPENDUID <uidvalidity> <uid>] Append completed."
        text = response.decode() if isinstance(response, bytes) else str(response)
        return int(text.split("APPENDUID", 1)[1].split("]", 1)[0].split()[1])

    def folder_name(self, path: str) -> str:
        """The server's name for a "/"-separated path ("A/B" -> "A.B")."""
        return path.replace("/", self.delimiter)

    def create_folder(self, user: str, path: str) -> None:
        """`path` is "/"-separated; parents are created as needed."""
        with self.client(user) as c:
            parts = path.split("/")
            for i in range(1, len(parts) + 1):
                name = self.delimiter.join(parts[:i])
                if not c.folder_exists(name):
                    c.create_folder(name)

    def unseen(self, user: str, folder: str = "INBOX") -> list[int]:
        with self.client(user) as c:
            c.select_folder(self.folder_name(folder), readonly=True)
            return sorted(c.search(["UNSEEN"]))

    def count(self, user: str, folder: str = "INBOX") -> int:
        with self.client(user) as c:
            return int(c.folder_status(self.folder_name(folder), [b"MESSAGES"])[b"MESSAGES"])

    def __repr__(self) -> str:
        return f"<DovecotServer {self.name} plain={self.plain_port} ssl={self.ssl_port}>"


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class DovecotFactory:
    """Starts Dovecot instances on demand and stops them all at the end."""

    def __init__(self, binary: str):
        self.binary = binary
        self._servers: list[DovecotServer] = []
        self._dirs: list[Path] = []

    def start(self, name: str, *, cert: CertPair | None = None, tls: bool = True,
              hostnames=("localhost", "127.0.0.1")) -> DovecotServer:
        # Not under pytest's basetemp: that is mode 0700, and Dovecot's
        # unprivileged processes must reach the passwd file and maildirs.
        directory = Path(tempfile.mkdtemp(prefix=f"intake-dovecot-{name}-"))
        self._dirs.append(directory)
        if cert is None:
            cert = make_cert(directory / "tls", "server", hostnames=hostnames)
        server = DovecotServer(self.binary, directory, name, cert, tls=tls)
        self._servers.append(server)
        return server.start()

    def stop_all(self) -> None:
        # All at once: each master takes about a second to wind down.
        for server in self._servers:
            server.request_stop()
        for server in self._servers:
            server.wait_stopped()
        if not os.environ.get("INTAKE_KEEP_DOVECOT"):  # set it to inspect logs after a run
            for d in self._dirs:
                shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def dovecot_factory() -> Iterator[DovecotFactory]:
    factory = DovecotFactory(require_binary("dovecot"))
    yield factory
    factory.stop_all()


@pytest.fixture(scope="session")
def dovecot(dovecot_factory) -> DovecotServer:
    return dovecot_factory.start("main")


@pytest.fixture(scope="session")
def dovecot_wrong_name(dovecot_factory) -> DovecotServer:
    """Its certificate names only mail.example.test, so reaching it as
    127.0.0.1 or localhost is a host-name mismatch."""
    return dovecot_factory.start("wrongname", hostnames=("mail.example.test",))


@pytest.fixture(scope="session")
def dovecot_no_starttls(dovecot_factory) -> DovecotServer:
    """`ssl = no`: the server never offers STARTTLS."""
    return dovecot_factory.start("nostarttls", tls=False)


def trusting_context(server: DovecotServer) -> ssl.SSLContext:
    """An SSL context that trusts exactly this server's certificate."""
    return ssl.create_default_context(cadata=server.cert.cert_pem.decode())
