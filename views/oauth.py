"""Office 365 Access: Grant Access / Switch Account, the /email-oauth redirect, and Migrate to Graph."""
from __future__ import annotations

from flask import Blueprint, current_app, g, make_response, redirect, render_template, request, url_for

from extensions import csrf
from jobs import connection_test, oauth_grant

from .access import admin_required
from .connections import draft_from_form, get_connection_or_404

bp = Blueprint("oauth", __name__)


def redirect_uri() -> str:
    """What the admin registers in the Entra app: BASE_URL + /email-oauth."""
    return current_app.config["BASE_URL"] + "/email-oauth"


@bp.post("/settings/connections/grant")
@admin_required
def grant_new():
    """Grant Access for a connection not saved yet."""
    return _grant(None)


@bp.post("/settings/connections/<api_name>/grant")
@admin_required
def grant(api_name):
    """Grant Access / Switch Account for a saved connection."""
    return _grant(get_connection_or_404(api_name))


def _grant(conn):
    draft, form = draft_from_form(conn)
    if draft is None:
        return render_template("connections/_form_errors.html", form=form)
    try:
        auth_uri = oauth_grant.begin(draft, redirect_uri(), g.user.id)
    except Exception as e:  # ConnectorError or an unreachable authority: say it where the status goes
        diagnosis = getattr(e, "diagnosis", None)
        if diagnosis is None:
            current_app.logger.exception("Grant Access could not start")
        return render_template("connections/_test_status.html", draft_id=draft.id, status={"state": "finished"},
                               action="Grant Access", diagnosis=diagnosis.to_dict() if diagnosis else {
                                   "code": "unexpected", "message": f"Grant Access could not start: {e}",
                                   "hint": "See the log file."})
    resp = make_response("")
    resp.headers["HX-Redirect"] = auth_uri  # a full-page visit to the sign-in page
    return resp


@bp.route("/email-oauth", methods=["GET", "POST"])
@csrf.exempt
def callback():
    """Where Microsoft sends the admin back after signing in (a form POST,
    or a GET with query parameters)."""
    params = (request.form if request.method == "POST" else request.args).to_dict()
    user_id = g.user.id if g.get("user") else None
    org_id = g.org.id if g.get("org") else None
    outcome = oauth_grant.complete(params.get("state", ""), params, user_id, org_id)
    # No flash() here: a form POST from the sign-in page carries no session
    # cookie, and a new session cookie would sign the admin out.
    draft = outcome.draft
    if draft is None:
        return render_template("connections/oauth_error.html", message=outcome.error), 400
    if outcome.error:
        oauth_grant.leave_notice(draft.id, "error", outcome.error)
    else:
        oauth_grant.leave_notice(draft.id, "success", f"Signed in as {outcome.name or outcome.username}. "
                                 "Now press Test and Save Connection.")
    # 303: the browser follows with a GET, which does carry the session cookie.
    if draft.connection_id:
        return redirect(url_for("connections.edit", api_name=draft.connection.api_name, draft=draft.id), code=303)
    return redirect(url_for("connections.new", draft=draft.id), code=303)


@bp.post("/settings/connections/<api_name>/migrate-graph")
@admin_required
def migrate_graph(api_name):
    """Migrate to Graph: test this OAuth (EWS) connection as Microsoft Graph; switch it only if that works."""
    conn = get_connection_or_404(api_name)
    if conn.protocol != "oauth":
        return render_template("connections/_test_status.html", draft_id=None, status={"state": "finished"},
                               action="Migrate to Graph", diagnosis={
                                   "code": "not_migratable", "message": f"{conn.name} uses {conn.protocol_label}.",
                                   "hint": "Only OAuth (Office 365) connections that use EWS can be migrated."})
    try:
        draft = oauth_grant.graph_migration_draft(conn, g.user, request.files.get("trusted_certificate"))
    except ValueError as e:  # an unusable certificate upload
        return render_template("connections/_test_status.html", draft_id=None, status={"state": "finished"},
                               action="Migrate to Graph", diagnosis={"code": "invalid_certificate",
                                                                     "message": str(e)})
    connection_test.enqueue(draft)
    current_app.logger.info("%s started migrating connection %s to Microsoft Graph", g.user.email, conn.api_name)
    return render_template("connections/_test_status.html", draft_id=draft.id, action="Migrate to Graph",
                           status={"state": "queued", "step": "Queued", "elapsed": 0})
