"""The job stream on its own (no server; api/event_streams.py, called as event_streams.job_events as the routes
do): snapshots only on change, keep-alive comments while nothing changes, `done` last, the time limit,
Last-Event-ID resumption, a read that finds the job gone, and the per-process bound on open streams."""
from __future__ import annotations

import asyncio
import types

import pytest

from api import event_streams
from common.errors import NotFound, TooManyRequests
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
        return [chunk async for chunk in event_streams.job_events(read, lambda j, p: {"status": j.status}, api, last)]
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


def test_a_job_gone_mid_stream_ends_it_quietly():
    """A LetterpressError after the stream started (the job deleted, the key revoked) closes the stream: the
    client's reconnect then gets the 404 or 401 as an answer, not a broken connection."""
    reads = iter([(job("running", 1), None)])

    async def read():
        try:
            return next(reads)
        except StopIteration:
            raise NotFound("job x not found") from None

    async def collect():
        return [chunk async for chunk in event_streams.job_events(read, lambda j, p: {}, FAST, None)]
    chunks = asyncio.run(collect())
    assert len(chunks) == 1 and chunks[0].startswith(b"event: progress")
    assert event_streams._open == 0


def test_open_streams_are_bounded_per_process(monkeypatch):
    monkeypatch.setattr(event_streams, "_open", 2)
    with pytest.raises(TooManyRequests):
        event_streams.check_room(ApiSettings(events_max_streams=2))
    event_streams.check_room(ApiSettings(events_max_streams=3))


def test_job_and_batch_streams_count_against_one_bound():
    """An open stream of either kind counts while it runs, and is uncounted when it ends or is closed early."""
    async def scenario():
        api = ApiSettings(events_poll_s=0.01, events_max_s=5, events_max_streams=2)

        async def job_read():
            return job("running", 1), None

        async def batch_read():
            return event_streams.Snapshot("in_progress.1.1.0.0.0.0", False, {})

        streams = [event_streams.job_events(job_read, lambda j, p: {}, api, None),
                   event_streams.event_stream(batch_read, api, None)]
        for stream in streams:
            await stream.__anext__()  # started: counted
        with pytest.raises(TooManyRequests):
            event_streams.check_room(api)
        for stream in streams:
            await stream.aclose()  # the client went away
        event_streams.check_room(api)
        return event_streams._open
    assert asyncio.run(scenario()) == 0


def test_a_running_jobs_preview_rides_with_its_progress_and_a_new_one_is_a_new_event():
    """The preview is read only for a running job; a new preview (same progress step) is a new event."""
    states = iter([(job("queued"), None)] + [(job("running", 2), None)] * 3 + [(job("succeeded", 4), None)])
    previews = iter([(2, "data:image/jpeg;base64,AAAA"), (2, "data:image/jpeg;base64,AAAA"),
                     (4, "data:image/jpeg;base64,BBBB")])
    asked = []

    async def read():
        return next(states)

    async def preview(j):
        asked.append(j.status)
        return next(previews)

    async def collect():
        return [c async for c in event_streams.job_events(read, lambda j, p: {"status": j.status}, FAST, None,
                                                          preview)]

    events = [c for c in asyncio.run(collect()) if c.startswith(b"event:")]
    assert asked == ["running"] * 3  # never for the queued or the finished job
    assert [e.split(b"\n")[1] for e in events] == [b"id: queued.0.4.-", b"id: running.2.4.-.p2",
                                                   b"id: running.2.4.-.p4", b"id: succeeded.4.4.-"]
    assert b'"preview":"data:image/jpeg;base64,AAAA"' in events[1] and b"BBBB" in events[2]
    assert b"preview" not in events[0]
