"""`flask --app app api-token create|revoke`: API tokens from the command line.
click.echo is the CLI's output, not logging."""
from __future__ import annotations

import logging

import click
from flask import Flask

from models import ApiToken, Membership, Organization, User, db
from models.api import TOKEN_PREFIX, hash_token

log = logging.getLogger("intake")


def register(app: Flask) -> None:
    @app.cli.group("api-token")
    def api_token():
        """Create and revoke REST API tokens."""

    @api_token.command("create")
    @click.option("--email", required=True, help="The administrator the token acts for.")
    @click.option("--name", default="Command line", show_default=True, help="What will use the token.")
    @click.option("--org", "org_name", default=None,
                  help="Organization; needed when the administrator administers several.")
    def create_cmd(email, name, org_name):
        """Create a token and print it (once: only its hash is kept)."""
        with db.connection_context():
            user = User.get_or_none(User.email == email.strip().lower())
            if user is None or not user.is_active:
                raise click.BadParameter(f"No active user {email}.", param_hint="--email")
            admin_of = list(Organization.select().join(Membership)
                            .where((Membership.user == user) & Membership.is_admin).order_by(Organization.name))
            if org_name is not None:
                org = next((o for o in admin_of if o.name == org_name), None)
                if org is None:
                    raise click.BadParameter(f"{user.email} is not an administrator of {org_name!r}.",
                                             param_hint="--org")
            elif len(admin_of) == 1:
                org = admin_of[0]
            elif not admin_of:
                raise click.BadParameter(f"{user.email} is not an administrator of any organization.",
                                         param_hint="--email")
            else:
                names = ", ".join(repr(o.name) for o in admin_of)
                raise click.BadParameter(f"{user.email} administers several organizations ({names}); choose one.",
                                         param_hint="--org")
            row, token = ApiToken.issue(org, user, name.strip() or "Command line")
        log.info("API token %s (%s) created for %s from the command line", row.prefix, row.name, org.name)
        click.echo(f"API token {row.name!r} for {org.name} (acts while {user.email} administers it):\n")
        click.echo(f"  {token}\n")
        click.echo("Copy it now: it is not shown again. Send it as the header 'Authorization: Bearer <token>'.")

    @api_token.command("revoke")
    @click.option("--prefix", required=True, help="The token's prefix as listed (intake_XXXXXXXX), or the token.")
    def revoke_cmd(prefix):
        """Revoke a token: requests with it are refused from then on."""
        prefix = prefix.strip()
        if not prefix.startswith(TOKEN_PREFIX):
            raise click.BadParameter(f"Tokens start with {TOKEN_PREFIX}.", param_hint="--prefix")
        with db.connection_context():
            match = (ApiToken.prefix == prefix) | (ApiToken.token_hash == hash_token(prefix))
            rows = list(ApiToken.select().where(match & ApiToken.revoked_at.is_null()))
            if not rows:
                raise click.ClickException(f"No active API token {prefix}.")
            if len(rows) > 1:
                raise click.ClickException(f"{len(rows)} active tokens share the prefix {prefix}; "
                                           "revoke them in Administrator Settings > API tokens.")
            rows[0].revoke()
        log.info("API token %s (%s) revoked from the command line", rows[0].prefix, rows[0].name)
        click.echo(f"Revoked API token {rows[0].prefix} ({rows[0].name}).")
