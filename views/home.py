"""The landing page after sign-in."""
from flask import Blueprint, g, redirect, url_for

from .access import login_required

bp = Blueprint("home", __name__)


@bp.get("/")
@login_required
def index():
    """Admins land on their connections; others on a short welcome."""
    if g.membership is not None and g.membership.is_admin:
        return redirect(url_for("connections.index"))
    from flask import render_template
    return render_template("home.html")
