"""Console pages of jobs: the create form, a job's page (live progress over Server-Sent Events, its images, its
recipe, cancel, "same recipe, new seed" and "reproduce"), and the images and thumbnails a page shows. Every
read goes through the same tenant-checked statements as the REST API (api/job_store.py, common.job_states), so
another tenant's job id is a not-found page."""
from __future__ import annotations


from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.responses import FileResponse, RedirectResponse, Response, StreamingResponse
from sqlalchemy import select

from api.console import job_form
from api.console.auth import ConsoleRoute, CurrentUser, submitted_form
from api.console.rendering import render
from api.deps import JobStoreDep, SessionDep, SettingsDep, StorageDep
from api.job_submission import submit_job
from api.routers.jobs import job_event_stream, job_out
from common import job_states, thumbnails
from common.broker import priority_of
from common.errors import LetterpressError, NotFound
from common.image_files import content_type_of
from common.job_request import RequestError, magic_prompt_available
from common.models import Adapter, Job
from common.presets import PRESETS
from common.settings import Settings

router = APIRouter(prefix="/ui", route_class=ConsoleRoute, include_in_schema=False)


@router.get("")
async def home() -> RedirectResponse:
    return RedirectResponse("/ui/gallery", status_code=303)


def _form_page(request: Request, session, user, settings: Settings, *, values: dict[str, str],
               error: str | None = None, field: str | None = None, status: int = 200) -> Response:
    adapters = list(session.scalars(select(Adapter.name).where(Adapter.tenant_id == user.tenant.id)
                                    .order_by(Adapter.name)))
    return render(request, "create.html", status=status, values=values, error=error, field=field,
                  presets=list(PRESETS), default_preset=settings.api.default_preset, adapters=adapters,
                  resolutions=job_form.RESOLUTIONS, element_rows=job_form.ELEMENT_ROWS,
                  formats=job_form.OUTPUT_FORMATS, priorities=job_form.PRIORITIES, magic_modes=job_form.MAGIC_MODES,
                  magic_available=magic_prompt_available(settings.model))


@router.get("/create")
def create_form(request: Request, user: CurrentUser, session: SessionDep, settings: SettingsDep) -> Response:
    return _form_page(request, session, user, settings, values={})


@router.post("/create")
async def create(request: Request, user: CurrentUser, session: SessionDep, settings: SettingsDep,
                 store: JobStoreDep, storage: StorageDep) -> Response:
    form = await submitted_form(request, user)
    try:
        job, _ = await submit_job(job_form.request_from_form(form), key_hash=user.key_hash, store=store,
                                  settings=settings, storage=storage)
    except (RequestError, LetterpressError) as exc:
        message, field = (str(exc), exc.field) if isinstance(exc, RequestError) else (exc.message, exc.field)
        status = 422 if isinstance(exc, RequestError) else exc.status_code
        return await run_in_threadpool(_form_page, request, session, user, settings,
                                       values=job_form.form_values(form), error=message, field=field, status=status)
    return RedirectResponse(f"/ui/jobs/{job.id}", status_code=303)


def _image_url(job: Job, index: int) -> str:
    return f"/ui/jobs/{job.id}/images/{index}"


@router.get("/jobs/{job_id}")
async def job_page(job_id: str, request: Request, user: CurrentUser, store: JobStoreDep,
                   storage: StorageDep) -> Response:
    job = await store.read(user.key_hash, job_id)
    shown = jsonable_encoder(job_out(request, storage, job, await store.queue_place(job)))
    return render(request, "job.html", job=shown, params=job.params, status_code=200,
                  image_urls=[(i.index, _image_url(job, i.index), f"/ui/jobs/{job.id}/thumbs/{i.index}")
                              for i in sorted(job.images, key=lambda i: i.index)])


@router.get("/jobs/{job_id}/events")
async def job_page_events(job_id: str, request: Request, user: CurrentUser, store: JobStoreDep,
                          storage: StorageDep, settings: SettingsDep) -> StreamingResponse:
    """The job's stream for the page's script (an EventSource sends the cookie, not a key)."""
    return await job_event_stream(request, store, user.key_hash, job_id, storage, settings,
                                  request.headers.get("last-event-id"))


@router.post("/jobs/{job_id}/cancel")
async def cancel(job_id: str, request: Request, user: CurrentUser, session: SessionDep) -> Response:
    await submitted_form(request, user)

    def cancel_job() -> None:
        job_states.cancel(session, job=job_states.get_job(session, job_id, tenant_id=user.tenant.id))
        session.commit()

    await run_in_threadpool(cancel_job)
    return RedirectResponse(f"/ui/jobs/{job_id}", status_code=303)


@router.post("/jobs/{job_id}/again")
async def again(job_id: str, request: Request, user: CurrentUser, store: JobStoreDep, settings: SettingsDep,
                storage: StorageDep) -> Response:
    """`seed=new`: the same recipe with a seed the server picks; `seed=same`: the job exactly (reproduce)."""
    form = await submitted_form(request, user)
    job = await store.read(user.key_hash, job_id)
    body = job_form.request_from_job(job.params, new_seed=form.get("seed") == "new",
                                     priority=priority_of(job.queue) or "normal")
    new, _ = await submit_job(body, key_hash=user.key_hash, store=store, settings=settings, storage=storage)
    return RedirectResponse(f"/ui/jobs/{new.id}", status_code=303)


def _owned_image(session, user, job_id: str, index: int):
    job = job_states.get_job(session, job_id, tenant_id=user.tenant.id)
    image = next((i for i in job.images if i.index == index), None)
    if image is None:
        raise NotFound(f"job {job_id} has no image {index}")
    return image


@router.get("/jobs/{job_id}/images/{index}")
def image(job_id: str, index: int, user: CurrentUser, session: SessionDep, storage: StorageDep) -> Response:
    """The full image, served from this origin (the page's policy allows no other image source)."""
    key = _owned_image(session, user, job_id, index).key
    headers = {"Cache-Control": "private, max-age=86400"}  # an image never changes once written
    path = storage.local_path(key)
    if path is not None:
        return FileResponse(path, media_type=content_type_of(key), headers=headers)
    return Response(storage.get(key), media_type=content_type_of(key), headers=headers)


@router.get("/jobs/{job_id}/thumbs/{index}")
def thumbnail(job_id: str, index: int, user: CurrentUser, session: SessionDep, storage: StorageDep,
              settings: SettingsDep) -> Response:
    key = _owned_image(session, user, job_id, index).key
    return Response(thumbnails.thumbnail(storage, key, settings.console.thumbnail_px),
                    media_type=thumbnails.CONTENT_TYPE, headers={"Cache-Control": "private, max-age=86400"})
