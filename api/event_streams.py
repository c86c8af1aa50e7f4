"""Server-Sent Events of one object until it ends (`GET /v1/jobs/{id}/events`, `GET /v1/batches/{id}/events`):
what the caller would otherwise poll for.

A stream is a sequence of snapshots (`Snapshot`: an id, whether the object has ended, the event's data). The
route's `read` gives the current one; the stream reads it every `events_poll_s` (a batch: at most once a second,
`BATCH_POLL_S`). Each snapshot whose id differs from the last one sent goes out as `event: progress`; the first
terminal one as `event: done` (the whole object, as its GET returns it), after which the stream closes.

- A job's progress is `{status, step, total, queue_position, eta_s}`, plus `preview` (a data: URL of a small JPEG,
  common/previews.py) while a running job has one; its id `status.step.total.position[.p<preview step>]`
  (`job_snapshot`). A batch's is `{status, request_counts, items_per_min, eta_s}`, its id the status and the six
  counts (`batch_snapshot`); the rate and ETA come from the items finished recently
  (common.batch_counts.completion_rate) and ride along with a change of the counts, not as one of their own.
- An event's id is the snapshot it describes. A client that reconnects with `Last-Event-ID` gets nothing it already
  saw: it receives the next change, or `done` unless its last event was that `done`.
- A comment line (`: keep-alive`) is sent every `events_heartbeat_s` without a change, so a proxy's idle timeout
  never cuts a long wait.
- The routes send `X-Accel-Buffering: no` and `Cache-Control: no-cache` (`HEADERS`) so proxies do not buffer.
- A stream lasts at most `events_max_s`, then ends with `event: timeout`, telling the client to reconnect (with its
  Last-Event-ID).
- A read that finds the object gone or the key no longer usable (a LetterpressError after the stream started) ends
  the stream quietly: the client's reconnect gets the 404 or 401 itself.
- At most `events_max_streams` streams, of jobs and batches together, are open per API process; one more is a 429
  with `Retry-After`. The streams are not counted in the admission control of short requests (api/limits.py),
  since they are long on purpose.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

from common.batch_counts import CompletionRate, RequestCounts
from common.errors import LetterpressError, TooManyRequests
from common.models import Batch, BatchStatus, Job, JobStatus
from common.queue_position import QueuePlace
from common.settings import ApiSettings

log = logging.getLogger(__name__)
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def openapi_200(description: str) -> dict:
    """A stream route's 200 in the OpenAPI document: each event as the object Schemathesis checks."""
    return {"description": description, "content": {"text/event-stream": {"schema": {
        "type": "object", "required": ["event", "data"],
        "properties": {"event": {"type": "string", "enum": ["progress", "done", "timeout"]},
                       "id": {"type": "string"},
                       "data": {"type": "string", "contentMediaType": "application/json"}}}}}}
# A batch's snapshot counts all its items (one GROUP BY, the statement of GET /v1/batches/{id}), where a job's is
# one row: a batch stream reads at most once a second.
BATCH_POLL_S = 1.0
_open = 0  # streams open in this process (one event loop: no lock)


@dataclass(frozen=True)
class Snapshot:
    id: str          # the event id; a snapshot with the id of the last one sent is not sent again
    terminal: bool   # the object has ended: `data` is the whole object, sent as `done`
    data: Any        # the event's data (JSON-encodable)


def _format(event: str, data: Any, event_id: str | None = None) -> bytes:
    lines = [f"event: {event}"] + ([f"id: {event_id}"] if event_id is not None else [])
    lines.append("data: " + json.dumps(data, separators=(",", ":"), default=str))
    return ("\n".join(lines) + "\n\n").encode()


def check_room(api: ApiSettings) -> None:
    """TooManyRequests (429) when this process has `events_max_streams` streams open. A stream counts itself
    while it runs (in `event_stream`, so it can never be left counted), so streams that start together may pass
    the bound by a few: it protects the process, it is not a quota."""
    if _open >= api.events_max_streams:
        raise TooManyRequests("too many event streams are open on this server; retry shortly", retry_after_s=5)


