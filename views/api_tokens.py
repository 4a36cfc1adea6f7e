"""Administrator Settings > API tokens: create (shown once) and revoke."""
from __future__ import annotations

import logging

from flask import Blueprint, abort, g, make_response, render_template, request
from peewee import JOIN

from models import ApiToken, User

from .access import admin_required

bp = Blueprint("api_tokens", __name__, url_prefix="/settings/api-tokens")
log = logging.getLogger(__name__)
NAME_MAX = 120


def _tokens():
    return (ApiToken.select(ApiToken, User).join(User, on=(ApiToken.created_by == User.id), join_type=JOIN.LEFT_OUTER)
            .where(ApiToken.organization == g.org)
            .order_by(ApiToken.revoked_at.is_null(False), ApiToken.created_at.desc(), ApiToken.id.desc()))


def _render(status: int = 200, **ctx):
    """The whole page, or for htmx only the section it swaps."""
    ctx.setdefault("name", "")
    ctx.setdefault("errors", {})
    template = "settings/_api_tokens.html" if request.headers.get("HX-Request") else "settings/api_tokens.html"
    resp = make_response(render_template(template, tokens=_tokens(), **ctx), status)
    resp.headers["Vary"] = "HX-Request"
    resp.headers["Cache-Control"] = "no-store"  # a new token is in the page once
    return resp


@bp.get("/")
@admin_required
def index():
    """The tokens of this organization, with Create token."""
    return _render()


@bp.post("/")
@admin_required
def create():
    """Create a token and show it once."""
    name = request.form.get("name", "").strip()
    error = ("Enter a name that says what uses the token." if not name
             else f"Use at most {NAME_MAX} characters." if len(name) > NAME_MAX else "")
    if error:
        # 200 so htmx swaps the form with the error beside the field.
        return _render(200 if request.headers.get("HX-Request") else 400, name=name, errors={"name": error})
    row, token = ApiToken.issue(g.org, g.user, name)
    log.info("%s created API token %s (%s) for %s", g.user.email, row.prefix, row.name, g.org.name)
    return _render(new_token=token, new_row=row)


@bp.post("/<int:token_id>/revoke")
@admin_required
def revoke(token_id):
    """Revoke a token: requests with it are refused from now on."""
    row = ApiToken.get_or_none((ApiToken.id == token_id) & (ApiToken.organization == g.org))
    if row is None:
        abort(404)
    row.revoke()
    log.info("%s revoked API token %s (%s) of %s", g.user.email, row.prefix, row.name, g.org.name)
    return _render(notice=f"The token {row.name} was revoked.")
