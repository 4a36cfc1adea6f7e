"""forms/widgets.py renders exactly what WTForms' own widgets render.

The connection form's fields use faster copies of WTForms' widgets (the
Protocol swap re-renders a field group on every change of the select). These
tests render every ConnectionForm field with both and compare, so a WTForms
upgrade that changes either shows here.
"""
from __future__ import annotations

import pytest
import wtforms
from markupsafe import Markup
from werkzeug.datastructures import MultiDict
from wtforms.widgets import html_params as stock_html_params

from forms import widgets
from forms.connection import ConnectionForm

ATTRIBUTE_SETS = [
    {},
    {"id": "x", "name": "n", "type": "text", "value": ""},
    {"aria-describedby": "err-host hint-host", "data-shared": "1", "hx-preserve": "true", "aria-invalid": "true"},
    {"class_": "a b", "for_": "f", "data_x_y": 1, "aria_label": "l", "checked": True, "disabled": False},
    {"value": 'a"b<c>&\'d', "title": Markup('kept "raw" <b>'), "min": 0, "max": 65535, "step": None},
    {"hx-get": "/settings/connections/fields?a=1&b=2", "hx-include": "#connection-form [data-shared], #protocol"},
    {"value": "ünïcödé \\ shared@example.com", "placeholder": Markup("&amp; already escaped")},
]

FORMDATA = [
    MultiDict(),
    MultiDict({"protocol": "imap", "host": 'mail."x"<y>&z.example', "port": "993", "encryption": "starttls",
               "email_address": "a&b@example.com", "imap_auth": "xoauth2", "use_proxy": "y",
               "proxy_protocol": "https", "oauth_secret_expires": "2027-01-31"}),
    MultiDict({"protocol": "oauth", "port": "not a number", "oauth_secret_expires": "31/01/2027",
               "endpoint": "https://ex.example/EWS/Exchange.asmx", "source_folder": "Inbox\\Reports"}),
]


@pytest.mark.parametrize("attrs", ATTRIBUTE_SETS)
def test_html_params_is_wtforms_html_params(attrs):
    assert widgets.html_params(**attrs) == stock_html_params(**attrs)


def _stock(widget):
    """The WTForms widget our widget copies (its first WTForms base class)."""
    base = next(c for c in type(widget).__mro__[1:] if c.__module__.startswith("wtforms."))
    stock = base.__new__(base)
    stock.__dict__.update(widget.__dict__)
    return stock


@pytest.mark.parametrize("formdata", FORMDATA, ids=["empty", "imap", "invalid"])
def test_every_connection_field_renders_as_with_wtforms_widgets(app, formdata):
    with app.test_request_context("/"):
        form = ConnectionForm(formdata=formdata)
        form.validate()  # errors and flags as after a failed save
        compared = 0
        for field in form:
            for attrs in ATTRIBUTE_SETS[:2] + [{"aria-invalid": "true", "data-shared": "1"}]:
                attrs = {k: v for k, v in attrs.items() if k not in ("id", "name", "type", "value")}
                if isinstance(field, wtforms.RadioField):
                    for option in field:
                        assert option.widget(option, **attrs) == _stock(option.widget)(option, **attrs), field.name
                        compared += 1
                elif field.widget.__module__ == widgets.__name__:
                    assert field.widget(field, **attrs) == _stock(field.widget)(field, **attrs), field.name
                    compared += 1
        assert compared > 60  # the comparison is not vacuous


def test_the_connection_form_uses_the_fast_widgets(app):
    with app.test_request_context("/"):
        form = ConnectionForm()
        on_stock = [f.name for f in form if f.type not in ("TextAreaField", "CSRFTokenField", "RadioField")
                    and f.widget.__module__ != widgets.__name__]
        assert on_stock == []
        assert all(o.widget.__module__ == widgets.__name__ for o in form.encryption)
        # Templates tell fields apart by WTForms' class names.
        assert isinstance(form.protocol, wtforms.SelectField) and form.protocol.type == "SelectField"