async def event_stream(read: Callable[[], Awaitable[Snapshot]], api: ApiSettings, last_event_id: str | None,
                       *, poll_s: float | None = None) -> AsyncIterator[bytes]:
    """The stream of one object (module doc): `read` gives its current snapshot; read every `poll_s` (default
    `events_poll_s`)."""
    global _open
    _open += 1
    try:
        sent, started, quiet_since = last_event_id, time.monotonic(), time.monotonic()
        while True:
            try:
                snapshot = await read()
            except LetterpressError as exc:  # gone, or the key was revoked: the reconnect answers it
                log.info("event stream ended: %s", exc)
                return
            if snapshot.terminal:
                if snapshot.id != sent:
                    yield _format("done", snapshot.data, snapshot.id)
                return
            if snapshot.id != sent:
                sent, quiet_since = snapshot.id, time.monotonic()
                yield _format("progress", snapshot.data, snapshot.id)
            elif time.monotonic() - quiet_since >= api.events_heartbeat_s:
                quiet_since = time.monotonic()
                yield b": keep-alive\n\n"
            if time.monotonic() - started >= api.events_max_s:
                yield _format("timeout", {"reconnect": True, "last_event_id": sent})
                return
            await asyncio.sleep(api.events_poll_s if poll_s is None else poll_s)
    finally:
        _open -= 1


# ------------------------------------------------------------------------------------------------- jobs

def job_snapshot_id(job: Job, place: QueuePlace | None, preview_step: int | None = None) -> str:
    base = f"{job.status}.{job.progress_step}.{job.progress_total}.{place.position if place else '-'}"
    return base if preview_step is None else f"{base}.p{preview_step}"


def job_snapshot(job: Job, place: QueuePlace | None, render: Callable[[Job, QueuePlace | None], dict],
                 preview: tuple[int, str] | None = None) -> Snapshot:
    """`render` gives the job object (for `done`); `preview` is the running job's latest (step, data: URL)."""
    if job.status in JobStatus.TERMINAL:
        return Snapshot(job_snapshot_id(job, place), True, render(job, place))
    data = {"status": job.status, "step": job.progress_step, "total": job.progress_total,
            "queue_position": place.position if place else None, "eta_s": place.eta_s if place else None}
    if preview is not None:
        data["preview"] = preview[1]
    return Snapshot(job_snapshot_id(job, place, preview[0] if preview else None), False, data)


PreviewRead = Callable[[Job], Awaitable[tuple[int, str] | None]]


def job_events(read: Callable[[], Awaitable[tuple[Job, QueuePlace | None]]],
               render: Callable[[Job, QueuePlace | None], dict], api: ApiSettings,
               last_event_id: str | None, preview: PreviewRead | None = None) -> AsyncIterator[bytes]:
    """The stream of one job: `read` gives its current state, `render` the job object, `preview` (optional) a
    running job's latest preview (common/previews.py)."""
    async def snapshot() -> Snapshot:
        job, place = await read()
        shown = await preview(job) if preview is not None and job.status == JobStatus.RUNNING else None
        return job_snapshot(job, place, render, shown)

    return event_stream(snapshot, api, last_event_id)


# ------------------------------------------------------------------------------------------------- batches

def batch_snapshot_id(batch: Batch, counts: RequestCounts) -> str:
    return ".".join([batch.status, *(str(n) for n in asdict(counts).values())])


def batch_snapshot(batch: Batch, counts: RequestCounts, rate: Callable[[], CompletionRate],
                   render: Callable[[], dict]) -> Snapshot:
    """`rate` is asked only for an unfinished batch, `render` (the batch object, for `done`) only for an ended
    one."""
    if batch.status in BatchStatus.TERMINAL:
        return Snapshot(batch_snapshot_id(batch, counts), True, render())
    recent = rate()
    return Snapshot(batch_snapshot_id(batch, counts), False,
                    {"status": batch.status, "request_counts": asdict(counts), "items_per_min": recent.per_min,
                     "eta_s": recent.eta_s})
