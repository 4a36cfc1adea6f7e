"""Sign in, sign out, organization switcher."""
from __future__ import annotations

import logging

from flask import Blueprint, abort, current_app, flash, redirect, render_template, request, url_for

from forms.auth import LoginForm
from models import User, utcnow
from services import queue

from .access import login_required, sign_in, switch_organization

bp = Blueprint("auth", __name__)
log = logging.getLogger(__name__)


def _throttle_key(email: str) -> str:
    return f"intake:login-fail:{request.remote_addr}:{email.lower()}"


def _too_many_attempts(email: str) -> bool:
    n = queue.connection().get(_throttle_key(email))
    return n is not None and int(n) >= current_app.config["LOGIN_MAX_ATTEMPTS"]


def _record_failure(email: str) -> None:
    r = queue.connection()
    key = _throttle_key(email)
    pipe = r.pipeline()
    pipe.incr(key)
    pipe.expire(key, current_app.config["LOGIN_WINDOW_SECONDS"])
    pipe.execute()


@bp.get("/login")
def login():
    """The sign-in page."""
    return render_template("auth/login.html", form=LoginForm(next=request.args.get("next", "")))


@bp.post("/login")
def login_post():
    """Check the password, with throttling per address and account."""
    form = LoginForm()
    if not form.validate():
        return render_template("auth/login.html", form=form), 400
    email = form.email.data.strip().lower()
    if _too_many_attempts(email):
        minutes = max(1, current_app.config["LOGIN_WINDOW_SECONDS"] // 60)
        form.email.errors.append(f"Too many failed sign-ins. Wait {minutes} minutes and try again.")
        log.warning("Sign-in throttled for %s from %s", email, request.remote_addr)
        return render_template("auth/login.html", form=form), 429
    user = User.get_or_none(User.email == email)
    if user is None or not user.is_active or not user.check_password(form.password.data):
        _record_failure(email)
        log.info("Failed sign-in for %s from %s", email, request.remote_addr)
        form.password.errors.append("The email address or password is not correct.")
        return render_template("auth/login.html", form=form), 401
    queue.connection().delete(_throttle_key(email))
    user.last_login_at = utcnow()
    user.save()
    sign_in(user)
    log.info("%s signed in", email)
    target = form.next.data or ""
    if not target.startswith("/") or target.startswith("//"):
        target = url_for("home.index")
    return redirect(target)


@bp.post("/logout")
def logout():
    """Sign out."""
    from flask import session

    session.clear()
    return redirect(url_for("auth.login"))


@bp.post("/organization/switch")
@login_required
def switch_org():
    """Act for another organization the user belongs to."""
    try:
        org_id = int(request.form.get("organization", ""))
    except ValueError:
        abort(400)
    if not switch_organization(org_id):
        abort(403)
    flash("Switched organization.", "info")
    return redirect(url_for("home.index"))
