"""The landing page after sign-in."""
from flask import Blueprint, g, redirect, render_template, url_for

from .access import login_required

bp = Blueprint("home", __name__)


@bp.get("/")
@login_required
def index():
    """Admins land on their connections, analysts on the incidents."""
    if g.membership is not None and g.membership.is_admin:
        return redirect(url_for("connections.index"))
    if g.org is not None:
        return redirect(url_for("incidents.index"))
    return render_template("home.html")
