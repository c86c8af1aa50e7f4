"""/v1/batches: submit a JSONL batch (multipart upload, inline `items`, or an `s3://` URI inside the caller's own
storage prefix or an allow-listed one, see common/references.py), read it, list, cancel, retry, resume (same input
under the same Idempotency-Key), follow it live (Server-Sent Events), and stream its results manifest.

The domain lives in common/batches.py; this module is the HTTP shape. Jobs of a batch are not enqueued here:
the feeder (worker/feeder.py) hands them to the broker a bounded number at a time.
"""
from __future__ import annotations

import json
import logging
import uuid
from typing import Annotated, Any, Iterator

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from api import event_streams as events
from api.batch_submission import submit_batch
from api.deps import CurrentTenant, IdempotencyKey, KeyHash, SessionDep, SettingsDep, StorageDep
from api.errors import error_response
from api.limits import ingest_slots
from api.pagination import newest_first
from api.schemas.batches import BATCH_REQUEST_BODY, BatchCreate, BatchList, BatchOut, BatchPriority
from api.schemas.errors import error_responses
from common import batches
from common.auth import authenticate_hash
from common.batch_counts import completion_rate, request_counts
from common.batches import InvalidBatch
from common.db import session_factory
from common.errors import Conflict, InvalidRequest
from common.models import Batch, BatchStatus, JobStatus
from common.representation import batch_representation
from common.settings import Settings, get_settings
from common.usage import batch_usage

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/batches", tags=["batches"])
RESULTS_CHUNK = 64 * 1024
_LOCATION = {"Location": {"description": "the batch's URL", "schema": {"type": "string"}}}


def batch_outs(request: Request, session, rows: list[Batch]) -> list[BatchOut]:
    """The batches as GET returns them (counts and usage: one GROUP BY each for all of them); the shape lives in
    common.representation (shared with batch.* webhooks)."""
    ids = [b.id for b in rows]
    counts, usage = request_counts(session, ids), batch_usage(session, ids, get_settings().pricing)
    return [BatchOut(**batch_representation(b, counts[b.id], usage[b.id],
                                            self_url=str(request.url_for("get_batch", batch_id=str(b.id)))))
            for b in rows]


def _out(request: Request, session, batch: Batch) -> BatchOut:
    return batch_outs(request, session, [batch])[0]


def invalid_batch_response(exc: InvalidBatch) -> JSONResponse:
    return error_response(422, exc.type, exc.message, exc.field, errors=[e.to_dict() for e in exc.errors],
                          invalid_count=exc.invalid_count)


# ------------------------------------------------------------------------------------------------- input

def _model_error(exc: ValidationError) -> InvalidRequest:
    first = exc.errors()[0]
    return InvalidRequest(first["msg"], field=".".join(str(p) for p in first["loc"]) or "body")


