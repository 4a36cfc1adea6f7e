"""peewee models. Import from here: `from models import EmailConnection`."""
from .base import BaseModel, EncryptedField, db, utcnow, write_transaction
from .connection import (EDITABLE_FIELDS, PROTOCOLS, SECRET_FIELDS, STATUS_LABELS, ConnectionDraft,
                         ConnectionLog, EmailConnection)
from .mail import (MAX_PROCESS_ATTEMPTS, Attachment, FetchRun, Incident, Indicator, RemoteKey,
                   StoredMessage)
from .org import Membership, Organization, User
from .api import ApiToken

# The tables of the first migration; later migrations add to ALL_MODELS.
ALL_MODELS_V1 = [Organization, User, Membership, EmailConnection, ConnectionDraft, ConnectionLog,
                 Incident, StoredMessage, RemoteKey, Attachment, Indicator, FetchRun, ApiToken]
ALL_MODELS = list(ALL_MODELS_V1)

__all__ = [
    "db", "utcnow", "write_transaction", "BaseModel", "EncryptedField", "Organization", "User", "Membership",
    "EmailConnection", "ConnectionDraft", "ConnectionLog", "ALL_MODELS", "PROTOCOLS",
    "STATUS_LABELS", "EDITABLE_FIELDS", "SECRET_FIELDS", "Incident", "StoredMessage", "RemoteKey",
    "Attachment", "Indicator", "FetchRun", "MAX_PROCESS_ATTEMPTS", "ApiToken",
]
