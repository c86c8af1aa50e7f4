"""/v1/adapters: a tenant's LoRA registry (register by upload or by URI, list, show, delete).

The domain lives in common/adapters.py (checks, content-addressed storage, resolution inside the tenant); this
module is the HTTP shape. Uploads are spooled to disk by the form parser and bounded by
`adapters.max_file_bytes` (api/limits.py); the file is hashed and checked on a worker thread, off the event loop.
"""
from __future__ import annotations

import json
import logging
import tempfile
import uuid
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from api.deps import CurrentTenant, SessionDep, SettingsDep, StorageDep
from api.pagination import newest_first
from api.schemas.adapters import ADAPTER_REQUEST_BODY, AdapterCreate, AdapterList, AdapterOut
from api.schemas.errors import error_responses
from common import adapters
from common.adapter_sources import open_source
from common.errors import Conflict, InvalidRequest
from common.models import Adapter
from common.settings import Settings
from common.storage import Storage

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/adapters", tags=["adapters"])


def adapter_out(a: Adapter) -> AdapterOut:
    return AdapterOut(name=a.name, sha256=a.sha256, size_bytes=a.size_bytes, rank=a.rank,
                      target_modules=list(a.target_modules), layers=a.layers, layout=a.layout,
                      base_model=a.base_model, checked_against=a.checked_against, created_at=a.created_at)


async def _read_request(request: Request) -> tuple[AdapterCreate | None, dict[str, Any], UploadFile | None]:
    """(JSON body, or None) | (the multipart fields, the file part)."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form()
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidRequest("send the adapter as a file part named `file` (a .safetensors LoRA)", field="file")
        fields = {k: v for k, v in form.items() if k != "file"}
        return None, fields, upload
    try:
        body = AdapterCreate.model_validate(json.loads(await request.body()))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise InvalidRequest("send JSON {name, uri} or a multipart upload (fields `name`, `file`)",
                             field="body") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InvalidRequest(first["msg"], field=".".join(str(p) for p in first["loc"]) or "body") from None
    return body, {}, None


def _replace_flag(value: object) -> bool:
    if value in (None, "", "false"):
        return False
    if value == "true":
        return True
    raise InvalidRequest("replace must be true or false", field="replace")


def _register(session, tenant_id: uuid.UUID, settings: Settings, storage: Storage, name: str, replace: bool,
              source, source_name: str, field: str) -> Adapter:
    """Stage the file on local disk (hashed, size-capped), check it, store it and record it."""
    adapters.replaceable(session, tenant_id=tenant_id, name=name, replace=replace)  # 409 before any download
    session.commit()  # no transaction left open while the file is read, checked and uploaded (common.adapters)
    with tempfile.TemporaryDirectory(prefix="lp-adapter-") as tmp:
        staged = adapters.stage(source, Path(tmp) / "adapter.safetensors", max_bytes=settings.adapters.max_file_bytes,
                                source_name=source_name, field=field)
        try:
            adapter = adapters.register(session, tenant_id=tenant_id, name=name, staged=staged, storage=storage,
                                        settings=settings, replace=replace, field=field)
            session.commit()
        except IntegrityError:  # a concurrent registration of the same name won
            session.rollback()
            adapters.forget_unreferenced(session, storage, tenant_id=tenant_id, sha256=staged.sha256)
            raise Conflict(f"adapter {name} was registered by a concurrent request", field="name") from None
        except BaseException:
            session.rollback()
            adapters.forget_unreferenced(session, storage, tenant_id=tenant_id, sha256=staged.sha256)
            raise
    log.info("adapter %s of tenant %s registered: %s (%d bytes, rank %d)", name, tenant_id, adapter.sha256,
             adapter.size_bytes, adapter.rank)
    return adapter


def _register_from_uri(session, tenant_id: uuid.UUID, settings: Settings, storage: Storage,
                       body: AdapterCreate) -> Adapter:
    with open_source(body.uri, tenant_id=tenant_id, settings=settings, storage=storage) as source:
        return _register(session, tenant_id, settings, storage, body.name, body.replace, source, body.uri, "uri")


@router.post("", status_code=201, response_model=AdapterOut, openapi_extra={"requestBody": ADAPTER_REQUEST_BODY},
             responses={201: {"description": "Registered"}, **error_responses(400, 409, 413, 422)})
async def create_adapter(request: Request, response: Response, session: SessionDep, tenant: CurrentTenant,
                         settings: SettingsDep, storage: StorageDep) -> AdapterOut:
    """Register a LoRA under a name: a multipart upload (`name`, `file`, optional `replace`) or JSON `{name,
    uri}`. The file is checked before anything is stored: safetensors only, LoRA pairs that fit this model's
    transformer, rank within the server's limit; 422 says why not. 409 when the name exists (`replace=true`
    re-points it; jobs already stored keep the file they named)."""
    body, fields, upload = await _read_request(request)
    if upload is not None:
        name = adapters.check_name(fields.get("name"))
        replace = _replace_flag(fields.get("replace"))
        adapter = await run_in_threadpool(_register, session, tenant.id, settings, storage, name, replace,
                                          upload.file, f"upload:{upload.filename or 'adapter.safetensors'}", "file")
    else:
        adapter = await run_in_threadpool(_register_from_uri, session, tenant.id, settings, storage, body)
    response.headers["Location"] = str(request.url_for("get_adapter", name=adapter.name))
    return adapter_out(adapter)


@router.get("", response_model=AdapterList, responses=error_responses(422))
def list_adapters(session: SessionDep, tenant: CurrentTenant,
                  limit: Annotated[int, Query(ge=1, le=200)] = 50, cursor: str | None = None) -> AdapterList:
    """Newest first; `next_cursor` continues after the last item."""
    page = newest_first(session, select(Adapter).where(Adapter.tenant_id == tenant.id), Adapter, cursor=cursor,
                        limit=limit)
    return AdapterList.of(page, [adapter_out(a) for a in page.rows])


@router.get("/{name}", response_model=AdapterOut, name="get_adapter", responses=error_responses(404, 422))
def get_adapter(name: str, session: SessionDep, tenant: CurrentTenant) -> AdapterOut:
    return adapter_out(adapters.get(session, tenant_id=tenant.id, name=name))


@router.delete("/{name}", status_code=204, response_class=Response, responses=error_responses(404, 422))
def delete_adapter(name: str, session: SessionDep, tenant: CurrentTenant, storage: StorageDep,
                   purge: bool = False) -> Response:
    """Remove the name. The file stays (stored jobs reproduce with it) unless `purge=true` and no other name of
    yours points at it; jobs that still need a purged file then fail with a clear error."""
    adapters.delete(session, storage, tenant_id=tenant.id, name=name, purge=purge)
    return Response(status_code=204)
