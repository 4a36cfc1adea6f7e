"""Real proxies for the tests: one squid with Basic auth, listening as a
plain HTTP proxy and as an HTTPS proxy (its own self-signed certificate).

A fake proxy would only prove we agree with ourselves; squid shows what
requests/urllib3 really raise on 407, on an untrusted proxy certificate and
on a refused CONNECT. It may tunnel (CONNECT) to any port on 127.0.0.1 and
nowhere else, so a CONNECT elsewhere is a real 403.

Fixtures: `squid` (session), `http_proxy`, `https_proxy`.
"""
from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import pytest

from connectors.base import ProxySettings

from .certs import CertPair, free_port, make_cert
from .requires import missing, require_binary

_HELPER_DIRS = ("/usr/lib/squid", "/usr/lib64/squid", "/usr/libexec/squid")
_START_TIMEOUT = 15.0


@dataclass(frozen=True)
class ProxyEndpoint:
    protocol: str  # "http" or "https"
    host: str
    port: int
    username: str
    password: str
    cert: Optional[CertPair] = None  # the HTTPS listener's certificate
    log_path: Optional[Path] = None
    log_offset: int = 0  # tunnels() counts only what was logged after this byte

    def for_this_test(self) -> "ProxyEndpoint":
        """The same listener, its log starting now (squid is session-wide)."""
        size = self.log_path.stat().st_size if self.log_path and self.log_path.exists() else 0
        return replace(self, log_offset=size)

    def settings(self, *, username: Optional[str] = None, password: Optional[str] = None,
                 trust: bool = False) -> ProxySettings:
        """ProxySettings for a connection; `trust=True` uploads the HTTPS
        proxy's certificate as an admin would."""
        return ProxySettings(
            protocol=self.protocol,
            host=self.host,
            port=self.port,
            username=self.username if username is None else username,
            password=self.password if password is None else password,
            certificate_pem=self.cert.cert_pem.decode() if trust and self.cert else "",
        )

    def tunnels(self, target_port: int, *, wait: float = 3.0, expect: int = 1) -> list[str]:
        """Access-log lines of tunnels this listener opened to 127.0.0.1:target_port.

        Squid writes a CONNECT line when the tunnel closes, so this polls
        briefly for `expect` lines (close the connector first)."""
        deadline = time.monotonic() + wait
        while True:
            lines = [line for line in self._log_lines()
                     if f" lp={self.port} " in line and f" CONNECT 127.0.0.1:{target_port} " in line]
            if len(lines) >= expect or time.monotonic() > deadline:
                return lines
            time.sleep(0.05)

    def _log_lines(self) -> list[str]:
        if self.log_path is None or not self.log_path.exists():
            return []
        with self.log_path.open("rb") as f:
            f.seek(self.log_offset)
            return f.read().decode(errors="replace").splitlines()


@dataclass
class Squid:
    http: ProxyEndpoint
    https: ProxyEndpoint
    process: subprocess.Popen
    directory: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        shutil.rmtree(self.directory, ignore_errors=True)


def _helper(name: str) -> str:
    for d in _HELPER_DIRS:
        p = Path(d) / name
        if p.exists():
            return str(p)
    missing(f"squid helper {name}")
    raise AssertionError("unreachable")


def _htpasswd(openssl: str, username: str, password: str) -> str:
    # -stdin keeps the password out of the process list.
    out = subprocess.run([openssl, "passwd", "-apr1", "-stdin"], input=password, capture_output=True,
                         text=True, check=True, timeout=10)
    return f"{username}:{out.stdout.strip()}\n"


