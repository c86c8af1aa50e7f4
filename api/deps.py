"""FastAPI dependencies as `Annotated` aliases: SessionDep, SettingsDep, StorageDep, CurrentTenant, IdempotencyKey."""
from __future__ import annotations

from typing import Annotated, Iterator

from fastapi import Depends, Header, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.job_store import JobStore
from common.auth import authenticate, key_hash_of
from common.db import session_factory
from common.models import Tenant
from common.settings import Settings, get_settings
from common.storage import Storage


def get_session() -> Iterator[Session]:
    """One session per request, committed by the handler at the edge; rolled back if it raised."""
    session = session_factory()()
    try:
        yield session
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


# Dependencies that do no I/O are `async def`: FastAPI runs a plain `def` dependency on the threadpool, a hop
# per dependency per request.
async def get_storage(request: Request) -> Storage:
    return request.app.state.storage


async def current_settings() -> Settings:
    return get_settings()


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(current_settings)]
StorageDep = Annotated[Storage, Depends(get_storage)]


# `Authorization: Bearer <key>`, declared as the OpenAPI security scheme `bearerAuth` of every /v1 route. It never
# answers by itself (auto_error=False): a missing or malformed header reads as no key, and `authenticate` answers
# 401 (common.errors.AuthenticationError) with the usual error body.
bearer = HTTPBearer(auto_error=False, scheme_name="bearerAuth", bearerFormat="lp_...",
                    description="an API key (`letterpress keys create`): `Authorization: Bearer lp_...`")


def required_scope(method: str, path: str) -> str:
    """The key scope a call needs (common.auth.SCOPES): admin under /v1/admin, read for GET, submit otherwise."""
    if path.startswith("/v1/admin"):
        return "admin"
    return "read" if method in ("GET", "HEAD") else "submit"


def current_tenant(request: Request, session: SessionDep,
                   credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)] = None) -> Tenant:
    """The key's tenant, when the key holds the scope this call needs (401 / 403 otherwise)."""
    tenant = authenticate(session, credentials.credentials if credentials else None,
                          required_scope(request.method, request.url.path))
    # End the key's read here: a route that then reads a long upload or calls out must not hold a transaction
    # open, or the database's idle_in_transaction_session_timeout ends it under the route (a 503).
    session.commit()
    return tenant


CurrentTenant = Annotated[Tenant, Depends(current_tenant)]


async def presented_key_hash(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)] = None) -> str:
    """The hash of the presented key, for the routes whose one statement checks it (api/job_store.py); a missing
    key is a 401 here, an unusable one there."""
    return key_hash_of(credentials.credentials if credentials else None)


KeyHash = Annotated[str, Depends(presented_key_hash)]


async def get_job_store(request: Request) -> JobStore:
    return request.app.state.job_store


JobStoreDep = Annotated[JobStore, Depends(get_job_store)]

# The `Idempotency-Key` header of every create: printable ASCII, no surrounding blanks, at most 255 characters
# (an empty or blank key is refused, not taken as a key).
IdempotencyKey = Annotated[str | None, Header(min_length=1, max_length=255,
                                              pattern=r"^[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?$")]
