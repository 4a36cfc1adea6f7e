"""Secrets at rest: Fernet (AES-128-CBC + HMAC) with MultiFernet so old keys
keep decrypting while the first key encrypts (key rotation)."""
from __future__ import annotations

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

_fernet: MultiFernet | None = None


def configure(keys: str) -> None:
    global _fernet
    parts = [k.strip() for k in keys.split(",") if k.strip()]
    if not parts:
        raise RuntimeError("ENCRYPTION_KEYS is empty: Intake cannot store secrets without a key.")
    _fernet = MultiFernet([Fernet(k.encode()) for k in parts])


def _f() -> MultiFernet:
    if _fernet is None:
        raise RuntimeError("services.crypto.configure() was not called")
    return _fernet


def encrypt(plaintext: str) -> str:
    return _f().encrypt(plaintext.encode("utf-8")).decode("ascii")


def decrypt(token: str) -> str:
    try:
        return _f().decrypt(token.encode("ascii")).decode("utf-8")
    except InvalidToken as e:
        raise RuntimeError(
            "A stored secret cannot be decrypted with the configured ENCRYPTION_KEYS. "
            "Was the key changed without keeping the old one in the list?"
        ) from e


def rotate(token: str) -> str:
    """Re-encrypt under the first (newest) key."""
    return _f().rotate(token.encode("ascii")).decode("ascii")


class Secret:
    """A decrypted secret that refuses to be shown: str(), repr() and
    templates print a mask, so a secret can never be rendered back by
    accident. Use `.reveal()` where the plaintext is really needed (a login)."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __str__(self) -> str:
        return "********" if self._value else ""

    __repr__ = lambda self: "Secret(********)"  # noqa: E731

    def __html__(self) -> str:
        return str(self)

    def __eq__(self, other) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))