def _config(d: Path, http_port: int, https_port: int, cert: CertPair, run_as: Optional[str]) -> str:
    lines = [
        f"http_port 127.0.0.1:{http_port}",
        # Debian's squid is GnuTLS-built; tls-cert/tls-key are what it understands.
        f"https_port 127.0.0.1:{https_port} tls-cert={cert.cert_path} tls-key={cert.key_path}",
        f"pid_filename {d}/squid.pid",
        f"cache_log {d}/cache.log",
        # lp= (the listener's port) tells the HTTP and HTTPS listeners apart.
        "logformat intake %ts.%03tu %>a lp=%>lp %Ss/%>Hs %rm %ru user=%un",
        f"access_log stdio:{d}/access.log logformat=intake",
        "buffered_logs off",
        f"coredump_dir {d}",
        "cache deny all",
        "cache_mem 8 MB",
        "netdb_filename none",
        "pinger_enable off",
        "icp_port 0",
        "htcp_port 0",
        "visible_hostname intake-test-proxy",
        "shutdown_lifetime 0 seconds",
        "connect_timeout 5 seconds",
        f"auth_param basic program {_helper('basic_ncsa_auth')} {d}/htpasswd",
        "auth_param basic realm intake-test",
        "auth_param basic children 2 startup=1 idle=1",
        "acl authed proxy_auth REQUIRED",
        "acl intake_targets dst 127.0.0.1",  # not "to_localhost": squid predefines that (127.0.0.0/8)
        "http_access deny !intake_targets",
        "http_access allow authed",
        "http_access deny all",
    ]
    if run_as:
        lines.append(f"cache_effective_user {run_as}")
    return "\n".join(lines) + "\n"


def _run_as() -> Optional[str]:
    """Squid refuses to keep root; as root it drops to the `proxy` user,
    which then must be able to read its files."""
    if os.geteuid() != 0:
        return None
    for name in ("proxy", "squid", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    return None


def _chown_tree(d: Path, user: str) -> None:
    pw = pwd.getpwnam(user)
    for p in [d, *d.rglob("*")]:
        os.chown(p, pw.pw_uid, pw.pw_gid)


def _wait_listening(proc: subprocess.Popen, ports: tuple[int, ...], d: Path) -> None:
    deadline = time.monotonic() + _START_TIMEOUT
    pending = set(ports)
    while pending:
        if proc.poll() is not None:
            raise RuntimeError(f"squid exited with {proc.returncode}: {_tail(d / 'cache.log')}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"squid did not listen on {sorted(pending)} in {_START_TIMEOUT}s: "
                               f"{_tail(d / 'cache.log')}")
        for port in list(pending):
            with socket.socket() as s:
                s.settimeout(0.2)
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    pending.discard(port)
        if pending:
            time.sleep(0.05)


def _tail(p: Path, n: int = 15) -> str:
    try:
        return "\n".join(p.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no cache.log)"


def start_squid() -> Squid:
    squid_bin = require_binary("squid")
    openssl = require_binary("openssl")
    # Not under pytest's tmp dir: that is mode 0700 and squid's unprivileged
    # user could not reach its own files there.
    d = Path(tempfile.mkdtemp(prefix="intake-squid-"))
    cert = make_cert(d, "proxy", hostnames=("localhost", "127.0.0.1"), common_name="Intake test proxy")
    username, password = "intake-proxy", secrets.token_urlsafe(12)
    (d / "htpasswd").write_text(_htpasswd(openssl, username, password))
    http_port, https_port = free_port(), free_port()
    run_as = _run_as()
    (d / "squid.conf").write_text(_config(d, http_port, https_port, cert, run_as))
    if run_as:
        _chown_tree(d, run_as)
    # -N: stay in the foreground so we own the process and can stop it by pid.
    proc = subprocess.Popen([squid_bin, "-N", "-f", str(d / "squid.conf")], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=d)
    log = d / "access.log"
    sq = Squid(
        http=ProxyEndpoint("http", "127.0.0.1", http_port, username, password, log_path=log),
        https=ProxyEndpoint("https", "127.0.0.1", https_port, username, password, cert=cert, log_path=log),
        process=proc,
        directory=d,
    )
    try:
        _wait_listening(proc, (http_port, https_port), d)
    except BaseException:
        sq.stop()
        raise
    return sq


@pytest.fixture(scope="session")
def squid():
    sq = start_squid()
    yield sq
    sq.stop()


@pytest.fixture
def http_proxy(squid) -> ProxyEndpoint:
    """Plain-HTTP proxy with Basic auth: .host .port .username .password,
    .settings() for a connection, .tunnels(port) from this test's log."""
    return squid.http.for_this_test()


@pytest.fixture
def https_proxy(squid) -> ProxyEndpoint:
    """HTTPS proxy with Basic auth and its own self-signed .cert (CertPair);
    .settings(trust=True) uploads that certificate."""
    return squid.https.for_this_test()
