"""/v1/jobs: submit, read, list (cursor pagination), cancel, and serve images of local storage to their owner."""
from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Body, Query, Request, Response
from fastapi.responses import FileResponse, RedirectResponse
from sqlalchemy import select

from api.deps import CurrentTenant, IdempotencyKey, SessionDep, SettingsDep, StorageDep
from api.pagination import newest_first
from api.schemas.errors import error_responses
from api.schemas.jobs import JOB_EXAMPLES, JobList, JobOut, check_webhook_url
from common import job_states
from common.dispatch import dispatch
from common.errors import NotFound
from common.job_request import JobRequest, to_params
from common.models import Job, JobStatus
from common.representation import job_representation
from common.storage import Storage

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


_LOCATION = {"Location": {"description": "the job's URL", "schema": {"type": "string"}}}


def image_url(request: Request, storage: Storage, job: Job, key: str, index: int) -> str:
    return storage.presigned_url(key) or str(request.url_for("get_job_image", job_id=str(job.id), index=index))


def job_out(request: Request, session, storage: Storage, job: Job) -> JobOut:
    """The job as GET returns it; the shape lives in common.representation (shared with webhook payloads)."""
    return JobOut(**job_representation(
        job, self_url=str(request.url_for("get_job", job_id=str(job.id))),
        image_url=lambda i: image_url(request, storage, job, i.key, i.index),
        queue_position=job_states.queue_position(session, job=job)))


@router.post("", status_code=202, response_model=JobOut, responses={
    202: {"description": "Accepted: the job is queued", "headers": _LOCATION},
    200: {"model": JobOut, "description": "The job created before under the same Idempotency-Key and request",
          "headers": _LOCATION},
    **error_responses(409, 413, 422)})
def create_job(body: Annotated[JobRequest, Body(openapi_examples=JOB_EXAMPLES)], request: Request,
               response: Response, session: SessionDep, tenant: CurrentTenant, settings: SettingsDep,
               storage: StorageDep,
               idempotency_key: IdempotencyKey = None) -> JobOut:
    params = to_params(body, settings.api)
    check_webhook_url(body.webhook_url, settings.webhooks)
    job, created = job_states.create_job(
        session, tenant_id=tenant.id, params=params, idempotency_key=idempotency_key, metadata=body.metadata,
        webhook_url=body.webhook_url, max_attempts=settings.worker.max_attempts)
    session.commit()
    if created:
        # after commit: if Redis is down the job stays queued, unsent, and maintenance sends it later
        dispatch([(job.id, job.queue)], session=session)
        session.commit()
    else:
        response.status_code = 200
    response.headers["Location"] = str(request.url_for("get_job", job_id=str(job.id)))
    return job_out(request, session, storage, job)


@router.get("/{job_id}", response_model=JobOut, name="get_job", responses=error_responses(404, 422))
def get_job(job_id: str, request: Request, session: SessionDep, tenant: CurrentTenant,
            storage: StorageDep) -> JobOut:
    return job_out(request, session, storage, job_states.get_job(session, job_id, tenant_id=tenant.id))


@router.post("/{job_id}/cancel", response_model=JobOut, responses=error_responses(404, 409, 413, 422))
def cancel_job(job_id: str, request: Request, session: SessionDep, tenant: CurrentTenant,
               storage: StorageDep) -> JobOut:
    job = job_states.cancel(session, job=job_states.get_job(session, job_id, tenant_id=tenant.id))
    session.commit()
    return job_out(request, session, storage, job)


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
    return JobList.of(page, [job_out(request, session, storage, j) for j in page.rows])


@router.get("/{job_id}/images/{index}", name="get_job_image", response_class=Response, responses={
    200: {"description": "The image (local storage)", "content": {"image/png": {"schema": {"type": "string",
                                                                                            "format": "binary"}}}},
    307: {"description": "The image lies in S3: a presigned URL for it",
          "headers": {"Location": {"description": "a presigned URL of the PNG", "schema": {"type": "string"}}}},
    **error_responses(404, 422)})
def get_job_image(job_id: str, index: int, session: SessionDep, tenant: CurrentTenant, storage: StorageDep):
    job = job_states.get_job(session, job_id, tenant_id=tenant.id)
    image = next((i for i in job.images if i.index == index), None)
    if image is None:
        raise NotFound(f"job {job_id} has no image {index}")
    path = storage.local_path(image.key)
    if path is not None:
        return FileResponse(path, media_type="image/png")
    return RedirectResponse(storage.presigned_url(image.key), status_code=307)
