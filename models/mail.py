"""Captured mail, and the incidents (cases) it becomes.

A `StoredMessage` is one raw email kept durably (content-addressed file).
`RemoteKey` maps each server-side identity (IMAP UIDVALIDITY:UID, EWS item
id, Graph id) to it, so a message seen again under any key is never stored
twice. Deleting a connection keeps its mail and incidents (SET NULL)."""
from __future__ import annotations

from peewee import BigIntegerField, BooleanField, CharField, DateTimeField, ForeignKeyField, IntegerField, TextField

from .base import BaseModel, utcnow
from .connection import EmailConnection
from .org import Organization, User

MESSAGE_STATES = ("captured", "processed", "quarantined")
MAX_PROCESS_ATTEMPTS = 3


class Incident(BaseModel):
    organization = ForeignKeyField(Organization, backref="incidents", on_delete="CASCADE")
    number = IntegerField()  # per organization; shown as INC-<number>
    title = CharField(max_length=500)
    status = CharField(max_length=16, default="open")  # open | closed
    connection = ForeignKeyField(EmailConnection, null=True, on_delete="SET NULL", backref="incidents")
    created_at = DateTimeField(default=utcnow, index=True)
    updated_at = DateTimeField(default=utcnow)
    created_by = ForeignKeyField(User, null=True, on_delete="SET NULL")

    class Meta:
        indexes = ((("organization", "number"), True),)

    @property
    def tag(self) -> str:
        return f"INC-{self.number}"


class StoredMessage(BaseModel):
    organization = ForeignKeyField(Organization, backref="messages", on_delete="CASCADE")
    connection = ForeignKeyField(EmailConnection, null=True, on_delete="SET NULL", backref="messages")
    connection_name = CharField(max_length=120, default="")  # kept when the connection is deleted
    # BLAKE3 of the raw bytes: names the file, finds the same bytes fetched
    # again (ingest/store.py). "" on messages stored before 2026-11.
    content_hash = CharField(max_length=64, default="")
    size = BigIntegerField(default=0)
    path = CharField(max_length=1024)  # relative to DATA_DIR
    captured_at = DateTimeField(default=utcnow, index=True)
    received_at = CharField(max_length=40, default="")
    state = CharField(max_length=16, default="captured", index=True)
    attempts = IntegerField(default=0)
    error = TextField(default="")
    # Parsed (filled by processing)
    sha256 = CharField(max_length=64, default="")  # of the raw bytes, for the API
    message_id = CharField(max_length=998, default="", index=True)
    in_reply_to = CharField(max_length=998, default="")
    references = TextField(default="")  # space-separated Message-IDs
    subject = TextField(default="")
    from_addr = CharField(max_length=998, default="")
    to_addrs = TextField(default="")
    date = CharField(max_length=64, default="")
    text_body = TextField(default="")
    html_body = TextField(default="")  # raw: sanitized only when shown
    headers_json = TextField(default="[]")
    evidence_json = TextField(default="")  # the forwarded-as-attachment message, when there is one
    defects = TextField(default="")
    incident = ForeignKeyField(Incident, null=True, on_delete="SET NULL", backref="emails")
    route = CharField(max_length=32, default="")  # what processing did: new-incident, threaded, inbox
    processed_at = DateTimeField(null=True)

    class Meta:
        indexes = ((("connection", "content_hash"), False),)


class RemoteKey(BaseModel):
    connection = ForeignKeyField(EmailConnection, on_delete="CASCADE", backref="remote_keys")
    key = CharField(max_length=512)
    message = ForeignKeyField(StoredMessage, on_delete="CASCADE", backref="remote_keys")
    marked_read = BooleanField(default=False)
    created_at = DateTimeField(default=utcnow)

    class Meta:
        indexes = ((("connection", "key"), True),)


class Attachment(BaseModel):
    message = ForeignKeyField(StoredMessage, on_delete="CASCADE", backref="attachments")
    filename = CharField(max_length=255, default="")
    content_type = CharField(max_length=255, default="application/octet-stream")
    size = BigIntegerField(default=0)
    sha256 = CharField(max_length=64)
    md5 = CharField(max_length=32)
    path = CharField(max_length=1024, default="")  # relative to DATA_DIR
    from_evidence = BooleanField(default=False)


class Indicator(BaseModel):
    message = ForeignKeyField(StoredMessage, on_delete="CASCADE", backref="indicators")
    kind = CharField(max_length=16)  # url | domain | ip | email | sha256 | md5
    value = TextField()
    source = CharField(max_length=255, default="")


class FetchRun(BaseModel):
    """One fetch of a connection: counts for the list and the log."""

    connection = ForeignKeyField(EmailConnection, on_delete="CASCADE", backref="fetch_runs")
    started_at = DateTimeField(default=utcnow)
    finished_at = DateTimeField(null=True)
    listed = IntegerField(default=0)
    stored = IntegerField(default=0)
    duplicates = IntegerField(default=0)
    quarantined = IntegerField(default=0)
    error = TextField(default="")
