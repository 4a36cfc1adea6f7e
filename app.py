"""Intake: inbound email connections that turn mail into incidents.

`create_app(test_config=None)` builds the web app; the `flask --app app ...`
CLI commands (create-admin, migrate, ...) live in `commands.py`."""
from __future__ import annotations

import logging

from flask import Flask, render_template

import settings
from extensions import csrf, htmx
from ingest.store import RawStore
from models import db
from services import crypto, database, logs, queue, runtime

log = logging.getLogger("intake")


def init_services(cfg: dict, *, pooled_db: bool = False) -> None:
    """What every process (web, worker, scheduler, CLI) needs before work.
    `pooled_db`: for the web app only (see database.open_database)."""
    runtime.configure(cfg)
    logs.setup(cfg["LOG_FILE"], cfg["LOG_LEVEL"])
    crypto.configure(cfg["ENCRYPTION_KEYS"])
    database.open_database(cfg["DATABASE_URL"], pooled=pooled_db)
    queue.configure(settings.redis_url(cfg))


def create_app(test_config: dict | None = None) -> Flask:
    cfg = settings.load(test_config)
    app = Flask(__name__, instance_path=cfg["INSTANCE_PATH"], static_folder="static")
    app.config.from_mapping(cfg)
    init_services(cfg, pooled_db=True)
    database.migrate()
    # The data store too, like the database: a DATA_DIR that cannot be
    # written fails here, and the first fetch finds its shards made.
    RawStore(cfg["DATA_DIR"])
    database.release_connections()  # gunicorn --preload forks its workers after this

    csrf.init_app(app)
    htmx.init_app(app)

    @app.before_request
    def _open_db():
        db.connect(reuse_if_open=True)

    @app.teardown_request
    def _close_db(_exc):
        if not db.is_closed():
            db.close()

    @app.after_request
    def _security_headers(resp):
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("X-Frame-Options", "SAMEORIGIN")
        resp.headers.setdefault("Referrer-Policy", "same-origin")
        resp.headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
            "frame-src 'self'; form-action 'self' " + app.config.get("OAUTH_FORM_ACTION", "https:") + "; "
            "frame-ancestors 'self'")
        return resp

    from views import register_blueprints
    register_blueprints(app)
    _register_error_pages(app)

    import commands
    import commands_api
    import commands_mail

    for module in (commands, commands_api, commands_mail):
        module.register(app)
    return app


def _register_error_pages(app: Flask) -> None:
    from flask_wtf.csrf import CSRFError

    def page(code: int, title: str, text: str):
        return render_template("error.html", code=code, title=title, text=text), code

    app.register_error_handler(CSRFError, lambda e: page(
        400, "Form expired", "The form's security token is missing or invalid. Reload the page and try again."))
    app.register_error_handler(403, lambda e: page(
        403, "Not allowed", "Your account may not open this page. Settings are for the organization's "
        "administrators; other pages need membership of an organization."))
    app.register_error_handler(404, lambda e: page(404, "Not found", "There is nothing at this address."))

    def _server_error(e):
        log.exception("Unhandled error", exc_info=getattr(e, "original_exception", e))
        return page(500, "Something went wrong", "The error was written to the log file.")

    app.register_error_handler(500, _server_error)
