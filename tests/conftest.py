"""Shared fixtures. Service fixtures live in tests/support/*.py as pytest
plugins so each test server is one module."""
import importlib.util

_PLUGINS = [
    "tests.support.app_fixtures",
    "tests.support.redis_server",
    "tests.support.dovecot",
    "tests.support.ews_server",
    "tests.support.proxies",
    "tests.support.identity_server",
    "tests.support.graph_server",
    "tests.support.browser",
]
# Only plugins that exist yet (modules are added issue by issue).
pytest_plugins = [m for m in _PLUGINS if importlib.util.find_spec(m) is not None]
