"""The browser fixture itself: sign in and reach the connections page."""
import pytest

from tests.support.browser import browser_login

pytestmark = pytest.mark.browser


def test_browser_signs_in_and_sees_add_connection(page, make_admin):
    email, password, _ = make_admin()
    browser_login(page, email, password)
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Administrator Settings").click()
    page.get_by_role("main").get_by_role("link", name="Organization", exact=True).click()
    page.get_by_role("main").get_by_role("link", name="Inbound Email Connections").click()
    assert page.get_by_role("link", name="Add Connection +").is_visible()
    assert page.js_errors == []


def test_wrong_password_shows_message_beside_field(page, make_admin):
    email, _, _ = make_admin()
    page.goto("/login")
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill("nope")
    page.get_by_role("button", name="Sign in").click()
    assert page.get_by_text("The email address or password is not correct.").is_visible()
