"""API keys: `lp_<random>` shown once, stored as SHA-256 (keys are high-entropy, so a plain hash suffices).

A key authenticates while it is neither revoked nor past its `expires_at` (`usable_key`: the one rule, read by
every request, so revoking takes effect on the next request). It may do what its scopes say (`SCOPES`): `read`
(every GET), `submit` (every other call of the tenant's own API: jobs, batches, adapters, webhook changes) and
`admin` (`/v1/admin`: tenants and keys of the whole installation); a valid key without the call's scope is a 403. Operators list, revoke and rotate keys with
`letterpress keys` (common/cli/main.py); a key is named there by its id or by its shown prefix (`lp_AbCdEfG`)."""
from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import BindParameter, ColumnElement, and_, func, literal_column, or_, select, update
from sqlalchemy.orm import Session

from common.errors import AuthenticationError, Conflict, Forbidden, InvalidRequest, NotFound
from common.models import ApiKey, Tenant

KEY_PREFIX = "lp_"
SCOPES = ("read", "submit", "admin")
DEFAULT_SCOPES = ("read", "submit")


def check_scopes(scopes: list[str] | tuple[str, ...], field: str = "scopes") -> list[str]:
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown or not scopes:
        raise InvalidRequest(f"scopes must be a non-empty subset of {', '.join(SCOPES)}; got {list(scopes)}",
                             field=field)
    return [s for s in SCOPES if s in scopes]  # one order, no duplicates


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def get_or_create_tenant(session: Session, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(name=name)
        session.add(tenant)
        session.flush()
    return tenant


def create_api_key(session: Session, *, tenant: Tenant, name: str, expires_in: timedelta | None = None,
                   scopes: list[str] | tuple[str, ...] = DEFAULT_SCOPES) -> str:
    """Create a key and return it in clear: the only time it is ever visible."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    expires_at = session.scalar(select(func.now())) + expires_in if expires_in is not None else None
    session.add(ApiKey(tenant_id=tenant.id, name=name, prefix=key[:10], key_hash=hash_key(key),
                       expires_at=expires_at, scopes=check_scopes(scopes)))
    session.flush()
    return key


def usable_key(key_hash: str | BindParameter, scope: str | None = None) -> ColumnElement[bool]:
    """The one rule of a key that authenticates: its hash, not revoked, not expired (and, given a `scope`,
    holding it). `authenticate` and the API's one-statement calls (api/job_store.py, where `key_hash` is a bound
    parameter) both use it."""
    rule = and_(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None),
                or_(ApiKey.expires_at.is_(None), ApiKey.expires_at > func.now()))
    if scope is None:
        return rule
    assert scope in SCOPES
    # a literal, not a bound parameter: api/job_store.py compiles this into SQL text it runs with its own params
    return and_(rule, ApiKey.scopes.op("@>")(literal_column(f"'[\"{scope}\"]'::jsonb")))


@dataclass(frozen=True)
class KeyInfo:
    """What an operator sees of a key: never the key itself."""

    id: uuid.UUID
    tenant: str
    name: str
    prefix: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None
    usable: bool
    scopes: list[str]


def list_keys(session: Session, *, tenant: str | None = None) -> list[KeyInfo]:
    """Every key (of one tenant, by name), oldest first."""
    now = session.scalar(select(func.now()))
    query = select(ApiKey, Tenant.name).join(Tenant, Tenant.id == ApiKey.tenant_id).order_by(ApiKey.created_at)
    if tenant is not None:
        query = query.where(Tenant.name == tenant)
    return [KeyInfo(id=k.id, tenant=t, name=k.name, prefix=k.prefix, created_at=k.created_at,
                    expires_at=k.expires_at, revoked_at=k.revoked_at, last_used_at=k.last_used_at,
                    usable=k.revoked_at is None and (k.expires_at is None or k.expires_at > now),
                    scopes=list(k.scopes))
            for k, t in session.execute(query)]


def find_key(session: Session, ref: str) -> ApiKey:
    """A key by its id or its shown prefix (`lp_AbCdEfG`); NotFound, or Conflict when a prefix is ambiguous."""
    try:
        where = ApiKey.id == uuid.UUID(ref)
    except ValueError:
        where = ApiKey.prefix == ref
    keys = session.scalars(select(ApiKey).where(where).with_for_update()).all()
    if not keys:
        raise NotFound(f"no API key {ref!r} (give its id or its prefix, as `letterpress keys list` shows them)")
    if len(keys) > 1:
        raise Conflict(f"{len(keys)} keys share the prefix {ref!r}: give the key's id")
    return keys[0]


def revoke_key(session: Session, ref: str) -> ApiKey:
    """Revoke now: the next request with the key is a 401. Revoking a revoked key changes nothing."""
    key = find_key(session, ref)
    session.execute(update(ApiKey).where(ApiKey.id == key.id, ApiKey.revoked_at.is_(None))
                    .values(revoked_at=func.now()))
    session.refresh(key)
    return key


def rotate_key(session: Session, ref: str, *, grace: timedelta = timedelta(0)) -> tuple[ApiKey, str]:
    """A new key for the same tenant and name; the old one stops working after `grace` (0: at once), so callers
    can switch without a gap. Returns the old key and the new key in clear (shown once)."""
    old = find_key(session, ref)
    if old.revoked_at is not None:
        raise Conflict(f"key {old.prefix} is revoked: create a new one instead")
    new = create_api_key(session, tenant=old.tenant, name=old.name, scopes=old.scopes)
    if grace > timedelta(0):
        deadline = session.scalar(select(func.now())) + grace
        if old.expires_at is None or old.expires_at > deadline:
            old.expires_at = deadline
    else:
        old.revoked_at = session.scalar(select(func.now()))
    session.flush()
    return old, new


def key_hash_of(key: str | None) -> str:
    """The stored hash of a presented key; AuthenticationError (401) when none was presented."""
    if not key:
        raise AuthenticationError("missing API key: send `Authorization: Bearer <key>`")
    return hash_key(key)


def authenticate(session: Session, key: str | None, scope: str | None = None) -> Tenant:
    return authenticate_hash(session, key_hash_of(key), scope)


def key_holder(session: Session, key_hash: str) -> tuple[Tenant, list[str]]:
    """The tenant of a key that authenticates, and the key's scopes; 401 for one that does not."""
    found = session.execute(select(Tenant, ApiKey.scopes).join(ApiKey, ApiKey.tenant_id == Tenant.id)
                            .where(usable_key(key_hash))).first()
    if found is None:
        raise AuthenticationError("invalid API key")
    return found[0], found[1]


def authenticate_hash(session: Session, key_hash: str, scope: str | None = None) -> Tenant:
    """The key's tenant; 401 for a key that does not authenticate, 403 for one without `scope`."""
    tenant, scopes = key_holder(session, key_hash)
    if scope is not None and scope not in scopes:
        raise Forbidden(f"this API key lacks the `{scope}` scope (it has: {', '.join(scopes)})", field="Authorization")
    return tenant
