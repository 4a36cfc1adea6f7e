"""Database proxy, base model and the encrypted secret field."""
from __future__ import annotations

import datetime as dt

from peewee import DatabaseProxy, Model, TextField

from services import crypto
from services.crypto import Secret

db = DatabaseProxy()


def write_transaction():
    """A transaction that will write. On SQLite it starts with BEGIN
    IMMEDIATE: a plain (deferred) transaction that reads first and then
    writes fails at once with "database is locked" when another process
    wrote in between, instead of waiting for busy_timeout."""
    from peewee import SqliteDatabase

    if isinstance(db.obj, SqliteDatabase):
        return db.atomic("IMMEDIATE")
    return db.atomic()


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class BaseModel(Model):
    class Meta:
        database = db
        legacy_table_names = False


class EncryptedField(TextField):
    """Stored as a Fernet token; read back as a `Secret` that masks itself.

    Assign a plain str (or a Secret) to set it; "" or None clears it."""

    def db_value(self, value):
        if value is None or value == "":
            return None
        if isinstance(value, Secret):
            value = value.reveal()
            if not value:
                return None
        return crypto.encrypt(str(value))

    def python_value(self, value):
        if value is None:
            return Secret("")
        return Secret(crypto.decrypt(value))
