"""WTForms' widgets, rendering the same HTML faster.

The connection form's Protocol swap re-renders a field group on every change
of the Protocol select, and most of that time was WTForms' rendering:

- `html_params` builds each attribute with `Markup('{k}="{v}"').format(...)`,
  a pure-Python string.Formatter pass per attribute;
- `Input.__call__` (and Select's) find the field's flags with `dir()`, which
  collects and sorts every attribute name of the Flags object, per widget.

The widgets here are WTForms' own with those two steps done directly; the
HTML is the same, byte for byte. tests/test_widgets.py renders
every ConnectionForm field with these and with WTForms' stock widgets and
compares, so a WTForms upgrade that changes either shows there.
"""
from __future__ import annotations

import functools

from markupsafe import Markup, escape
from wtforms import widgets
from wtforms.widgets.core import clean_key


@functools.lru_cache(maxsize=256, typed=True)
def _attribute_name(key: str) -> Markup:
    # A handful of names (id, name, aria-describedby, ...) on every widget.
    return escape(clean_key(key))


def html_params(**kwargs) -> Markup:
    """wtforms.widgets.html_params with f-strings: keys sorted, `True` as a
    bare attribute, `False` left out, names and values escaped."""
    params = []
    for k, v in sorted(kwargs.items()):
        k = _attribute_name(k)
        if v is True:
            params.append(k)
        elif v is not False:
            v = escape(v)
            if '"' in v:  # only a value that was Markup already can still hold a bare quote
                v = v.replace('"', Markup("&quot;"))  # Markup: replace() escapes a plain str
            params.append(f'{k}="{v}"')
    return Markup(" ".join(params))


def _flags(field) -> dict:
    """The flags set on the field (maxlength, min, required, ...): what
    WTForms finds with dir(field.flags), as Flags itself defines none of
    the widgets' validation attributes."""
    flags = getattr(field, "flags", None)
    return vars(flags) if flags is not None else {}


class _Input(widgets.Input):
    """WTForms' Input.__call__ with the two steps above. The widgets below
    inherit from WTForms' widget first and this second, so their own
    __call__ (checked, hidden values, min/max, ...) runs, then this."""

    html_params = staticmethod(html_params)

    def __call__(self, field, **kwargs):
        kwargs.setdefault("id", field.id)
        kwargs.setdefault("type", self.input_type)
        if "value" not in kwargs:
            kwargs["value"] = field._value()
        datalist = getattr(field, "_datalist", None)
        if datalist is not None and "list" not in kwargs:
            kwargs["list"] = datalist if isinstance(datalist, str) else datalist.id
        for k, value in _flags(field).items():
            if k in self.validation_attrs and k not in kwargs:
                kwargs[k] = value() if callable(value) else value
        return Markup(f"<input {html_params(name=field.name, **kwargs)}>")


class TextInput(widgets.TextInput, _Input):
    pass


class PasswordInput(widgets.PasswordInput, _Input):
    pass


class NumberInput(widgets.NumberInput, _Input):
    pass


class DateInput(widgets.DateInput, _Input):
    pass


class FileInput(widgets.FileInput, _Input):
    pass


class HiddenInput(widgets.HiddenInput, _Input):
    pass


class CheckboxInput(widgets.CheckboxInput, _Input):
    pass


class RadioInput(widgets.RadioInput, _Input):
    pass


class Select(widgets.Select):
    """WTForms' Select.__call__ and render_option with the two steps above
    (they call WTForms' module-level html_params, so there is no hook).
    Choices in optgroups, which the connection form has none of, are left
    to WTForms."""

    def __call__(self, field, **kwargs):
        if field.has_groups():
            return super().__call__(field, **kwargs)
        kwargs.setdefault("id", field.id)
        if self.multiple:
            kwargs["multiple"] = True
        for k, value in _flags(field).items():
            if k in self.validation_attrs and k not in kwargs:
                kwargs[k] = value
        options = "".join(self.render_option(choice) for choice in field.iter_choices())
        return Markup(f"<select {html_params(name=field.name, **kwargs)}>{options}</select>")

    @classmethod
    def render_option(cls, choice, **kwargs):
        value = choice.value
        if isinstance(value, bool):
            value = str(value)
        options = {"value": value, **(choice.render_kw or {}), **kwargs}
        if choice.selected:
            options["selected"] = True
        label = escape(choice.label or choice.value)
        return Markup(f"<option {html_params(**options)}>{label}</option>")
