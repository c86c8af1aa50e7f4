"""Console pages of batches: the list with a JSONL upload form (line-numbered errors, exactly as the API gives
them), a batch's page (live counts, rate and ETA over Server-Sent Events, the manifest, cancel, retry failed,
all images as a zip). Creating goes through api/batch_submission.py and the actions through the REST routes'
own functions, so the console and the API cannot disagree."""
from __future__ import annotations

import uuid
from collections.abc import Iterator

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.responses import RedirectResponse, Response, StreamingResponse
from pydantic import ValidationError
from sqlalchemy import select
from starlette.datastructures import UploadFile

from api.batch_submission import submit_batch
from api.console import zips
from api.console.auth import ConsoleRoute, CurrentUser, submitted_form
from api.console.rendering import render
from api.deps import SessionDep, SettingsDep, StorageDep
from api.limits import ingest_slots
from api.pagination import newest_first
from api.routers import batches as batch_routes
from api.schemas.batches import BatchCreate
from common import batches
from common.batch_counts import completion_rate
from common.batches import InvalidBatch
from common.db import session_factory
from common.errors import InvalidRequest
from common.models import Batch
from common.storage import Storage

router = APIRouter(prefix="/ui", route_class=ConsoleRoute, include_in_schema=False)
PAGE = 50


def _list_page(request: Request, session, user, *, cursor: str | None = None, status: int = 200,
               error: str | None = None, line_errors: list | None = None, invalid_count: int = 0) -> Response:
    page = newest_first(session, select(Batch).where(Batch.tenant_id == user.tenant.id), Batch, cursor=cursor,
                        limit=PAGE)
    shown = [jsonable_encoder(b) for b in batch_routes.batch_outs(request, session, page.rows)]
    more_url = f"/ui/batches?cursor={page.next_cursor}" if page.has_more else None
    return render(request, "batches.html", status=status, batches=shown, more_url=more_url, error=error,
                  line_errors=line_errors or [], invalid_count=invalid_count)


@router.get("/batches")
def batch_list(request: Request, user: CurrentUser, session: SessionDep, cursor: str | None = None) -> Response:
    return _list_page(request, session, user, cursor=cursor)


@router.post("/batches")
async def upload(request: Request, user: CurrentUser, session: SessionDep, settings: SettingsDep,
                 storage: StorageDep) -> Response:
    with ingest_slots.take(user.tenant.id, settings.api):  # the API's bound on concurrent ingests
        form = await submitted_form(request, user)
        file = form.get("file")
        try:
            if not isinstance(file, UploadFile) or not file.filename:
                raise InvalidRequest("choose a JSONL file to upload", field="file")
            options = BatchCreate(skip_invalid=form.get("skip_invalid") == "on",
                                  priority=form.get("priority") or "normal")
            batch, _ = await submit_batch(options, file, session=session, tenant_id=user.tenant.id,
                                          settings=settings, storage=storage)
        except InvalidBatch as exc:
            return await run_in_threadpool(_list_page, request, session, user, status=422, error=exc.message,
                                           line_errors=[e.to_dict() for e in exc.errors],
                                           invalid_count=exc.invalid_count)
        except (InvalidRequest, ValidationError) as exc:
            message = exc.message if isinstance(exc, InvalidRequest) else exc.errors()[0]["msg"]
            return await run_in_threadpool(_list_page, request, session, user, status=422, error=message)
    return RedirectResponse(f"/ui/batches/{batch.id}", status_code=303)


@router.get("/batches/{batch_id}")
def batch_page(batch_id: str, request: Request, user: CurrentUser, session: SessionDep) -> Response:
    row = batches.get_batch(session, batch_id, tenant_id=user.tenant.id)
    shown = jsonable_encoder(batch_routes.batch_outs(request, session, [row])[0])
    counts = shown["request_counts"]
    rate = completion_rate(session, batch_id=row.id, since=row.in_progress_at or row.created_at,
                           remaining=counts["queued"] + counts["running"])
    ended_at = row.completed_at or row.failed_at or row.cancelled_at
    took_s = (ended_at - row.in_progress_at).total_seconds() if ended_at and row.in_progress_at else None
    return render(request, "batch.html", batch=shown, rate=rate, took_s=took_s)


@router.get("/batches/{batch_id}/events")
async def batch_page_events(batch_id: str, request: Request, user: CurrentUser,
                            settings: SettingsDep) -> StreamingResponse:
    """The batch's stream (counts, rate, ETA) for the page's script (an EventSource sends the cookie, not a key)."""
    return await batch_routes.batch_event_stream(request, user.key_hash, batch_id, settings,
                                                 request.headers.get("last-event-id"))


@router.post("/batches/{batch_id}/cancel")
async def cancel(batch_id: str, request: Request, user: CurrentUser, session: SessionDep) -> Response:
    await submitted_form(request, user)
    await run_in_threadpool(batch_routes.cancel_batch, batch_id, request, session, user.tenant)
    return RedirectResponse(f"/ui/batches/{batch_id}", status_code=303)


@router.post("/batches/{batch_id}/retry")
async def retry(batch_id: str, request: Request, user: CurrentUser, session: SessionDep) -> Response:
    await submitted_form(request, user)
    await run_in_threadpool(batch_routes.retry_batch, batch_id, request, session, user.tenant)
    return RedirectResponse(f"/ui/batches/{batch_id}", status_code=303)


@router.get("/batches/{batch_id}/manifest")
def manifest(batch_id: str, request: Request, user: CurrentUser, session: SessionDep,
             storage: StorageDep) -> Response:
    """The results manifest (JSONL), as GET /v1/batches/{id}/results streams it."""
    return batch_routes.batch_results(batch_id, request, session, user.tenant, storage, urls=False)


@router.get("/batches/{batch_id}/images.zip")
def images_zip(batch_id: str, user: CurrentUser, session: SessionDep, storage: StorageDep) -> Response:
    """Every image of the batch and its manifest, in one zip streamed as it is read from storage."""
    batch = batches.get_batch(session, batch_id, tenant_id=user.tenant.id)
    return StreamingResponse(zips.zip_stream(_members(batch.id, storage)), media_type="application/zip",
                             headers={"Content-Disposition": f'attachment; filename="batch-{batch.id}.zip"'})


def _members(batch_id: uuid.UUID, storage: Storage) -> Iterator[tuple[str, object]]:
    own = session_factory()()  # the request's session closes with the handler; the stream outlives it
    try:
        lines = []
        for line in batches.manifest_lines(own, batch_id=batch_id):
            lines.append(line.to_json() + "\n")
            stem = zips.safe_name(line.custom_id or f"line-{line.line}")
            for image in line.images:
                name = f"{stem}-{image['index']}.{image['key'].rsplit('.', 1)[-1]}"
                yield name, (lambda key=image["key"]: storage.get(key))
        yield "manifest.jsonl", (lambda: "".join(lines).encode())
    finally:
        own.close()
