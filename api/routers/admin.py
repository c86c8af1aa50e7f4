"""/v1/admin: tenants and API keys of the whole installation, for keys with the `admin` scope (every other key
gets 403 here: api/deps.required_scope). The same operations as `letterpress keys` (common/auth.py), over HTTP."""
from __future__ import annotations

import dataclasses
from datetime import timedelta

from fastapi import APIRouter
from sqlalchemy import select

from api.deps import CurrentTenant, SessionDep
from api.schemas.admin import (
    KeyCreate,
    KeyCreated,
    KeyList,
    KeyOut,
    TenantCreate,
    TenantList,
    TenantOut,
    TenantUpdate,
)
from api.schemas.errors import error_responses
from common import auth
from common.db import get_owned
from common.models import ApiKey, Tenant

router = APIRouter(prefix="/v1/admin", tags=["admin"])


def tenant_out(t: Tenant) -> TenantOut:
    return TenantOut(id=t.id, name=t.name, created_at=t.created_at, limits=dict(t.limits or {}))


def key_out(session, key: ApiKey) -> KeyOut:
    """The key as `letterpress keys list` shows it (read among its own tenant's keys only)."""
    info = next(k for k in auth.list_keys(session, tenant=key.tenant.name) if k.id == key.id)
    return KeyOut(**dataclasses.asdict(info))


@router.get("/tenants", response_model=TenantList, responses=error_responses())
def list_tenants(session: SessionDep, _admin: CurrentTenant) -> TenantList:
    tenants = session.scalars(select(Tenant).order_by(Tenant.created_at, Tenant.id)).all()
    return TenantList(data=[tenant_out(t) for t in tenants])


@router.post("/tenants", status_code=201, response_model=TenantOut, responses=error_responses(413, 422))
def create_tenant(body: TenantCreate, session: SessionDep, _admin: CurrentTenant) -> TenantOut:
    """Create a tenant (or return the one of that name)."""
    tenant = auth.get_or_create_tenant(session, body.name)
    session.commit()
    return tenant_out(tenant)


@router.patch("/tenants/{tenant_id}", response_model=TenantOut, responses=error_responses(404, 413, 422))
def update_tenant(tenant_id: str, body: TenantUpdate, session: SessionDep, _admin: CurrentTenant) -> TenantOut:
    """Set a tenant's own limits (common/quotas.py); a null limit goes back to the server's default."""
    tenant = get_owned(session, Tenant, tenant_id, tenant_id=None, noun="tenant")
    limits = {k: v for k, v in {**tenant.limits, **body.limits.model_dump(exclude_unset=True)}.items()
              if v is not None}
    tenant.limits = limits
    session.commit()
    return tenant_out(tenant)


@router.get("/keys", response_model=KeyList, responses=error_responses(422))
def list_keys(session: SessionDep, _admin: CurrentTenant, tenant: str | None = None) -> KeyList:
    """Every key (of one tenant, by name): never the key itself."""
    return KeyList(data=[KeyOut(**dataclasses.asdict(k)) for k in auth.list_keys(session, tenant=tenant)])


@router.post("/keys", status_code=201, response_model=KeyCreated, responses=error_responses(413, 422))
def create_key(body: KeyCreate, session: SessionDep, _admin: CurrentTenant) -> KeyCreated:
    """A new key for a tenant (created if new), shown once in `key`."""
    scopes = auth.check_scopes(body.scopes)
    tenant = auth.get_or_create_tenant(session, body.tenant)
    key = auth.create_api_key(session, tenant=tenant, name=body.name, scopes=scopes,
                              expires_in=timedelta(seconds=body.expires_in_s) if body.expires_in_s else None)
    session.commit()
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == auth.hash_key(key)))
    return KeyCreated(**key_out(session, row).model_dump(), key=key)


@router.post("/keys/{key_id}/revoke", response_model=KeyOut, responses=error_responses(404, 409, 413, 422))
def revoke_key(key_id: str, session: SessionDep, _admin: CurrentTenant) -> KeyOut:
    """Revoke now (by id or shown prefix): the next request with the key is a 401."""
    key = auth.revoke_key(session, key_id)
    session.commit()
    return key_out(session, key)
