"""Administrator Settings > Organization > Inbound Email Connections."""
from __future__ import annotations

import logging

from flask import (Blueprint, abort, flash, g, make_response, render_template, request,
                   url_for)
from markupsafe import Markup

from forms.connection import DEFAULT_PORTS, ConnectionForm, protocol_fields_form
from jobs import connection_test, oauth_grant
from models import SECRET_FIELDS, ConnectionDraft, ConnectionLog, EmailConnection

from .access import admin_required

bp = Blueprint("connections", __name__, url_prefix="/settings/connections")
log = logging.getLogger(__name__)


def get_connection_or_404(api_name: str) -> EmailConnection:
    """Every lookup is scoped to the current organization."""
    conn = EmailConnection.get_or_none((EmailConnection.organization == g.org)
                                       & (EmailConnection.api_name == api_name))
    if conn is None:
        abort(404)
    return conn


# Columns the list never reads: the secrets (each would be decrypted for every
# row, on every 10-second refresh) and what only the edit form shows. With
# 1,000 connections, loading them cost more than the rest of the page. A
# column named here reads as its default on the list's rows: to show one in
# the list (or use it in oauth_health), take it out of this set.
_LIST_SKIPS = frozenset(SECRET_FIELDS) | {
    "description", "email_address", "source_folder", "host", "port", "encryption", "endpoint",
    "trusted_cert_pem", "proxy_protocol", "proxy_host", "proxy_port", "proxy_username", "proxy_cert_pem",
    "oauth_client_id", "oauth_tenant_id", "oauth_authority_host", "graph_endpoint", "fetch_interval", "routing",
    "max_message_size", "created_at", "updated_at",
}
_LIST_COLUMNS = [f for f in EmailConnection._meta.sorted_fields if f.name not in _LIST_SKIPS]


PER_PAGE = 50


def _page() -> int:
    try:
        return max(1, int(request.args.get("page", 1)))
    except ValueError:
        return 1


def _connections(page: int = 1):
    """One page of the organization's connections for the list (not for
    editing: see _LIST_SKIPS). Paged so the list (and its live refresh)
    stays fast for organizations with hundreds of mailboxes."""
    return (EmailConnection.select(*_LIST_COLUMNS).where(EmailConnection.organization == g.org)
            .order_by(EmailConnection.name).paginate(page, PER_PAGE))


@bp.app_template_filter("utc_time")
def utc_time(value) -> Markup:
    """The `when` macro of _macros.html as a filter, for the list: three
    macro calls per row cost more than the rest of a row with 1,000 rows."""
    if not value:
        return Markup("\u2014")
    return Markup(f'<time datetime="{value.isoformat()}Z">{value:%Y-%m-%d %H:%M:%S} UTC</time>')


