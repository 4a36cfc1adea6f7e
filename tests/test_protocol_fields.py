"""The Protocol swap fragment builds a form of only the chosen group's
fields; pinned against rendering with the whole ConnectionForm."""
from __future__ import annotations

import itertools
from html.parser import HTMLParser
from urllib.parse import urlencode

import pytest

from forms.connection import GROUP_FIELDS, ConnectionForm, protocol_group

BASE = "/settings/connections"


class _Labels(HTMLParser):
    """Controls of a fragment without a <label> (for= or around them)."""

    def __init__(self):
        super().__init__()
        self.label_for, self.controls, self.open_labels = set(), [], 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "label":
            self.open_labels += 1
            if a.get("for"):
                self.label_for.add(a["for"])
        elif tag in ("input", "select", "textarea") and a.get("type") != "hidden":
            self.controls.append((a.get("id"), self.open_labels > 0))

    def handle_endtag(self, tag):
        if tag == "label":
            self.open_labels -= 1

    def unlabelled(self):
        return [i for i, wrapped in self.controls if not wrapped and i not in self.label_for]


@pytest.fixture
def stored_connection(admin_client, tmp_path):
    """A saved connection with everything the groups show about one:
    stored secrets, an uploaded server certificate, a client certificate."""
    from models import EmailConnection, db
    from tests.support.certs import make_cert

    pem = make_cert(tmp_path, "trusted").cert_pem.decode()
    with db.connection_context():
        return EmailConnection.create(
            organization=admin_client.org, name="Stored", api_name="Stored", protocol="exchange",
            email_address="stored@example.com", password="pw", proxy_password="proxy-pw",
            oauth_client_secret="cs", trusted_cert_pem=pem, oauth_cert_pem=pem, proxy_cert_pem=pem)


def test_each_group_renders_as_with_the_whole_form(admin_client, stored_connection, monkeypatch):
    """The swap builds only its group's fields; the HTML is what the whole
    ConnectionForm renders, for every group and what changes one."""
    import views.connections

    variants = []
    for protocol, imap_auth, use_proxy, editing in itertools.product(
            ("imap", "exchange", "oauth", "graph", "", "bogus", None), (None, "password", "xoauth2"),
            (None, "1"), (None, "Stored")):
        args = {"protocol": protocol, "imap_auth": imap_auth, "use_proxy": use_proxy, "editing": editing,
                "email_address": "kept@example.com"}
        variants.append(f"{BASE}/fields?" + urlencode({k: v for k, v in args.items() if v is not None}))
    variants.append(f"{BASE}/fields?protocol=imap&encryption=starttls&port=&host=h.example.com")
    variants.append(f"{BASE}/fields?protocol=imap&protocol=graph&imap_auth=xoauth2&imap_auth=password")

    swapped = {}
    for path in variants:
        resp = admin_client.get(path, headers={"HX-Request": "true"})
        assert resp.status_code == 200, path
        swapped[path] = resp.get_data(as_text=True)
        parser = _Labels()
        parser.feed(swapped[path])
        assert parser.controls and parser.unlabelled() == [], path

    monkeypatch.setattr(views.connections, "protocol_fields_form",
                        lambda formdata, editing=None: ConnectionForm(formdata=formdata, editing=editing))
    for path in variants:
        whole = admin_client.get(path, headers={"HX-Request": "true"}).get_data(as_text=True)
        assert swapped[path] == whole, path


def test_groups_follow_the_template_choice():
    assert protocol_group(None, None) == protocol_group("", "xoauth2") == protocol_group("IMAP", None) == "exchange"
    assert protocol_group("imap", None) == protocol_group("imap", "password") == "imap"
    assert protocol_group("imap", "xoauth2") == "imap_xoauth2"
    assert protocol_group("oauth", "xoauth2") == "oauth" and protocol_group("graph", None) == "graph"
    assert set(GROUP_FIELDS) == {"imap", "imap_xoauth2", "exchange", "oauth", "graph"}
