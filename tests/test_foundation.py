"""The skeleton: sign-in, access rules, secrets at rest, health."""
from __future__ import annotations

from tests.support.app_fixtures import AdminClient, csrf_token, login


def test_login_page_is_served(client):
    resp = client.get("/login")
    assert resp.status_code == 200
    assert b"Sign in to Intake" in resp.data
    assert b'<label for="email">Email</label>' in resp.data


def test_htmx_served_from_static(client):
    resp = client.get("/static/vendor/htmx-2.0.11.min.js")
    assert resp.status_code == 200
    assert b"htmx" in resp.data[:2000]
    resp.close()


def test_wrong_password_is_refused_and_throttled(app, client, make_admin):
    email, _, _ = make_admin()
    for _ in range(app.config["LOGIN_MAX_ATTEMPTS"]):
        assert login(client, email, "wrong password").status_code == 401
    resp = login(client, email, "correct horse battery")  # right, but too late
    assert resp.status_code == 429
    assert b"Too many failed sign-ins" in resp.data


def test_post_without_csrf_token_is_refused(app, make_admin):
    email, password, _ = make_admin()
    c = app.test_client()
    resp = c.post("/login", data={"email": email, "password": password})
    assert resp.status_code == 400
    assert b"security token" in resp.data


def test_admin_lands_on_inbound_email_connections(admin_client):
    resp = admin_client.get("/", follow_redirects=True)
    html = resp.get_data(as_text=True)
    assert "Inbound Email Connections" in html
    assert "Add Connection +" in html
    assert "Administrator Settings" in html


def test_navigation_administrator_settings_organization_connections(admin_client):
    html = admin_client.get("/settings/").get_data(as_text=True)
    assert 'href="/settings/organization"' in html
    html = admin_client.get("/settings/organization").get_data(as_text=True)
    assert 'href="/settings/connections/"' in html and "Inbound Email Connections" in html


def test_non_admin_gets_403_on_settings(app, make_admin):
    email, password, _ = make_admin(admin=False)
    c = app.test_client()
    login(c, email, password)
    for path in ("/settings/", "/settings/organization", "/settings/connections/", "/settings/connections/new"):
        assert c.get(path).status_code == 403, path


def test_signed_out_user_is_sent_to_login(client):
    resp = client.get("/settings/connections/")
    assert resp.status_code == 302 and "/login" in resp.headers["Location"]


def _make_connection(org, api_name="Phish", password="s3cret-Passw0rd!"):
    from models import EmailConnection, db

    with db.connection_context():
        return EmailConnection.create(organization=org, name="Phishing reports", api_name=api_name,
                                      protocol="imap", host="mail.example.com", port=993,
                                      email_address="phish@example.com", password=password,
                                      proxy_password="proxy-Secret-9", oauth_client_secret="client-Secret-7")


def test_secrets_are_encrypted_at_rest_and_never_rendered(admin_client):
    from models import db

    conn = _make_connection(admin_client.org)
    with db.connection_context():
        row = db.execute_sql('SELECT password, proxy_password, oauth_client_secret FROM email_connection WHERE id = ?'
                             .replace("?", db.param), (conn.id,)).fetchone()
    for raw, plain in zip(row, ("s3cret-Passw0rd!", "proxy-Secret-9", "client-Secret-7")):
        assert raw and plain not in raw and raw.startswith("gAAAA")  # a Fernet token
    pages = ["/settings/connections/", f"/settings/connections/{conn.api_name}",
             f"/settings/connections/{conn.api_name}/log",
             f"/settings/connections/fields?protocol=exchange&editing={conn.api_name}",
             f"/settings/connections/proxy-fields?editing={conn.api_name}"]
    for path in pages:
        html = admin_client.get(path).get_data(as_text=True)
        for plain in ("s3cret-Passw0rd!", "proxy-Secret-9", "client-Secret-7"):
            assert plain not in html, path


def test_admin_of_org_a_cannot_see_or_touch_org_b(app, admin_client, make_admin):
    _, _, other_org = make_admin()
    theirs = _make_connection(other_org, api_name="Theirs")
    mine = admin_client.get("/settings/connections/").get_data(as_text=True)
    assert "Theirs" not in mine
    assert admin_client.get(f"/settings/connections/{theirs.api_name}").status_code == 404
    assert admin_client.get(f"/settings/connections/{theirs.api_name}/log").status_code == 404
    assert admin_client.delete(f"/settings/connections/{theirs.api_name}").status_code == 404
    from models import EmailConnection, db
    with db.connection_context():
        assert EmailConnection.get_by_id(theirs.id)


def test_user_in_two_orgs_switches_organization(app, make_admin):
    from models import Membership, User, db

    email, password, org_a = make_admin()
    _, _, org_b = make_admin()
    with db.connection_context():
        Membership.create(user=User.get(User.email == email), organization=org_b, is_admin=True)
    _make_connection(org_b, api_name="OnlyInB")
    c = app.test_client()
    login(c, email, password)
    token = csrf_token(c, "/settings/")
    html = c.get("/settings/connections/").get_data(as_text=True)
    assert 'label for="org-switch"' in html
    resp = c.post("/organization/switch", data={"organization": org_b.id, "csrf_token": token})
    assert resp.status_code == 302
    assert "OnlyInB" in c.get("/settings/connections/").get_data(as_text=True)


def test_healthz_reports_database_and_redis(client):
    data = client.get("/healthz").get_json()
    assert data["database"] == "ok" and data["redis"] == "ok"
    assert "workers" in data and "scheduler" in data


def test_create_admin_command(runner):
    result = runner.invoke(args=["create-admin", "--email", "first@example.com", "--password", "a long password",
                                 "--org", "First Org"])
    assert result.exit_code == 0, result.output
    assert "first@example.com is an administrator of First Org" in result.output


def test_rotate_keys_keeps_secrets_readable(app, runner, admin_client):
    from cryptography.fernet import Fernet

    from models import EmailConnection, db
    from services import crypto

    conn = _make_connection(admin_client.org, api_name="Rotate")
    new_key = Fernet.generate_key().decode()
    crypto.configure(new_key + "," + app.config["ENCRYPTION_KEYS"])
    try:
        result = runner.invoke(args=["rotate-keys"])
        assert result.exit_code == 0, result.output
        crypto.configure(new_key)  # the old key is gone: rotated secrets still decrypt
        with db.connection_context():
            assert EmailConnection.get_by_id(conn.id).password.reveal() == "s3cret-Passw0rd!"
    finally:
        crypto.configure(app.config["ENCRYPTION_KEYS"])
