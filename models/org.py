"""Organizations, users and who administers what."""
from __future__ import annotations

from peewee import BooleanField, CharField, DateTimeField, ForeignKeyField
from werkzeug.security import check_password_hash, generate_password_hash

from .base import BaseModel, utcnow


class Organization(BaseModel):
    name = CharField(max_length=120, unique=True)
    created_at = DateTimeField(default=utcnow)


class User(BaseModel):
    email = CharField(max_length=254, unique=True)
    password_hash = CharField(max_length=255)
    display_name = CharField(max_length=120, default="")
    is_active = BooleanField(default=True)
    created_at = DateTimeField(default=utcnow)
    last_login_at = DateTimeField(null=True)

    def set_password(self, password: str) -> None:
        self.password_hash = generate_password_hash(password)

    def check_password(self, password: str) -> bool:
        return check_password_hash(self.password_hash, password)

    def memberships(self):
        return (Membership.select(Membership, Organization).join(Organization)
                .where(Membership.user == self).order_by(Organization.name))


class Membership(BaseModel):
    user = ForeignKeyField(User, backref="membership_rows", on_delete="CASCADE")
    organization = ForeignKeyField(Organization, backref="members", on_delete="CASCADE")
    is_admin = BooleanField(default=False)

    class Meta:
        indexes = ((("user", "organization"), True),)