@bp.get("/")
@admin_required
def index():
    """The list, with Add Connection +."""
    page = _page()
    total = EmailConnection.select().where(EmailConnection.organization == g.org).count()
    pages = max(1, -(-total // PER_PAGE))
    return render_template("connections/index.html", connections=_connections(page), page=page, pages=pages,
                           total=total)


@bp.get("/rows")
@admin_required
def rows():
    """The list's rows alone, for the live refresh."""
    return render_template("connections/_rows.html", connections=_connections(_page()))


@bp.get("/new")
@admin_required
def new():
    """The Add Connection form (or its draft, back from Grant Access)."""
    return _form_page(None)


@bp.get("/<api_name>")
@admin_required
def edit(api_name):
    """The Edit Connection form: secrets are never put back in the page."""
    return _form_page(get_connection_or_404(api_name))


def _form_page(conn: EmailConnection | None):
    draft = _own_draft(request.args.get("draft"), conn)
    notice = oauth_grant.take_notice(draft.id) if draft else None  # back from Grant Access
    if notice:
        flash(notice[1], notice[0])
    source = _Values(draft.values()) if draft else conn
    form = ConnectionForm(formdata=None, obj=source, editing=conn)
    if source is not None:
        form.use_proxy.data = "1" if source.proxy_enabled else ""
    for secret in (form.password, form.proxy_password, form.oauth_client_secret):
        secret.data = ""
    account = {"username": source.oauth_account_username, "name": source.oauth_account_name} if source else {}
    return render_template("connections/form.html", form=form, conn=conn, draft=draft, account=account)


class _Values:
    """Draft values as attributes, for WTForms' obj=; dates parsed back."""

    def __init__(self, values: dict):
        import datetime as dt

        self.__dict__.update(values)
        if isinstance(values.get("oauth_secret_expires"), str):
            self.oauth_secret_expires = dt.date.fromisoformat(values["oauth_secret_expires"])

    def __getattr__(self, name):
        return ""


def _own_draft(draft_id: str | None, conn: EmailConnection | None) -> ConnectionDraft | None:
    """A draft of this organization (and of this connection when editing)."""
    if not draft_id:
        return None
    draft = ConnectionDraft.get_or_none((ConnectionDraft.id == draft_id) & (ConnectionDraft.organization == g.org))
    if draft is None or draft.connection_id != (conn.id if conn else None):
        return None
    return draft


@bp.get("/fields")
@admin_required
def protocol_fields():
    """The Protocol's field group, swapped in place; shared fields keep what was typed."""
    form = protocol_fields_form(request.args, editing=_editing_from_args())
    if form.protocol.data == "imap" and not request.args.get("port"):
        form.port.data = DEFAULT_PORTS.get(form.encryption.data or "ssl")
    resp = make_response(render_template("connections/_protocol_fields.html", form=form,
                                         conn=form.editing))
    resp.headers["Vary"] = "HX-Request"
    return resp


@bp.get("/proxy-fields")
@admin_required
def proxy_fields():
    """The inline Proxy section (Proxy button)."""
    form = ConnectionForm(formdata=None, editing=_editing_from_args())
    form.use_proxy.data = "" if request.args.get("hide") else "1"
    return render_template("connections/_proxy_toggle.html", form=form, conn=form.editing)


@bp.post("/test")
@admin_required
def test_new():
    """Test and Save Connection for a new connection."""
    return _start_test(None)


@bp.post("/<api_name>/test")
@admin_required
def test_existing(api_name):
    """Test and Save Connection for a saved connection."""
    return _start_test(get_connection_or_404(api_name))


def draft_from_form(conn: EmailConnection | None):
    """Validate the posted form and store it as a draft. Values start from
    the saved connection, or from a draft: the last failed test's
    (`retry_draft`, so a certificate uploaded for one failure is kept while
    the next is fixed) or the one the form came back with after Grant
    Access. Blank secret fields keep what is stored."""
    draft = _own_draft(request.form.get("retry_draft") or request.form.get("draft"), conn)
    stored = draft.values() if draft else (conn.stored_values() if conn else None)
    form = ConnectionForm(editing=conn if draft is None else _Values(stored))
    values = None
    if form.validate():
        _check_api_name_free(form, conn)
        if not form.api_name.errors:
            values = form.to_values(stored)
    if values is None:
        return None, form
    new_draft = ConnectionDraft.make(g.org, values, connection=conn, user=g.user)
    return new_draft, form


def _start_test(conn: EmailConnection | None):
    draft, form = draft_from_form(conn)
    if draft is None:
        return render_template("connections/_form_errors.html", form=form)
    connection_test.enqueue(draft)
    log.info("%s started a test of connection %s", g.user.email, form.api_name.data)
    return render_template("connections/_test_status.html", draft_id=draft.id,
                           status={"state": "queued", "step": "Queued", "elapsed": 0}, form=form)


def _check_api_name_free(form: ConnectionForm, conn: EmailConnection | None) -> None:
    clash = EmailConnection.select().where((EmailConnection.organization == g.org)
                                           & (EmailConnection.api_name == form.api_name.data.strip()))
    if conn is not None:
        clash = clash.where(EmailConnection.id != conn.id)
    if clash.exists():
        form.api_name.errors.append("This API Name is already used by another connection in this organization.")


@bp.get("/tests/<draft_id>")
@admin_required
def test_status(draft_id):
    """The self-replacing status partial, polled while the test runs."""
    action = request.args.get("action") if request.args.get("action") in ("Migrate to Graph",) else None
    draft = ConnectionDraft.get_or_none((ConnectionDraft.id == draft_id) & (ConnectionDraft.organization == g.org))
    status = connection_test.status(draft_id)
    result = status.get("result") or {}
    if draft is None and not result:
        abort(404)
    if result.get("ok"):
        if not EmailConnection.select().where((EmailConnection.id == result["connection_id"])
                                              & (EmailConnection.organization == g.org)).exists():
            abort(404)
        saved = "Connection moved to Microsoft Graph and saved" if result.get("migrated") else "Connection saved"
        flash(f"{saved}. {result['message']}", "success")
        resp = make_response("")
        resp.headers["HX-Redirect"] = url_for("connections.index")
        return resp
    return render_template("connections/_test_status.html", draft_id=draft_id, status=status,
                           diagnosis=result.get("diagnosis"), action=action)


@bp.delete("/<api_name>")
@admin_required
def delete(api_name):
    """Delete the connection; mail and incidents it brought in stay."""
    conn = get_connection_or_404(api_name)
    log.info("%s deleted connection %s", g.user.email, conn.api_name)
    conn.delete_instance()
    return ""


@bp.get("/<api_name>/log")
@admin_required
def connection_log(api_name):
    """The connection's log, newest first; the table refreshes itself."""
    conn = get_connection_or_404(api_name)
    entries = conn.logs.order_by(ConnectionLog.created_at.desc(), ConnectionLog.id.desc()).limit(200)
    template = "connections/_log_rows.html" if request.htmx else "connections/log.html"
    resp = make_response(render_template(template, conn=conn, entries=entries))
    resp.headers["Vary"] = "HX-Request"
    return resp


def _editing_from_args() -> EmailConnection | None:
    api_name = request.args.get("editing")
    return get_connection_or_404(api_name) if api_name else None
