"""API keys: `lp_<random>` shown once, stored as SHA-256 (keys are high-entropy, so a plain hash suffices)."""
from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import BindParameter, ColumnElement, and_, select
from sqlalchemy.orm import Session

from common.errors import AuthenticationError
from common.models import ApiKey, Tenant

KEY_PREFIX = "lp_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def get_or_create_tenant(session: Session, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(name=name)
        session.add(tenant)
        session.flush()
    return tenant


def create_api_key(session: Session, *, tenant: Tenant, name: str) -> str:
    """Create a key and return it in clear: the only time it is ever visible."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(tenant_id=tenant.id, name=name, prefix=key[:10], key_hash=hash_key(key)))
    session.flush()
    return key


def usable_key(key_hash: str | BindParameter) -> ColumnElement[bool]:
    """The one rule of a key that authenticates: its hash, not revoked. `authenticate` and the API's
    one-statement calls (api/job_store.py, where `key_hash` is a bound parameter) both use it."""
    return and_(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None))


def key_hash_of(key: str | None) -> str:
    """The stored hash of a presented key; AuthenticationError (401) when none was presented."""
    if not key:
        raise AuthenticationError("missing API key: send `Authorization: Bearer <key>`")
    return hash_key(key)


def authenticate(session: Session, key: str | None) -> Tenant:
    return authenticate_hash(session, key_hash_of(key))


def authenticate_hash(session: Session, key_hash: str) -> Tenant:
    tenant = session.scalar(select(Tenant).join(ApiKey, ApiKey.tenant_id == Tenant.id)
                            .where(usable_key(key_hash)))
    if tenant is None:
        raise AuthenticationError("invalid API key")
    return tenant
