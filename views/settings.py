"""Administrator Settings > Organization."""
from flask import Blueprint, render_template

from .access import admin_required

bp = Blueprint("settings", __name__, url_prefix="/settings")


@bp.get("/")
@admin_required
def index():
    """Administrator Settings."""
    return render_template("settings/index.html")


@bp.get("/organization")
@admin_required
def organization():
    """The Organization tab, with Inbound Email Connections."""
    return render_template("settings/organization.html")
