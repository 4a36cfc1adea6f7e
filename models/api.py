"""API tokens: bearer tokens an administrator creates for the REST API.

Only the SHA-256 of a token is stored; the token itself is shown once, when
it is created. A token acts for its organization, and only while it is not
revoked and the administrator who created it is still active and an
administrator of that organization."""
from __future__ import annotations

import hashlib
import secrets

from peewee import CharField, DateTimeField, ForeignKeyField

from .base import BaseModel, utcnow
from .org import Membership, Organization, User

TOKEN_PREFIX = "intake_"
DISPLAY_CHARS = 8  # random characters kept (with "intake_") to tell tokens apart
# last_used_at is written at most this often per token, not on every request.
LAST_USED_RESOLUTION_SECONDS = 60


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class ApiToken(BaseModel):
    organization = ForeignKeyField(Organization, backref="api_tokens", on_delete="CASCADE")
    created_by = ForeignKeyField(User, null=True, backref="api_tokens", on_delete="SET NULL")
    name = CharField(max_length=120)
    token_hash = CharField(max_length=64, unique=True)
    prefix = CharField(max_length=32, index=True)  # "intake_AbCd1234": shown in lists, never enough to sign in
    created_at = DateTimeField(default=utcnow)
    last_used_at = DateTimeField(null=True)
    revoked_at = DateTimeField(null=True)

    @classmethod
    def issue(cls, organization, user, name: str) -> tuple["ApiToken", str]:
        """A new token row and the token itself (to show once, never stored)."""
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        row = cls.create(organization=organization, created_by=user, name=name.strip()[:120],
                         token_hash=hash_token(token), prefix=token[:len(TOKEN_PREFIX) + DISPLAY_CHARS])
        return row, token

    @classmethod
    def authenticate(cls, token: str) -> "ApiToken | None":
        """The usable token row for this bearer token, or None."""
        if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
            return None
        row = (cls.select(cls, Organization).join(Organization)
               .where((cls.token_hash == hash_token(token)) & cls.revoked_at.is_null()).first())
        if row is None or not row.creator_may_act():
            return None
        return row

    def creator_may_act(self) -> bool:
        """The creator is still an active administrator of the organization."""
        if self.created_by_id is None:
            return False
        return (Membership.select().join(User)
                .where((Membership.user == self.created_by_id) & (Membership.organization == self.organization_id)
                       & Membership.is_admin & User.is_active).exists())

    def touch(self) -> None:
        """Record use, at most once a minute."""
        now = utcnow()
        if self.last_used_at is None or (now - self.last_used_at).total_seconds() >= LAST_USED_RESOLUTION_SECONDS:
            ApiToken.update(last_used_at=now).where(ApiToken.id == self.id).execute()
            self.last_used_at = now

    def revoke(self) -> None:
        if self.revoked_at is None:
            self.revoked_at = utcnow()
            self.save()

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None
