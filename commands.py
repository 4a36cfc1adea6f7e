"""`flask --app app ...` commands. click.echo is the CLI's output, not logging."""
from __future__ import annotations

import click
from flask import Flask

from models import EmailConnection, SECRET_FIELDS, User, db
from services import crypto, database


def register(app: Flask) -> None:
    @app.cli.command("migrate")
    def migrate_cmd():
        """Apply pending database migrations."""
        applied = database.migrate()
        click.echo(f"Applied: {', '.join(applied)}" if applied else "Database is up to date.")
        with db.connection_context():
            if User.select().count() == 0:
                click.echo(
                    "\nNo users yet. Create the first administrator with:\n"
                    "  .venv/bin/flask --app app create-admin --email you@example.com "
                    "--password '<a long password>' --org 'Your organization'\n")

    @app.cli.command("create-admin")
    @click.option("--email", required=True, help="The administrator's email (their sign-in name).")
    @click.option("--password", required=True, help="At least 10 characters.")
    @click.option("--org", "org_name", required=True, help="Organization; created if it does not exist.")
    def create_admin_cmd(email, password, org_name):
        """Create (or update) an administrator of an organization."""
        from views.access import create_admin

        if len(password) < 10:
            raise click.BadParameter("Use at least 10 characters.", param_hint="--password")
        if "@" not in email:
            raise click.BadParameter("Enter an email address.", param_hint="--email")
        with db.connection_context():
            user, org = create_admin(email, password, org_name)
        click.echo(f"{user.email} is an administrator of {org.name}.")

    @app.cli.command("rotate-keys")
    def rotate_keys_cmd():
        """Re-encrypt every stored secret under the first key of ENCRYPTION_KEYS."""
        n = 0
        with db.connection_context(), db.atomic():
            for field in SECRET_FIELDS:
                column = getattr(EmailConnection, field)
                for row_id, token in db.execute_sql(
                        f'SELECT id, "{column.column_name}" FROM "{EmailConnection._meta.table_name}" '
                        f'WHERE "{column.column_name}" IS NOT NULL').fetchall():
                    db.execute_sql(
                        f'UPDATE "{EmailConnection._meta.table_name}" SET "{column.column_name}" = ? WHERE id = ?'
                        .replace("?", db.param), (crypto.rotate(token), row_id))
                    n += 1
        click.echo(f"Re-encrypted {n} secrets.")

    @app.cli.command("embedded-redis")
    def embedded_redis_cmd():
        """Run the embedded Redis in the foreground (when REDIS_URL is unset)."""
        import os
        import signal

        from flask import current_app
        from services import queue

        if current_app.config["REDIS_URL"]:
            click.echo("REDIS_URL is set; not starting an embedded Redis.")
            signal.pause()
            return
        sock = current_app.config["REDIS_SOCKET"]
        proc = queue.start_embedded(sock, os.path.dirname(sock))
        click.echo(f"Embedded Redis on unix://{sock}")
        signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
        raise SystemExit(proc.wait())
