"""The Add/Edit Connection form, in the vendor's wording.

One form holds every protocol's fields; `validate()` checks only the fields
of the chosen Protocol (and the proxy when it is shown), so a field group
that is not on the page never blocks a save."""
from __future__ import annotations

import re
import uuid
from urllib.parse import urlsplit

import flask_wtf.file
import wtforms
from flask_wtf import FlaskForm
from flask_wtf.file import FileSize
from wtforms import TextAreaField
from wtforms.validators import InputRequired, Length, NumberRange, Optional, Regexp

from models import PROTOCOLS

from . import widgets


# WTForms' fields with the widgets of forms/widgets.py: the same HTML, built
# faster. They keep WTForms' class names: templates tell fields apart by
# `field.type` (the class name).
class StringField(wtforms.StringField):
    widget = widgets.TextInput()


class PasswordField(wtforms.PasswordField):
    widget = widgets.PasswordInput()


class IntegerField(wtforms.IntegerField):
    widget = widgets.NumberInput()


class DateField(wtforms.DateField):
    widget = widgets.DateInput()


class HiddenField(wtforms.HiddenField):
    widget = widgets.HiddenInput()


class BooleanField(wtforms.BooleanField):
    widget = widgets.CheckboxInput()


class SelectField(wtforms.SelectField):
    widget = widgets.Select()


class RadioField(wtforms.RadioField):
    option_widget = widgets.RadioInput()  # radios() in _macros.html renders the options one by one


class FileField(flask_wtf.file.FileField):
    widget = widgets.FileInput()


ENCRYPTIONS = [("ssl", "SSL/TLS"), ("starttls", "STARTTLS"), ("none", "None")]
DEFAULT_PORTS = {"ssl": 993, "starttls": 143, "none": 143}
ROUTINGS = [("incident", "Create an incident for each email"),
            ("case", "Add to an existing case when it replies or is tagged, else create an incident"),
            ("inbox", "Keep in the Inbox for an analyst")]

_EMAIL = re.compile(r"^[^@\s\\]+@[^@\s\\]+\.[^@\s\\]+$")
_DOMAIN_USER = re.compile(r"^[^@\s\\]+\\[^@\s\\]+$")  # DOMAIN\user
_HOST = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)*\.?$")
_TENANT_DOMAIN = re.compile(r"^[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$")
API_NAME_RE = r"^[A-Za-z][A-Za-z0-9_]*$"
CERT_SIZE = 64 * 1024


def suggest_api_name(name: str) -> str:
    """'Phishing reports (EU)' -> 'Phishing_reports_EU'."""
    s = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")
    if s and not s[0].isalpha():
        s = "C_" + s
    return s[:80]


def mailbox_address_error(value: str) -> str | None:
    """The seed's three forms: user@x.com, primary@x.com\\shared@x.com,
    domain\\user\\shared@x.com. The shared part must be user@domain."""
    value = value.strip()
    if "\\" not in value:
        return None if _EMAIL.match(value) else "Enter an email address such as user@example.com."
    login, _, shared = value.rpartition("\\")
    if not _EMAIL.match(shared):
        return "The shared mailbox (after the last \\) must be an email address such as shared@example.com."
    if _EMAIL.match(login) or _DOMAIN_USER.match(login):
        return None
    return ("For a shared mailbox use primary@example.com\\shared@example.com "
            "or domain\\user\\shared@example.com.")


def host_error(value: str) -> str | None:
    import ipaddress

    v = value.strip()
    try:
        ipaddress.ip_address(v.strip("[]"))
        return None
    except ValueError:
        pass
    if _HOST.match(v):
        return None
    return "Enter a host name (mail.example.com) or an IP address, without https:// or a path."


def endpoint_error(value: str) -> str | None:
    parts = urlsplit(value.strip())
    if parts.scheme != "https":
        return "The Endpoint must start with https://, for example https://mail.example.com/EWS/Exchange.asmx."
    if not parts.hostname or host_error(parts.hostname):
        return "The Endpoint must name a host: https://<hostname>/<endpoint>."
    if parts.path in ("", "/"):
        return "The Endpoint needs a path after the host name, for example /EWS/Exchange.asmx."
    if parts.username or parts.password:
        return "Do not put a user name or password in the Endpoint; use the Email Address and Password fields."
    return None


