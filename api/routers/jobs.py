"""/v1/jobs: submit, read, list (cursor pagination), cancel, and serve images of local storage to their owner."""
from __future__ import annotations

import logging
from typing import Annotated

import redis.asyncio as aioredis
from fastapi import APIRouter, Body, Header, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.responses import FileResponse, RedirectResponse, StreamingResponse
from sqlalchemy import select
from starlette.background import BackgroundTask

from api import event_streams as events
from api.asgi import bearer_key
from api.deps import CurrentTenant, IdempotencyKey, JobStoreDep, KeyHash, SessionDep, SettingsDep, StorageDep
from api.job_store import JobStore
from api.job_submission import submit_job
from api.lean_routes import LeanRoute, served_by
from api.pagination import newest_first
from api.schemas.errors import error_responses
from api.schemas.jobs import JOB_EXAMPLES, JobList, JobOut
from common import job_states, previews
from common.auth import key_hash_of
from common.errors import NotFound
from common.image_files import FORMATS, content_type_of
from common.job_request import JobRequest
from common.models import Job, JobStatus
from common.queue_position import QueuePlace, queue_place, queue_places
from common.representation import job_representation
from common.settings import Settings, get_settings
from common.storage import Storage

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/jobs", tags=["jobs"], route_class=LeanRoute)


_LOCATION = {"Location": {"description": "the job's URL", "schema": {"type": "string"}}}


def job_url(request: Request, job_id) -> str:
    """`request.url_for("get_job", ...)` without its search of every route, which was 8% of a poll's CPU with
    one search for the job and one per image (py-spy; docs/PERFORMANCE.md, "Front door: the hot calls")."""
    return f"{str(request.base_url).rstrip('/')}{router.prefix}/{job_id}"


def job_out(request: Request, storage: Storage, job: Job, place: QueuePlace | None) -> JobOut:
    """The job as GET returns it; the shape lives in common.representation (shared with webhook payloads)."""
    self_url = job_url(request, job.id)
    return JobOut(**job_representation(
        job, self_url=self_url,  # an image: presigned in S3, else its `get_job_image` route (local storage)
        image_url=lambda i: storage.presigned_url(i.key) or f"{self_url}/images/{i.index}",
        queue_position=place.position if place else None, eta_s=place.eta_s if place else None))


def _job_out_sync(request: Request, session, storage: Storage, job: Job) -> JobOut:
    return job_out(request, storage, job, queue_place(session, job=job))


@router.post("", status_code=202, response_model=JobOut, responses={
    202: {"description": "Accepted: the job is queued", "headers": _LOCATION},
    200: {"model": JobOut, "description": "The job created before under the same Idempotency-Key and request",
          "headers": _LOCATION},
    **error_responses(409, 413, 422)})
async def create_job(body: Annotated[JobRequest, Body(openapi_examples=JOB_EXAMPLES)], request: Request,
                     key_hash: KeyHash, idempotency_key: IdempotencyKey = None) -> Response:
    """202 with the new job (api/job_submission.py: validation, quotas, adapters, remix input, the send); 200 with
    the job created before under the same Idempotency-Key and request."""
    # FastAPI still reads and checks the body, the key and the header; the store, storage and settings are read
    # here rather than as dependencies, and the JobOut is answered as JSON directly rather than re-validated
    # against the response model: together about a fifth of a submit's CPU in the API (docs/PERFORMANCE.md,
    # "Front door: the hot calls").
    store: JobStore = request.app.state.job_store
    storage: Storage = request.app.state.storage
    job, created = await submit_job(body, key_hash=key_hash, store=store, settings=get_settings(), storage=storage,
                                    idempotency_key=idempotency_key)
    out = job_out(request, storage, job, await store.queue_place(job, new=created))
    return _json(out, status_code=202 if created else 200, headers={"Location": job_url(request, job.id)})


