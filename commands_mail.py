"""`flask --app app incidents list [--json] [--connection API_NAME] [--status open] [--org NAME]`.
click.echo is the CLI's output, not logging."""
from __future__ import annotations

import json

import click
from flask import Flask

from models import EmailConnection, Organization, db


def register(app: Flask) -> None:
    group = click.Group("incidents", help="Incidents (cases) made from inbound email.")
    app.cli.add_command(group)

    @group.command("list")
    @click.option("--org", "org_name", help="Organization name; needed when there is more than one.")
    @click.option("--connection", "api_name", help="Only incidents from the connection with this API Name.")
    @click.option("--status", type=click.Choice(["open", "closed"]), help="Only open or only closed incidents.")
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    def list_cmd(org_name, api_name, status, as_json):
        """List incidents, newest first."""
        from views.incidents import incidents_query

        with db.connection_context():
            org = _organization(org_name)
            conn = _connection(org, api_name) if api_name else None
            rows = [{"number": inc.number, "tag": inc.tag, "title": inc.title, "status": inc.status,
                     "connection": inc.connection.api_name if inc.connection else None,
                     "emails": inc.email_count, "created_at": inc.created_at.isoformat() + "Z",
                     "updated_at": inc.updated_at.isoformat() + "Z"}
                    for inc in incidents_query(org, conn, status)]
        if as_json:
            click.echo(json.dumps(rows, indent=2))
            return
        if not rows:
            click.echo(f"No incidents in {org.name}" + (" matching these filters." if api_name or status else "."))
        for r in rows:
            click.echo(f"{r['tag']:<12} {r['status']:<7} {r['created_at'][:16]:<17} {(r['connection'] or '-'):<24} "
                       f"{r['emails']:>4}  {r['title'][:80]}")


def _organization(name: str | None) -> Organization:
    names = [o.name for o in Organization.select(Organization.name).order_by(Organization.name)]
    if name:
        org = Organization.get_or_none(Organization.name == name)
        if org is None:
            raise click.ClickException(f"No organization named {name!r}. Organizations: {', '.join(names) or 'none'}.")
        return org
    if len(names) == 1:
        return Organization.get(Organization.name == names[0])
    if not names:
        raise click.ClickException("There are no organizations yet; create one with `flask --app app create-admin`.")
    raise click.ClickException(f"There are {len(names)} organizations; choose one with --org NAME "
                               f"({', '.join(names[:10])}{', …' if len(names) > 10 else ''}).")


def _connection(org: Organization, api_name: str) -> EmailConnection:
    conn = EmailConnection.get_or_none((EmailConnection.organization == org) & (EmailConnection.api_name == api_name))
    if conn is None:
        known = [c.api_name for c in EmailConnection.select().where(EmailConnection.organization == org)]
        raise click.ClickException(f"No connection with API Name {api_name!r} in {org.name}. "
                                   f"API Names there: {', '.join(known) or 'none'}.")
    return conn
