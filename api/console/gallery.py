"""The gallery: the tenant's images, newest first, a page at a time (cursor pagination, api/pagination.py) with
filters: status, preset, dates, batch, and text in the prompt. The page's script fetches the next page as a
fragment (`?fragment=1`) when the end of the grid scrolls into view; without a script, "More" is a plain link.
Thumbnails come from common/thumbnails.py (written by the worker with the image; made once on first view for
an image without one)."""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from api.console.auth import ConsoleRoute, CurrentUser
from api.console.rendering import render, render_fragment
from api.deps import SessionDep, SettingsDep
from api.pagination import newest_first
from common.errors import InvalidRequest
from common.models import Job, JobStatus
from common.presets import PRESETS

router = APIRouter(prefix="/ui", route_class=ConsoleRoute, include_in_schema=False)
FILTERS = ("status", "preset", "since", "until", "batch", "q")


@dataclass(frozen=True)
class Tile:
    job: Job
    index: int | None  # None: a job without images (queued, running, failed)


def _day(value: str, field: str) -> datetime:
    try:
        return datetime.combine(date.fromisoformat(value), time(), tzinfo=timezone.utc)
    except ValueError:
        raise InvalidRequest(f"{field} must be a date, YYYY-MM-DD", field=field) from None


def _like(text: str) -> str:
    """`text` as a literal inside an ILIKE pattern."""
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def filtered_jobs(tenant_id: uuid.UUID, filters: dict[str, str]):
    query = select(Job).where(Job.tenant_id == tenant_id).options(selectinload(Job.images))
    if status := filters.get("status"):
        if status not in JobStatus.ALL:
            raise InvalidRequest(f"status must be one of {', '.join(JobStatus.ALL)}", field="status")
        query = query.where(Job.status == status)
    if preset := filters.get("preset"):
        if preset not in PRESETS:
            raise InvalidRequest("no such preset", field="preset")
        query = query.where(Job.params["preset"].astext == preset)
    if since := filters.get("since"):
        query = query.where(Job.created_at >= _day(since, "since"))
    if until := filters.get("until"):
        query = query.where(Job.created_at < _day(until, "until") + timedelta(days=1))
    if batch := filters.get("batch"):
        try:
            query = query.where(Job.batch_id == uuid.UUID(batch))
        except ValueError:
            raise InvalidRequest("batch must be a batch id", field="batch") from None
    if text := filters.get("q"):
        if len(text) > 200 or "\x00" in text:
            raise InvalidRequest("search text: at most 200 characters", field="q")
        query = query.where(Job.params["prompt_text"].astext.ilike(_like(text)))
    return query


def _tiles(jobs: list[Job]) -> list[Tile]:
    tiles = []
    for job in jobs:
        images = sorted(job.images, key=lambda i: i.index)
        tiles += [Tile(job, i.index) for i in images] if images else [Tile(job, None)]
    return tiles


@router.get("/gallery")
def gallery(request: Request, user: CurrentUser, session: SessionDep, settings: SettingsDep,
            cursor: str | None = None, fragment: bool = False) -> Response:
    filters = {name: request.query_params.get(name, "").strip() for name in FILTERS}
    filters = {k: v for k, v in filters.items() if v}
    page = newest_first(session, filtered_jobs(user.tenant.id, filters), Job, cursor=cursor,
                        limit=settings.console.gallery_page)
    more_url = f"/ui/gallery?{urlencode({**filters, 'cursor': page.next_cursor})}" if page.has_more else None
    context = dict(tiles=_tiles(page.rows), more_url=more_url)
    if fragment:
        return HTMLResponse(render_fragment("_tiles.html", **context))
    return render(request, "gallery.html", filters=filters, statuses=JobStatus.ALL, presets=list(PRESETS),
                  **context)
