"""Who is signed in, which organization they act for, and the guards every
view uses. Every query of organization data goes through `g.org`."""
from __future__ import annotations

import functools

from flask import abort, g, redirect, request, session, url_for

from models import Membership, Organization, User


def init_app(app):
    @app.before_request
    def _load_user():
        g.user = g.org = g.membership = None
        uid = session.get("uid")
        if uid is None:
            return
        user = User.get_or_none((User.id == uid) & (User.is_active == True))  # noqa: E712
        if user is None or session.get("pw") != user.password_hash[-16:]:
            # Deleted, disabled, or password changed since sign-in.
            session.clear()
            return
        g.user = user
        memberships = list(user.memberships())
        g.memberships = memberships
        chosen = next((m for m in memberships if m.organization_id == session.get("org_id")), None)
        chosen = chosen or (memberships[0] if memberships else None)
        if chosen is not None:
            g.membership, g.org = chosen, chosen.organization
            session["org_id"] = chosen.organization_id

    @app.context_processor
    def _inject():
        return {"current_user": g.get("user"), "current_org": g.get("org"),
                "is_admin": bool(g.get("membership") and g.membership.is_admin),
                "memberships": g.get("memberships", [])}


def sign_in(user: User) -> None:
    session.clear()
    session.permanent = True
    session["uid"] = user.id
    # A slice of the hash: changing the password signs out other sessions.
    session["pw"] = user.password_hash[-16:]


def login_required(view):
    @functools.wraps(view)
    def wrapped(*args, **kwargs):
        if g.get("user") is None:
            return redirect(url_for("auth.login", next=request.full_path if request.method == "GET" else None))
        return view(*args, **kwargs)
    return wrapped


def admin_required(view):
    """Settings are for the current organization's administrators only."""
    @functools.wraps(view)
    @login_required
    def wrapped(*args, **kwargs):
        if g.membership is None or not g.membership.is_admin:
            abort(403)
        return view(*args, **kwargs)
    return wrapped


def switch_organization(org_id: int) -> bool:
    m = Membership.get_or_none((Membership.user == g.user) & (Membership.organization == org_id))
    if m is None:
        return False
    session["org_id"] = m.organization_id
    return True


def create_admin(email: str, password: str, org_name: str) -> tuple[User, Organization]:
    org, _ = Organization.get_or_create(name=org_name)
    user = User.get_or_none(User.email == email.lower())
    if user is None:
        user = User(email=email.lower())
    user.set_password(password)
    user.save()
    m, _ = Membership.get_or_create(user=user, organization=org)
    if not m.is_admin:
        m.is_admin = True
        m.save()
    return user, org
