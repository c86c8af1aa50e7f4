"""Server-Sent Events of one job (`GET /v1/jobs/{id}/events`): what the caller would otherwise poll for.

The stream is a sequence of snapshots. The job is read every `events_poll_s` (`api.job_store`, the same
statements as `GET /v1/jobs/{id}`). Each change of status, progress or queue position is sent as `event: progress`
with `{status, step, total, queue_position, eta_s}`. The end is `event: done` with the whole job object (images
included), after which the stream closes.

- An event's id is the snapshot it describes (`status.step.total.position`). A client that reconnects with
  `Last-Event-ID` gets nothing it already saw: it receives the next change, or `done` unless its last event was
  that `done`.
- A comment line (`: keep-alive`) is sent every `events_heartbeat_s` without a change, so a proxy's idle timeout
  never cuts a long wait.
- `X-Accel-Buffering: no` and `Cache-Control: no-cache` keep proxies from buffering the stream.
- A stream lasts at most `events_max_s`, then ends with `event: timeout`, telling the client to reconnect (with its
  Last-Event-ID).
- At most `events_max_streams` streams are open per API process; one more is a 429 with `Retry-After`. The streams
  are not counted in the admission control of short requests (api/limits.py), since they are long on purpose.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from common.errors import TooManyRequests
from common.models import Job, JobStatus
from common.queue_position import QueuePlace
from common.settings import ApiSettings

_open = 0  # streams open in this process (one event loop: no lock)


def _format(event: str, data: Any, event_id: str | None = None) -> bytes:
    lines = [f"event: {event}"] + ([f"id: {event_id}"] if event_id is not None else [])
    lines.append("data: " + json.dumps(data, separators=(",", ":"), default=str))
    return ("\n".join(lines) + "\n\n").encode()


def snapshot_id(job: Job, place: QueuePlace | None) -> str:
    return f"{job.status}.{job.progress_step}.{job.progress_total}.{place.position if place else '-'}"


def check_room(api: ApiSettings) -> None:
    """TooManyRequests (429) when this process has `events_max_streams` streams open. A stream counts itself
    while it runs (in `job_events`, so it can never be left counted), so streams that start together may pass
    the bound by a few: it protects the process, it is not a quota."""
    if _open >= api.events_max_streams:
        raise TooManyRequests("too many event streams are open on this server; retry shortly", retry_after_s=5)


async def job_events(read: Callable[[], Awaitable[tuple[Job, QueuePlace | None]]],
                     render: Callable[[Job, QueuePlace | None], dict], api: ApiSettings,
                     last_event_id: str | None) -> AsyncIterator[bytes]:
    """The stream of one job (module doc); `read` gives its current state, `render` the job object."""
    global _open
    _open += 1
    try:
        sent, started, quiet_since = last_event_id, time.monotonic(), time.monotonic()
        while True:
            job, place = await read()
            current = snapshot_id(job, place)
            if job.status in JobStatus.TERMINAL:
                if current != sent:
                    yield _format("done", render(job, place), current)
                return
            if current != sent:
                sent, quiet_since = current, time.monotonic()
                yield _format("progress", {"status": job.status, "step": job.progress_step,
                                           "total": job.progress_total,
                                           "queue_position": place.position if place else None,
                                           "eta_s": place.eta_s if place else None}, current)
            elif time.monotonic() - quiet_since >= api.events_heartbeat_s:
                quiet_since = time.monotonic()
                yield b": keep-alive\n\n"
            if time.monotonic() - started >= api.events_max_s:
                yield _format("timeout", {"reconnect": True, "last_event_id": sent})
                return
            await asyncio.sleep(api.events_poll_s)
    finally:
        _open -= 1
