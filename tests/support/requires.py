"""Skip on a laptop, fail in CI: integration tests must never pass by skipping."""
from __future__ import annotations

import os
import shutil

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(what: str) -> None:
    """A test needs something this machine lacks: skip locally, fail in CI."""
    if in_ci():
        pytest.fail(f"{what} is required in CI (CI=true); .ci/run should have installed it")
    pytest.skip(f"{what} is not available on this machine")


def require_binary(*names: str) -> str:
    """Return the first of `names` found on PATH (or in /usr/sbin)."""
    for name in names:
        path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/sbin")
        if path:
            return path
    missing(" or ".join(names))
    raise AssertionError("unreachable")