def _json(out: JobOut, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    """The JobOut as FastAPI would answer it for `response_model=JobOut`, serialized once by pydantic."""
    return Response(out.__pydantic_serializer__.to_json(out), status_code=status_code, headers=headers,
                    media_type="application/json")


async def read_job(request: Request) -> Response:
    """`GET /v1/jobs/{job_id}` without FastAPI's dependency solving (api/lean_routes.py): the presented key (401
    without one, as KeyHash answers), the job of its tenant with its queue place, the JobOut as JSON."""
    store: JobStore = request.app.state.job_store
    job = await store.read(key_hash_of(bearer_key(request.scope)), request.path_params["job_id"])
    return _json(job_out(request, request.app.state.storage, job, await store.queue_place(job)))


@router.get("/{job_id}", response_model=JobOut, name="get_job", responses=error_responses(404, 422))
@served_by(read_job)
async def get_job(job_id: str, request: Request, key_hash: KeyHash) -> Response:
    """The job, with its queue position and ETA while it is queued."""
    return await read_job(request)


@router.get("/{job_id}/events", response_class=StreamingResponse, responses={
    200: events.openapi_200("Server-Sent Events: `progress` ({status, step, total, queue_position, eta_s}, and "
                         "`preview`, "
                         "a data: URL of a small JPEG, while a running job has one) on each change, then `done` (the "
                         "job object) and the end; a `: keep-alive` comment while nothing "
                         "changes; `timeout` when the stream reached its longest (reconnect with Last-Event-ID)"),
    **error_responses(404, 422, 429)})
async def job_events(job_id: str, request: Request, store: JobStoreDep, key_hash: KeyHash, storage: StorageDep,
                     settings: SettingsDep,
                     last_event_id: Annotated[str | None, Header(max_length=200)] = None) -> StreamingResponse:
    """Live progress of the job until it ends (api/event_streams.py); `Last-Event-ID` resumes without repeats."""
    return await job_event_stream(request, store, key_hash, job_id, storage, settings, last_event_id)


async def job_event_stream(request: Request, store: JobStore, key_hash: str, job_id: str, storage: Storage,
                           settings: Settings, last_event_id: str | None) -> StreamingResponse:
    """The job's stream for the holder of this key (also the console's, api/console/jobs.py); 404 before any
    stream starts."""
    first = await store.read(key_hash, job_id)
    events.check_room(settings.api)
    state = {"job": first}

    async def read():
        job = state.pop("job", None) or await store.read(key_hash, job_id)
        return job, await store.queue_place(job)

    def render(job, place):
        return jsonable_encoder(job_out(request, storage, job, place))

    redis = aioredis.Redis.from_url(settings.redis.url, socket_connect_timeout=1, socket_timeout=1)

    async def preview(job):
        try:
            return await previews.read(redis, job.id)
        except aioredis.RedisError:  # a preview is a courtesy: the progress goes on without it
            return None

    return StreamingResponse(events.job_events(read, render, settings.api, last_event_id, preview),
                             media_type="text/event-stream", headers=events.HEADERS,
                             background=BackgroundTask(redis.aclose))


@router.post("/{job_id}/cancel", response_model=JobOut, responses=error_responses(404, 409, 413, 422))
def cancel_job(job_id: str, request: Request, session: SessionDep, tenant: CurrentTenant,
               storage: StorageDep) -> JobOut:
    job = job_states.cancel(session, job=job_states.get_job(session, job_id, tenant_id=tenant.id))
    session.commit()
    return _job_out_sync(request, session, storage, job)


@router.get("", response_model=JobList, responses=error_responses(422))
def list_jobs(request: Request, session: SessionDep, tenant: CurrentTenant, storage: StorageDep,
              status: Annotated[str | None, Query(pattern="^(" + "|".join(JobStatus.ALL) + ")$")] = None,
              limit: Annotated[int, Query(ge=1, le=200)] = 50,
              cursor: str | None = None) -> JobList:
    """Newest first; `next_cursor` continues after the last item."""
    query = select(Job).where(Job.tenant_id == tenant.id)
    if status:
        query = query.where(Job.status == status)
    page = newest_first(session, query, Job, cursor=cursor, limit=limit)
    places = queue_places(session, page.rows)  # the page's interactive jobs in one statement
    return JobList.of(page, [job_out(request, storage, j, places.get(j.id)) for j in page.rows])


@router.get("/{job_id}/images/{index}", name="get_job_image", response_class=Response, responses={
    200: {"description": "The image (local storage), in the job's `output_format`",
          "content": {fmt.content_type: {"schema": {"type": "string", "format": "binary"}}
                      for fmt in FORMATS.values()}},
    307: {"description": "The image lies in S3: a presigned URL for it",
          "headers": {"Location": {"description": "a presigned URL of the image", "schema": {"type": "string"}}}},
    **error_responses(404, 422)})
def get_job_image(job_id: str, index: int, session: SessionDep, tenant: CurrentTenant, storage: StorageDep):
    job = job_states.get_job(session, job_id, tenant_id=tenant.id)
    image = next((i for i in job.images if i.index == index), None)
    if image is None:
        raise NotFound(f"job {job_id} has no image {index}")
    path = storage.local_path(image.key)
    if path is not None:
        return FileResponse(path, media_type=content_type_of(image.key))
    return RedirectResponse(storage.presigned_url(image.key), status_code=307)
