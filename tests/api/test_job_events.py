"""api/job_events.py's stream on its own (no server): snapshots only on change, keep-alive comments while nothing
changes, `done` last, the time limit, Last-Event-ID resumption, and the per-process bound on open streams."""
from __future__ import annotations

import asyncio
import types

import pytest

from api import job_events
from common.errors import TooManyRequests
from common.queue_position import QueuePlace
from common.settings import ApiSettings

FAST = ApiSettings(events_poll_s=0.01, events_heartbeat_s=0.03, events_max_s=5)


def job(status: str, step: int = 0, total: int = 4):
    return types.SimpleNamespace(status=status, progress_step=step, progress_total=total)


def run(states, api=FAST, last=None) -> list[bytes]:
    """The stream over a scripted sequence of (job, place) reads; the last one repeats."""
    it = iter(states)
    current = {}

    async def read():
        current["s"] = next(it, current.get("s"))
        return current["s"]

    async def collect():
        return [chunk async for chunk in job_events.job_events(read, lambda j, p: {"status": j.status}, api, last)]
    return asyncio.run(collect())


def test_snapshots_on_change_keep_alives_in_between_and_done_last():
    place = QueuePlace(position=3, eta_s=1.5)
    states = [(job("queued"), place)] * 8 + [(job("running", 1), None), (job("running", 1), None),
                                             (job("running", 2), None), (job("succeeded", 4), None)]
    chunks = run(states)
    events = [c for c in chunks if c.startswith(b"event:")]
    assert [e.split(b"\n")[0] for e in events] == [b"event: progress"] * 3 + [b"event: done"]
    assert b'"queue_position":3' in events[0] and b"id: queued.0.4.3" in events[0]
    assert b": keep-alive\n\n" in chunks  # the eight unchanged reads of the queued job
    assert chunks[-1].startswith(b"event: done") and b"id: succeeded.4.4.-" in chunks[-1]


def test_resuming_skips_what_the_client_saw():
    states = [(job("running", 2), None), (job("succeeded", 4), None)]
    assert [c.split(b"\n")[0] for c in run(states, last="running.2.4.-")] == [b"event: done"]
    assert run([(job("succeeded", 4), None)], last="succeeded.4.4.-") == []


def test_the_stream_ends_with_timeout_at_its_limit():
    chunks = run([(job("queued"), None)], api=ApiSettings(events_poll_s=0.01, events_max_s=0.05))
    assert chunks[0].startswith(b"event: progress") and chunks[-1].startswith(b"event: timeout")


def test_open_streams_are_bounded_per_process(monkeypatch):
    monkeypatch.setattr(job_events, "_open", 2)
    with pytest.raises(TooManyRequests):
        job_events.check_room(ApiSettings(events_max_streams=2))
    job_events.check_room(ApiSettings(events_max_streams=3))