async def _read_request(request: Request) -> tuple[BatchCreate, UploadFile | None]:
    """JSON body, or a multipart form with a `file` part (options as form fields; `metadata` as JSON text)."""
    content_type = request.headers.get("content-type", "")
    upload = None
    try:
        if content_type.startswith("multipart/form-data"):
            form = await request.form()
            fields: dict[str, Any] = {k: v for k, v in form.items() if k != "file"}
            upload = form.get("file")
            if upload is not None and not isinstance(upload, UploadFile):
                raise InvalidRequest("`file` must be a file part (JSONL)", field="file")
            if "metadata" in fields:
                try:
                    fields["metadata"] = json.loads(fields["metadata"])
                except (json.JSONDecodeError, RecursionError):
                    raise InvalidRequest("metadata must be a JSON object", field="metadata") from None
            options = BatchCreate.model_validate(fields)
        else:
            try:
                # parsed on a worker thread: a 32 MB items list must not hold the event loop (and /healthz)
                body = await run_in_threadpool(json.loads, await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                raise InvalidRequest("send JSON {items: [...]} or a multipart JSONL upload (field `file`)",
                                     field="body") from None
            options = BatchCreate.model_validate(body)
    except ValidationError as exc:
        raise _model_error(exc) from None
    given = [name for name, present in (("file", upload is not None), ("items", options.items is not None),
                                        ("input_url", options.input_url is not None)) if present]
    if len(given) != 1:
        raise InvalidRequest("give exactly one input: a JSONL `file` upload, inline `items`, or `input_url`",
                             field="input")
    return options, upload


# ------------------------------------------------------------------------------------------------- routes

@router.post("", status_code=202, response_model=BatchOut, openapi_extra={"requestBody": BATCH_REQUEST_BODY},
             responses={
                 202: {"description": "Accepted: the batch is created and its jobs queued", "headers": _LOCATION},
                 200: {"model": BatchOut, "headers": _LOCATION,
                       "description": "The batch created before under the same Idempotency-Key and input, resumed "
                                      "(its failed and canceled items queued again)"},
                 **error_responses(400, 409, 413, 422, 429)})
async def create_batch(request: Request, response: Response, session: SessionDep, tenant: CurrentTenant,
                       settings: SettingsDep, storage: StorageDep,
                       idempotency_key: IdempotencyKey = None):
    """202 with the new batch; 200 with the same batch when the same input comes again under the same
    Idempotency-Key (its failed and canceled items are queued again: a resume); 409 when the key was used with
    other input; 422 with line-numbered `errors` for invalid lines (unless skip_invalid)."""
    with ingest_slots.take(tenant.id, settings.api):  # 429 at once past the concurrent-ingest bounds
        body, upload = await _read_request(request)
        try:
            batch, created = await submit_batch(body, upload, session=session, tenant_id=tenant.id, settings=settings,
                                                storage=storage, idempotency_key=idempotency_key)
        except InvalidBatch as exc:
            return invalid_batch_response(exc)
    if not created:
        response.status_code = 200
    response.headers["Location"] = str(request.url_for("get_batch", batch_id=str(batch.id)))
    return _out(request, session, batch)


@router.get("/{batch_id}", response_model=BatchOut, name="get_batch",
            responses=error_responses(404, 422))
def get_batch(batch_id: str, request: Request, session: SessionDep, tenant: CurrentTenant) -> BatchOut:
    return _out(request, session, batches.get_batch(session, batch_id, tenant_id=tenant.id))


@router.get("/{batch_id}/events", response_class=StreamingResponse, responses={
    200: events.openapi_200("Server-Sent Events: `progress` ({status, request_counts, items_per_min, eta_s}) on each "
                         "change of the status or counts, then `done` (the batch object) and the end; a "
                         "`: keep-alive` comment while nothing changes; `timeout` when the stream reached its "
                         "longest (reconnect with Last-Event-ID)"),
    **error_responses(404, 422, 429)})
async def batch_events(batch_id: str, request: Request, key_hash: KeyHash, settings: SettingsDep,
                       last_event_id: Annotated[str | None, Header(max_length=200)] = None) -> StreamingResponse:
    """Live counts, rate and ETA of the batch until it ends (api/event_streams.py); `Last-Event-ID` resumes
    without repeats."""
    return await batch_event_stream(request, key_hash, batch_id, settings, last_event_id)


async def batch_event_stream(request: Request, key_hash: str, batch_id: str, settings: Settings,
                             last_event_id: str | None) -> StreamingResponse:
    """The batch's stream for the holder of this key (also the console's, api/console/batches.py); 401, 403 or
    404 before any stream starts."""
    def snapshot() -> events.Snapshot:
        """Each read checks the key again, on a session of its own: the stream outlives the request."""
        session = session_factory()()
        try:
            tenant = authenticate_hash(session, key_hash, "read")
            batch = batches.get_batch(session, batch_id, tenant_id=tenant.id)
            counts = request_counts(session, [batch.id])[batch.id]
            return events.batch_snapshot(
                batch, counts,
                rate=lambda: completion_rate(session, batch_id=batch.id, since=batch.in_progress_at or batch.created_at,
                                             remaining=counts.open),
                render=lambda: jsonable_encoder(_out(request, session, batch)))
        finally:
            session.close()

    state = {"first": await run_in_threadpool(snapshot)}  # 401, 403, 404 before any stream starts
    events.check_room(settings.api)

    async def read() -> events.Snapshot:
        return state.pop("first", None) or await run_in_threadpool(snapshot)

    return StreamingResponse(events.event_stream(read, settings.api, last_event_id, poll_s=max(
        settings.api.events_poll_s, events.BATCH_POLL_S)), media_type="text/event-stream", headers=events.HEADERS)


@router.get("", response_model=BatchList, responses=error_responses(422))
def list_batches(request: Request, session: SessionDep, tenant: CurrentTenant,
                 status: Annotated[str | None, Query(pattern="^(" + "|".join(BatchStatus.ALL) + ")$")] = None,
                 limit: Annotated[int, Query(ge=1, le=200)] = 20, cursor: str | None = None) -> BatchList:
    """Newest first; `next_cursor` continues after the last item (the same cursor scheme as /v1/jobs)."""
    query = select(Batch).where(Batch.tenant_id == tenant.id)
    if status:
        query = query.where(Batch.status == status)
    page = newest_first(session, query, Batch, cursor=cursor, limit=limit)
    return BatchList.of(page, batch_outs(request, session, page.rows))


@router.post("/{batch_id}/cancel", response_model=BatchOut, responses=error_responses(404, 409, 413, 422))
def cancel_batch(batch_id: str, request: Request, session: SessionDep, tenant: CurrentTenant) -> BatchOut:
    """Queued items are canceled at once, running ones finish; `cancelling` until then, then `cancelled`."""
    batch = batches.cancel_batch(session, batch=batches.get_batch(session, batch_id, tenant_id=tenant.id))
    session.commit()
    return _out(request, session, batch)


@router.post("/{batch_id}/priority", response_model=BatchOut, responses=error_responses(404, 409, 413, 422))
def set_batch_priority(batch_id: str, body: BatchPriority, request: Request, session: SessionDep,
                       tenant: CurrentTenant) -> BatchOut:
    """Move the batch to another lane (high, normal, low) while it runs: the feeder uses it from its next pass."""
    batch = batches.set_priority(session, batch=batches.get_batch(session, batch_id, tenant_id=tenant.id),
                                 priority=body.priority)
    session.commit()
    return _out(request, session, batch)


@router.post("/{batch_id}/retry", response_model=BatchOut, responses=error_responses(404, 409, 413, 422))
def retry_batch(batch_id: str, request: Request, session: SessionDep, tenant: CurrentTenant) -> BatchOut:
    """Re-run only the failed items (succeeded and canceled ones stay as they are)."""
    batch = batches.get_batch(session, batch_id, tenant_id=tenant.id)
    if batch.status in (BatchStatus.CANCELLING, BatchStatus.VALIDATING):
        raise Conflict(f"batch {batch.id} is {batch.status}; retry once it has ended", field="status")
    requeued = batches.rerun(session, batch=batch, statuses=(JobStatus.FAILED,))
    session.commit()
    batches.refresh_statistics(session, rows_changed=requeued)
    return _out(request, session, batch)


@router.get("/{batch_id}/results", response_class=StreamingResponse, responses={
    200: {"description": "The results manifest: one JSON object per line, one line per input line",
          "content": {"application/x-ndjson": {"schema": {"type": "string"}}},
          "headers": {"Content-Disposition": {"description": 'attachment; filename="<batch id>.jsonl"',
                                              "schema": {"type": "string"}}}},
    **error_responses(404, 422)})
def batch_results(batch_id: str, request: Request, session: SessionDep, tenant: CurrentTenant,
                  storage: StorageDep, urls: bool = True) -> StreamingResponse:
    """The manifest as JSONL, one line per input line in input order (custom_id, line, job_id, status, seed,
    key, url, sha256, error; `images` when a line asked for several). Live: unfinished items show their current
    status. `urls=false` skips presigning (faster for a million lines)."""
    batch = batches.get_batch(session, batch_id, tenant_id=tenant.id)
    base = str(request.url_for("get_job_image", job_id="JOB", index=0)).rsplit("/JOB/", 1)[0]

    def url_for(job_id: uuid.UUID, index: int, key: str) -> str:
        return storage.presigned_url(key) or f"{base}/{job_id}/images/{index}"

    def chunks() -> Iterator[bytes]:
        """~64 KiB at a time: Starlette runs a sync iterator one thread hop per item, too slow per line."""
        own = session_factory()()  # the request's session closes with the handler; the stream outlives it
        try:
            buffer: list[str] = []
            size = 0
            for line in batches.manifest_lines(own, batch_id=batch.id, url_for=url_for if urls else None):
                text = line.to_json() + "\n"
                buffer.append(text)
                size += len(text)
                if size >= RESULTS_CHUNK:
                    yield "".join(buffer).encode()
                    buffer, size = [], 0
            if buffer:
                yield "".join(buffer).encode()
        finally:
            own.close()

    return StreamingResponse(chunks(), media_type="application/x-ndjson",
                             headers={"Content-Disposition": f'attachment; filename="{batch.id}.jsonl"'})
