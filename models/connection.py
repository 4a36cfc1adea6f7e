"""Inbound email connections, their drafts under test, and their logs."""
from __future__ import annotations

import json
import uuid

from peewee import (BooleanField, CharField, DateField, DateTimeField, ForeignKeyField, IntegerField,
                    TextField)

from services import crypto

from .base import BaseModel, EncryptedField, utcnow
from .org import Organization, User

PROTOCOLS = {
    "exchange": "Exchange (EWS)",
    "imap": "IMAP",
    "oauth": "OAuth (Office 365)",
    "graph": "Microsoft Graph (Office 365)",
}
STATUS_LABELS = {
    "never": "Never tested",
    "ok": "OK",
    "failing": "Failing",
    "paused": "Paused",
    "grant": "Grant Access again",
}

# The fields an admin edits, in one place: drafts carry exactly these, and
# saving a tested draft copies exactly these onto the connection.
EDITABLE_FIELDS = (
    "name", "api_name", "description", "protocol",
    "email_address", "password", "source_folder",
    "host", "port", "encryption", "imap_auth",
    "endpoint", "trusted_cert_pem",
    "proxy_enabled", "proxy_protocol", "proxy_host", "proxy_port", "proxy_username", "proxy_password",
    "proxy_cert_pem",
    "oauth_client_id", "oauth_tenant_id", "oauth_client_auth", "oauth_client_secret",
    "oauth_secret_expires", "oauth_cert_pem", "oauth_private_key", "oauth_authority_host",
    "graph_endpoint", "oauth_access",
    "fetch_interval", "routing", "max_message_size",
)
SECRET_FIELDS = ("password", "proxy_password", "oauth_client_secret", "oauth_private_key", "oauth_token_cache")


class EmailConnection(BaseModel):
    organization = ForeignKeyField(Organization, backref="connections", on_delete="CASCADE")
    # Mailbox
    name = CharField(max_length=120)
    api_name = CharField(max_length=80)
    description = TextField(default="")
    # Connection details
    protocol = CharField(max_length=16, default="imap")
    email_address = CharField(max_length=512, default="")
    password = EncryptedField(null=True)
    source_folder = CharField(max_length=512, default="")
    host = CharField(max_length=255, default="")
    port = IntegerField(null=True)
    encryption = CharField(max_length=16, default="ssl")  # ssl | starttls | none
    imap_auth = CharField(max_length=16, default="password")  # password | xoauth2
    endpoint = CharField(max_length=1024, default="")
    trusted_cert_pem = TextField(default="")  # uploaded by the admin; public data
    # Proxy (Exchange, OAuth, Graph)
    proxy_enabled = BooleanField(default=False)
    proxy_protocol = CharField(max_length=8, default="http")
    proxy_host = CharField(max_length=255, default="")
    proxy_port = IntegerField(null=True)
    proxy_username = CharField(max_length=255, default="")
    proxy_password = EncryptedField(null=True)
    proxy_cert_pem = TextField(default="")
    # OAuth (Office 365) and Graph
    oauth_client_id = CharField(max_length=64, default="")
    oauth_tenant_id = CharField(max_length=255, default="")
    oauth_client_auth = CharField(max_length=16, default="secret")  # secret | certificate
    oauth_client_secret = EncryptedField(null=True)
    oauth_secret_expires = DateField(null=True)
    oauth_cert_pem = TextField(default="")
    oauth_private_key = EncryptedField(null=True)
    oauth_authority_host = CharField(max_length=255, default="https://login.microsoftonline.com")
    graph_endpoint = CharField(max_length=255, default="https://graph.microsoft.com")
    oauth_access = CharField(max_length=16, default="delegated")  # delegated | application
    oauth_token_cache = EncryptedField(null=True)
    oauth_account_username = CharField(max_length=320, default="")
    oauth_account_name = CharField(max_length=255, default="")
    oauth_token_expires_at = DateTimeField(null=True)
    oauth_last_refresh_at = DateTimeField(null=True)
    oauth_token_error = TextField(default="")
    # Fetching
    enabled = BooleanField(default=True)
    fetch_interval = IntegerField(default=60)  # seconds
    routing = CharField(max_length=16, default="incident")  # incident | case | inbox
    max_message_size = IntegerField(default=100 * 1024 * 1024)
    # State
    status = CharField(max_length=16, default="never")
    last_test_at = DateTimeField(null=True)
    last_fetch_at = DateTimeField(null=True)
    next_fetch_at = DateTimeField(null=True)
    last_error = TextField(default="")
    last_error_code = CharField(max_length=64, default="")
    consecutive_failures = IntegerField(default=0)
    messages_total = IntegerField(default=0)
    messages_last_run = IntegerField(default=0)
    created_at = DateTimeField(default=utcnow)
    updated_at = DateTimeField(default=utcnow)

    class Meta:
        indexes = ((("organization", "api_name"), True),)

    @property
    def protocol_label(self) -> str:
        return PROTOCOLS.get(self.protocol, self.protocol)

    @property
    def status_label(self) -> str:
        return STATUS_LABELS.get(self.status, self.status)

    @property
    def oauth_health(self):
        """Office 365 sign-in state and expiry warnings, or None (models/oauth_health.py)."""
        from .oauth_health import oauth_health

        return oauth_health(self)

    def log(self, level: str, message: str, job_id: str = "") -> "ConnectionLog":
        return ConnectionLog.create(connection=self, level=level, message=message, job_id=job_id)

    def editable_values(self) -> dict:
        """The editable fields as plain values, secrets revealed: for drafts
        only (encrypted as a whole there), never for templates."""
        out = {}
        for name in EDITABLE_FIELDS:
            value = getattr(self, name)
            if name in SECRET_FIELDS:
                value = value.reveal()
            elif hasattr(value, "isoformat"):
                value = value.isoformat()
            out[name] = value
        return out


    def stored_values(self) -> dict:
        """editable_values() plus the OAuth grant, the starting point of a draft."""
        out = self.editable_values()
        out.update(oauth_token_cache=self.oauth_token_cache.reveal(),
                   oauth_account_username=self.oauth_account_username,
                   oauth_account_name=self.oauth_account_name)
        return out


class ConnectionDraft(BaseModel):
    """What the admin typed, waiting for Test and Save to succeed.

    The test job gets only this row's id. The whole payload, secrets
    included, is one encrypted blob, so nothing readable sits in the
    database or in Redis while the test runs."""

    id = CharField(primary_key=True, max_length=36, default=lambda: str(uuid.uuid4()))
    organization = ForeignKeyField(Organization, on_delete="CASCADE")
    connection = ForeignKeyField(EmailConnection, null=True, on_delete="CASCADE", backref="drafts")
    created_by = ForeignKeyField(User, null=True, on_delete="SET NULL")
    payload = TextField()
    job_id = CharField(max_length=64, default="")
    created_at = DateTimeField(default=utcnow)

    @classmethod
    def make(cls, organization, values: dict, connection=None, user=None) -> "ConnectionDraft":
        return cls.create(organization=organization, connection=connection, created_by=user,
                          payload=crypto.encrypt(json.dumps(values, default=str)))

    def values(self) -> dict:
        return json.loads(crypto.decrypt(self.payload))


class ConnectionLog(BaseModel):
    connection = ForeignKeyField(EmailConnection, backref="logs", on_delete="CASCADE")
    created_at = DateTimeField(default=utcnow, index=True)
    level = CharField(max_length=10, default="info")  # info | warning | error
    message = TextField()
    job_id = CharField(max_length=64, default="")