def _guid_error(value: str) -> str | None:
    try:
        uuid.UUID(value.strip())
        return None
    except ValueError:
        return "Enter the ID as shown in Microsoft Entra, like 00000000-0000-0000-0000-000000000000."


class ConnectionForm(FlaskForm):
    # Mailbox
    name = StringField("Name", validators=[InputRequired("Enter a name for this connection."), Length(max=120)])
    api_name = StringField("API Name", validators=[
        InputRequired("Enter an API name."), Length(max=80, message="Use at most 80 characters."),
        Regexp(API_NAME_RE, message="Use letters, digits and underscores, starting with a letter.")])
    description = TextAreaField("Description", validators=[Optional(), Length(max=2000)])
    # Connection Details
    protocol = SelectField("Protocol", choices=list(PROTOCOLS.items()), default="exchange")
    email_address = StringField("Email Address", validators=[Optional(), Length(max=512)])
    password = PasswordField("Password", validators=[Optional(), Length(max=1024)])
    source_folder = StringField("Source Folder", validators=[Optional(), Length(max=512)])
    host = StringField("Host Name", validators=[Optional(), Length(max=255)])
    port = IntegerField("Port", validators=[Optional(), NumberRange(1, 65535, "Enter a port from 1 to 65535.")])
    encryption = RadioField("Encryption", choices=ENCRYPTIONS, default="ssl")
    imap_auth = SelectField("Authentication", choices=[("password", "Password"), ("xoauth2", "OAuth 2.0 (XOAUTH2)")],
                            default="password")
    endpoint = StringField("Endpoint", validators=[Optional(), Length(max=1024)])
    trusted_certificate = FileField("Certificate file", validators=[FileSize(CERT_SIZE)])
    remove_trusted_certificate = BooleanField("Stop trusting the uploaded certificate")
    # Proxy
    use_proxy = HiddenField(default="")
    proxy_protocol = SelectField("Proxy Protocol", choices=[("http", "HTTP"), ("https", "HTTPS")], default="http")
    proxy_host = StringField("Proxy Host Name", validators=[Optional(), Length(max=255)])
    proxy_port = IntegerField("Proxy Port", validators=[Optional(), NumberRange(1, 65535, "Enter a port from 1 to 65535.")])
    proxy_username = StringField("Proxy User name", validators=[Optional(), Length(max=255)])
    proxy_password = PasswordField("Proxy Password", validators=[Optional(), Length(max=1024)])
    proxy_certificate = FileField("Proxy certificate file", validators=[FileSize(CERT_SIZE)])
    # OAuth (Office 365) / Microsoft Graph
    oauth_client_id = StringField("Application (Client) ID", validators=[Optional(), Length(max=64)])
    oauth_tenant_id = StringField("Directory (Tenant) ID", validators=[Optional(), Length(max=255)])
    oauth_client_auth = RadioField("Client authentication", choices=[("secret", "Client secret"),
                                                                     ("certificate", "Certificate")],
                                   default="secret")
    oauth_client_secret = PasswordField("Client secret", validators=[Optional(), Length(max=1024)])
    oauth_secret_expires = DateField("Client secret expires", validators=[Optional()])
    oauth_certificate = FileField("Certificate (PEM or PFX)", validators=[FileSize(CERT_SIZE)])
    oauth_private_key = FileField("Private key (PEM, when not inside the certificate)", validators=[FileSize(CERT_SIZE)])
    oauth_pfx_passphrase = PasswordField("Certificate passphrase", validators=[Optional(), Length(max=1024)])
    oauth_access = SelectField("Access", choices=[("delegated", "Delegated (Grant Access as a user)"),
                                                  ("application", "Application (app-only)")], default="delegated")
    oauth_authority_host = StringField("Authority Host", default="https://login.microsoftonline.com",
                                       validators=[Optional(), Length(max=255)])
    graph_endpoint = StringField("Graph Endpoint", default="https://graph.microsoft.com",
                                 validators=[Optional(), Length(max=255)])
    # Fetching
    fetch_interval = IntegerField("Fetch every (seconds)", default=60,
                                  validators=[Optional(), NumberRange(15, 86400, "Use 15 to 86400 seconds.")])
    routing = SelectField("New email", choices=ROUTINGS, default="incident")

    def __init__(self, *args, editing=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.editing = editing  # the stored connection, or None when adding

    # -- validation -----------------------------------------------------
    def _require(self, field, message: str) -> bool:
        if field.data in (None, "") or (isinstance(field.data, str) and not field.data.strip()):
            field.errors.append(message)
            return False
        return True

    def _stored(self, attr: str) -> bool:
        return bool(self.editing is not None and getattr(self.editing, attr))

    def _check(self, field, error: str | None) -> None:
        if error:
            field.errors.append(error)

    def validate(self, extra_validators=None) -> bool:
        ok = super().validate(extra_validators)
        for f in self:
            f.errors = list(f.errors)
        protocol = self.protocol.data
        checks = {"imap": self._validate_imap, "exchange": self._validate_exchange,
                  "oauth": self._validate_oauth, "graph": self._validate_oauth}
        checks.get(protocol, lambda: None)()
        if protocol in ("exchange", "oauth", "graph") and self.use_proxy.data:
            self._validate_proxy()
        return ok and not any(f.errors for f in self)

    def _validate_secret(self, field, stored_attr: str, message: str) -> None:
        if not (field.data or "").strip() and not self._stored(stored_attr):
            field.errors.append(message)

    def _validate_imap(self) -> None:
        if self._require(self.host, "Enter the IMAP server's host name or IP address."):
            self._check(self.host, host_error(self.host.data))
        if self.port.data is None and not self.port.errors:
            self.port.data = DEFAULT_PORTS.get(self.encryption.data, 993)
        if self._require(self.email_address, "Enter the email address to sign in with."):
            self._check(self.email_address, mailbox_address_error(self.email_address.data))
        if self.imap_auth.data == "password":
            self._validate_secret(self.password, "password", "Enter the password for this email address.")
        else:
            self._validate_oauth_app()

    def _validate_exchange(self) -> None:
        if self._require(self.endpoint, "Enter the EWS endpoint, like https://mail.example.com/EWS/Exchange.asmx."):
            self._check(self.endpoint, endpoint_error(self.endpoint.data))
        if self._require(self.email_address, "Enter the email address of the mailbox."):
            self._check(self.email_address, mailbox_address_error(self.email_address.data))
        self._validate_secret(self.password, "password", "Enter the password for this email address.")

    def _validate_oauth(self) -> None:
        if self.protocol.data == "oauth" and self._require(
                self.endpoint, "Enter the EWS endpoint, like https://outlook.office365.com/EWS/Exchange.asmx."):
            self._check(self.endpoint, endpoint_error(self.endpoint.data))
        self._validate_oauth_app()
        if self._require(self.email_address, "Enter the email address of the mailbox."):
            self._check(self.email_address, mailbox_address_error(self.email_address.data))

    def _validate_oauth_app(self) -> None:
        """The Entra app registration fields (OAuth, Graph, IMAP XOAUTH2)."""
        if self._require(self.oauth_client_id, "Enter the Application (Client) ID of your Microsoft Entra app."):
            self._check(self.oauth_client_id, _guid_error(self.oauth_client_id.data))
        tenant = (self.oauth_tenant_id.data or "").strip()
        if tenant and _guid_error(tenant) and not _TENANT_DOMAIN.match(tenant):
            self.oauth_tenant_id.errors.append(
                "Enter the Directory (Tenant) ID as a GUID or a domain such as contoso.onmicrosoft.com, "
                "or leave it blank for a multi-tenant app.")
        if self.oauth_access.data == "application" and not tenant:
            self.oauth_tenant_id.errors.append(
                "Application (app-only) access needs the Directory (Tenant) ID of the mailbox's tenant.")
        if self.oauth_client_auth.data == "secret":
            self._validate_secret(self.oauth_client_secret, "oauth_client_secret",
                                  "Enter the client secret's Value (not its Secret ID).")
        elif not self.oauth_certificate.data and not self._stored("oauth_cert_pem"):
            self.oauth_certificate.errors.append("Upload the certificate registered with your Entra app.")
        for field in (self.oauth_authority_host, self.graph_endpoint):
            value = (field.data or "").strip()
            if value:
                parts = urlsplit(value)
                if parts.scheme != "https" or not parts.hostname or parts.path not in ("", "/"):
                    field.errors.append("Enter an https:// address with no path, like https://login.microsoftonline.com.")

    def _validate_proxy(self) -> None:
        if self._require(self.proxy_host, "Enter the proxy's host name or IP address."):
            self._check(self.proxy_host, host_error(self.proxy_host.data))
        if self.proxy_port.data is None and not self.proxy_port.errors:
            self.proxy_port.errors.append("Enter the proxy port, for example 3128 or 8080.")
        has_password = bool((self.proxy_password.data or "").strip()) or self._stored("proxy_password")
        if has_password and not (self.proxy_username.data or "").strip():
            self.proxy_username.errors.append("Enter the Proxy User name: it is required when a proxy password is set.")

    # -- turning the form into stored values ------------------------------
    def to_values(self, stored: dict | None) -> dict | None:
        """The draft's values: the stored connection's (when editing), then
        what was typed. Blank secret fields keep the stored secret; uploads
        are validated here so their errors show beside their field. Returns
        None (with field errors set) when an upload is not usable."""
        values = dict(stored or {})
        protocol = self.protocol.data
        values.update(
            name=self.name.data.strip(), api_name=self.api_name.data.strip(),
            description=(self.description.data or "").strip(), protocol=protocol,
            email_address=(self.email_address.data or "").strip(),
            source_folder=(self.source_folder.data or "").strip().strip("/"),
            fetch_interval=self.fetch_interval.data or values.get("fetch_interval") or 60,
            routing=self.routing.data,
        )
        if self.password.data:
            values["password"] = self.password.data
        if protocol == "imap":
            values.update(host=self.host.data.strip(), port=self.port.data, encryption=self.encryption.data,
                          imap_auth=self.imap_auth.data, proxy_enabled=False)
        else:
            values.update(endpoint=(self.endpoint.data or "").strip(),
                          proxy_enabled=bool(self.use_proxy.data))
            if self.use_proxy.data:
                values.update(proxy_protocol=self.proxy_protocol.data, proxy_host=self.proxy_host.data.strip(),
                              proxy_port=self.proxy_port.data,
                              proxy_username=(self.proxy_username.data or "").strip())
                if self.proxy_password.data:
                    values["proxy_password"] = self.proxy_password.data
                if not values["proxy_username"]:
                    values["proxy_password"] = ""
        if protocol in ("oauth", "graph") or (protocol == "imap" and self.imap_auth.data == "xoauth2"):
            self._oauth_values(values)
        if self.remove_trusted_certificate.data:
            values["trusted_cert_pem"] = ""
        ok = self._upload(self.trusted_certificate, values, "trusted_cert_pem", add=True)
        ok = self._upload(self.proxy_certificate, values, "proxy_cert_pem") and ok
        ok = self._client_certificate(values) and ok
        return values if ok else None

    def _oauth_values(self, values: dict) -> None:
        values.update(
            oauth_client_id=self.oauth_client_id.data.strip(),
            oauth_tenant_id=(self.oauth_tenant_id.data or "").strip(),
            oauth_client_auth=self.oauth_client_auth.data,
            oauth_access=self.oauth_access.data,
            oauth_secret_expires=self.oauth_secret_expires.data.isoformat() if self.oauth_secret_expires.data else None,
            oauth_authority_host=(self.oauth_authority_host.data or "").strip().rstrip("/")
            or "https://login.microsoftonline.com",
            graph_endpoint=(self.graph_endpoint.data or "").strip().rstrip("/") or "https://graph.microsoft.com",
        )
        if self.oauth_client_secret.data:
            values["oauth_client_secret"] = self.oauth_client_secret.data.strip()

    def _upload(self, field, values: dict, key: str, add: bool = False) -> bool:
        """`add`: trusted in addition to the certificates already stored
        (server certificates); otherwise the upload replaces (the proxy's)."""
        data = _read(field)
        if data is None:
            return True
        from connectors.tls import add_certificates, load_certificate_upload

        try:
            pem = load_certificate_upload(data)
            values[key] = add_certificates(values.get(key) or "", pem) if add else pem
            return True
        except ValueError as e:
            field.errors.append(str(e))
            return False

    def _client_certificate(self, values: dict) -> bool:
        cert = _read(self.oauth_certificate)
        if cert is None:
            return True
        from connectors.oauth import load_client_certificate

        try:
            loaded = load_client_certificate(cert, _read(self.oauth_private_key), self.oauth_pfx_passphrase.data or "")
        except ValueError as e:
            self.oauth_certificate.errors.append(str(e))
            return False
        values["oauth_cert_pem"] = loaded.cert_pem
        values["oauth_private_key"] = loaded.private_key_pem
        return True


def _read(field) -> bytes | None:
    storage = field.data
    if not storage or not getattr(storage, "filename", ""):
        return None
    data = storage.read()
    return data or None


# -- the Protocol swap ---------------------------------------------------
# Changing the Protocol (or IMAP's Authentication) re-renders one field group
# (views.connections.protocol_fields), on every change of the select. Binding
# and processing the whole form for it cost more than rendering the group, so
# the swap uses a form holding only the fields its group renders. The groups
# mirror templates/connections/_protocol_fields.html and the templates it
# includes: a field missing here is None on the group's form and fails the
# render loudly, and tests/test_protocol_fields.py renders every group with
# the whole form too and compares.
_OAUTH_APP = ("oauth_client_id", "oauth_tenant_id", "oauth_access", "oauth_client_auth", "oauth_client_secret",
              "oauth_secret_expires", "oauth_certificate", "oauth_private_key", "oauth_pfx_passphrase",
              "oauth_authority_host", "graph_endpoint")  # _oauth_app.html
_PROXY = ("use_proxy", "proxy_protocol", "proxy_host", "proxy_port", "proxy_username",
          "proxy_password")  # _proxy_section.html
# protocol: _protocol_fields.html; remove_trusted_certificate: _trusted_cert.html
_EVERY_GROUP = ("protocol", "email_address", "source_folder", "remove_trusted_certificate")
GROUP_FIELDS = {
    "imap": _EVERY_GROUP + ("host", "encryption", "port", "imap_auth", "password"),
    "imap_xoauth2": _EVERY_GROUP + ("host", "encryption", "port", "imap_auth") + _OAUTH_APP,
    "exchange": _EVERY_GROUP + ("endpoint", "password") + _PROXY,
    "oauth": _EVERY_GROUP + ("endpoint",) + _OAUTH_APP + _PROXY,
    "graph": _EVERY_GROUP + _OAUTH_APP + _PROXY,
}


def protocol_group(protocol: str | None, imap_auth: str | None) -> str:
    """The GROUP_FIELDS key of what _protocol_fields.html shows for these
    submitted values (first of each; missing ones take the fields' defaults,
    as WTForms does)."""
    protocol = protocol or "exchange"
    if protocol == "imap":
        return "imap_xoauth2" if imap_auth == "xoauth2" else "imap"
    return protocol if protocol in ("oauth", "graph") else "exchange"


class _GroupForm(ConnectionForm):
    class Meta:
        # The group renders no CSRF token and is never validated or saved
        # (CSRFProtect still guards every POST); generating and signing a
        # token for it was wasted work on each swap.
        csrf = False


def _group_form(group: str, keep: tuple[str, ...]) -> type[ConnectionForm]:
    fields = {name for name in dir(ConnectionForm)
              if not name.startswith("_") and hasattr(getattr(ConnectionForm, name), "_formfield")}
    unknown = set(keep) - fields
    if unknown:
        raise AttributeError(f"GROUP_FIELDS[{group!r}] names fields ConnectionForm lacks: {sorted(unknown)}")
    # A field set to None in a subclass is not a field of it (WTForms).
    return type(f"ConnectionForm_{group}", (_GroupForm,), dict.fromkeys(fields - set(keep)))


_GROUP_FORMS = {group: _group_form(group, keep) for group, keep in GROUP_FIELDS.items()}


def protocol_fields_form(formdata, editing=None) -> ConnectionForm:
    """The Protocol swap's form: what was typed in the shared fields, and only
    the chosen group's fields."""
    group = protocol_group(formdata.get("protocol"), formdata.get("imap_auth"))
    return _GROUP_FORMS[group](formdata=formdata, editing=editing)
