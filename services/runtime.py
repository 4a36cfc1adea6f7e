"""The configuration this process was started with, for code that runs
outside a Flask request (jobs, scheduler, CLI)."""
from __future__ import annotations

_config: dict = {}


def configure(cfg: dict) -> None:
    _config.clear()
    _config.update(cfg)


def config() -> dict:
    if not _config:
        raise RuntimeError("services.runtime.configure() was not called (app.init_services does it)")
    return _config
