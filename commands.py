"""`flask --app app ...` commands. click.echo is the CLI's output, not logging."""
from __future__ import annotations

import click
from flask import Flask

from models import EmailConnection, SECRET_FIELDS, User, db, write_transaction
from services import crypto, database


def register(app: Flask) -> None:
    register_connection_commands(app)
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
        with db.connection_context(), write_transaction():
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


def register_connection_commands(app: Flask) -> None:
    """`flask --app app connections list|test|fetch`."""
    import json

    from models import Organization

    group = click.Group("connections", help="Inbound email connections.")
    app.cli.add_command(group)

    def find(api_name: str, org_name: str | None) -> EmailConnection:
        q = EmailConnection.select().join(Organization).where(EmailConnection.api_name == api_name)
        if org_name:
            q = q.where(Organization.name == org_name)
        found = list(q)
        if not found:
            raise click.ClickException(f"No connection with API Name {api_name}" + (f" in {org_name}." if org_name else "."))
        if len(found) > 1:
            raise click.ClickException(f"{api_name} exists in several organizations; add --org NAME.")
        return found[0]

    @group.command("list")
    @click.option("--org", "org_name", help="Only this organization.")
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    def list_cmd(org_name, as_json):
        """List connections with their status (never secrets)."""
        with db.connection_context():
            q = EmailConnection.select(EmailConnection, Organization).join(Organization).order_by(
                Organization.name, EmailConnection.name)
            if org_name:
                q = q.where(Organization.name == org_name)
            rows = [{"organization": c.organization.name, "api_name": c.api_name, "name": c.name,
                     "protocol": c.protocol, "status": c.status, "enabled": c.enabled,
                     "last_fetch": c.last_fetch_at.isoformat() if c.last_fetch_at else None,
                     "messages_total": c.messages_total, "last_error": c.last_error} for c in q]
        if as_json:
            click.echo(json.dumps(rows, indent=2))
            return
        for r in rows:
            click.echo(f"{r['organization']:<20} {r['api_name']:<24} {r['protocol']:<9} {r['status']:<8} "
                       f"{'on ' if r['enabled'] else 'off'} {r['messages_total']:>7}  {r['last_error'][:60]}")

    @group.command("test")
    @click.argument("api_name")
    @click.option("--org", "org_name")
    def test_cmd(api_name, org_name):
        """Run the connection test now (login and folder check); saves nothing."""
        from connectors.errors import ConnectorError
        from jobs.connect import open_session

        with db.connection_context():
            conn = find(api_name, org_name)
            try:
                session = open_session(conn.stored_values(), lambda step: click.echo(f"  {step}…"))
                with session.connector as c:
                    result = c.check()
            except ConnectorError as e:
                raise click.ClickException(f"{e.diagnosis.message} {e.diagnosis.hint}".strip())
        click.echo(f"OK: {result.folder} opened, {result.unread} unread.")

    @group.command("fetch")
    @click.argument("api_name")
    @click.option("--org", "org_name")
    @click.option("--no-process", is_flag=True, help="Only capture; leave processing to the workers.")
    def fetch_cmd(api_name, org_name, no_process):
        """Fetch now, in this process, and print the counts."""
        from jobs import fetch as fetch_jobs
        from jobs import process as process_jobs

        with db.connection_context():
            conn = find(api_name, org_name)
        result = fetch_jobs.fetch(conn.id, enqueue_processing=no_process)
        if "error" in result:
            raise click.ClickException(result["error"]["message"])
        if result.get("skipped"):
            raise click.ClickException(f"Skipped: {result['skipped']}")
        outcomes: dict[str, int] = {}
        for mid in result.get("new_message_ids", []) if not no_process else []:
            outcome = process_jobs.run(mid)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
        click.echo(f"Unread listed: {result['listed']}, stored: {result['stored']}, already stored: "
                   f"{result['duplicates']}, quarantined: {result['quarantined']}.")
        if outcomes:
            click.echo("Processed: " + ", ".join(f"{k}: {v}" for k, v in sorted(outcomes.items())))
