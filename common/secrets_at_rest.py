"""Secrets the database holds for us (today: webhook signing secrets) are stored encrypted, so a database dump or
a replica does not hand them out.

- **Key**: Fernet (AES-128-CBC + HMAC-SHA256, the `cryptography` library's authenticated recipe) under a key derived
  from `LETTERPRESS_SECRET_KEY` with HKDF-SHA256 (a fixed `info` per purpose, so the same secret key never serves
  two purposes directly).
- **Stored form**: `enc:v1:<fernet token>`. A value without that prefix is a row written before encryption
  existed (plaintext): it is read as it is, and encrypted by `letterpress secrets reencrypt` or its next write.
- **Rotating `LETTERPRESS_SECRET_KEY`**: set the new key, and list the old one in `LETTERPRESS_PREVIOUS_SECRET_KEYS`
  (a JSON list): values decrypt under any of the keys, new writes use the new key. Then run `letterpress secrets
  reencrypt`, which rewrites every stored secret under the new key; then drop the old key from the list. A value
  no configured key opens is an error that says so (`SecretKeyMismatch`), never a silent failure.

`EncryptedText` is the column type that does this on every read and write (ORM and Core statements alike).
"""
from __future__ import annotations

import base64
import functools

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import Text
from sqlalchemy.types import TypeDecorator

from common.errors import LetterpressError
from common.settings import get_settings

PREFIX = "enc:v1:"
_INFO = b"letterpress/secrets-at-rest/v1"


class SecretKeyMismatch(LetterpressError):
    """A stored secret opens under none of the configured keys."""
    type = "secret_key_mismatch"


@functools.lru_cache(maxsize=8)
def _fernet(secret_key: str) -> Fernet:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(secret_key.encode())
    return Fernet(base64.urlsafe_b64encode(key))


def _keys() -> tuple[str, ...]:
    settings = get_settings()
    return (settings.secret_key.get_secret_value(),
            *(k.get_secret_value() for k in settings.previous_secret_keys))


def encrypt(plaintext: str) -> str:
    return PREFIX + _fernet(_keys()[0]).encrypt(plaintext.encode()).decode()


def decrypt(stored: str) -> str:
    if not stored.startswith(PREFIX):
        return stored  # written before encryption: `letterpress secrets reencrypt` encrypts it
    try:
        return MultiFernet([_fernet(k) for k in _keys()]).decrypt(stored[len(PREFIX):].encode()).decode()
    except InvalidToken:
        raise SecretKeyMismatch("a stored secret opens under none of the configured keys: LETTERPRESS_SECRET_KEY "
                                "changed without the old key in LETTERPRESS_PREVIOUS_SECRET_KEYS") from None


def is_current(stored: str) -> bool:
    """Encrypted under the current key (what `reencrypt` leaves every value as)."""
    if not stored.startswith(PREFIX):
        return False
    try:
        _fernet(_keys()[0]).decrypt(stored[len(PREFIX):].encode())
        return True
    except InvalidToken:
        return False


class EncryptedText(TypeDecorator):
    """A Text column holding `encrypt(value)`; reads give the plaintext back."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return None if value is None else encrypt(value)

    def process_result_value(self, value, dialect):
        return None if value is None else decrypt(value)
