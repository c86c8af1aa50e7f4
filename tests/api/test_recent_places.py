"""api/recent_places.py: a job's place is kept for the TTL, then counted again; a new job's place follows the newest
counted one of its queue plus the jobs queued behind it since; one count at a time per job and per lane, the others
answered the last place meanwhile; past the TTL the caller that counts again is answered the last place too (it
counts in the background), and only a place never counted makes its caller wait."""
from __future__ import annotations

import uuid

import pytest

from api import recent_places
from api.recent_places import RecentPlaces, RecentRanks
from common.queue_position import QueuePlace


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(recent_places.time, "monotonic", lambda: now[0])
    return now


def test_a_place_is_kept_for_the_ttl_then_counted_again_while_the_last_one_is_answered(clock):
    places, job = RecentPlaces(ttl_s=1.0), uuid.uuid4()
    assert places.of(job) == (False, None, True)  # never counted: this caller counts while it waits
    places.remember(job, QueuePlace(position=7, eta_s=8.0))
    clock[0] += 0.9
    assert places.of(job) == (True, QueuePlace(position=7, eta_s=8.0), False)
    places.remember(uuid.uuid4(), None)  # a job that left the queue is remembered as such
    clock[0] += 0.2
    assert places.of(job) == (True, QueuePlace(position=7, eta_s=8.0), True)  # expired: answered, counted again


def test_new_jobs_follow_the_newest_counted_place_of_their_queue(clock):
    places = RecentPlaces(ttl_s=1.0)
    assert places.of_new("interactive") == (None, True)  # nothing counted yet: the caller counts while it waits
    places.remember_new("interactive", QueuePlace(position=10, eta_s=5.5), rate=2.0)
    assert places.of_new("interactive") == (QueuePlace(position=11, eta_s=6.0), False)
    assert places.of_new("interactive") == (QueuePlace(position=12, eta_s=6.5), False)
    assert places.of_new("interactive-high") == (None, True)  # another lane has its own count
    clock[0] += 1.1
    assert places.of_new("interactive") == (QueuePlace(position=13, eta_s=7.0), True)  # expired: counted again


def test_no_eta_without_a_throughput(clock):
    places = RecentPlaces(ttl_s=1.0)
    places.remember_new("interactive", QueuePlace(position=0, eta_s=None), rate=None)
    assert places.of_new("interactive") == (QueuePlace(position=1, eta_s=None), False)


def test_memory_is_bounded(clock, monkeypatch):
    monkeypatch.setattr(recent_places, "KEPT", 3)
    places, jobs = RecentPlaces(), [uuid.uuid4() for _ in range(5)]
    for job in jobs:
        places.remember(job, QueuePlace(position=1, eta_s=None))
    assert [places.of(job)[0] for job in jobs] == [False, False, True, True, True]


def test_while_one_caller_counts_a_place_again_the_others_get_the_last_one(clock):
    places, job = RecentPlaces(ttl_s=1.0), uuid.uuid4()
    places.remember(job, QueuePlace(position=7, eta_s=8.0))
    clock[0] += 1.1
    assert places.of(job) == (True, QueuePlace(position=7, eta_s=8.0), True)  # expired: this caller counts
    assert places.of(job) == (True, QueuePlace(position=7, eta_s=8.0), False)  # meanwhile: the last place
    places.remember(job, QueuePlace(position=5, eta_s=6.0))
    assert places.of(job) == (True, QueuePlace(position=5, eta_s=6.0), False)
    clock[0] += 1.1
    assert places.of(job)[2]
    places.forget_count(job)  # that count failed: the next caller counts
    assert places.of(job) == (True, QueuePlace(position=5, eta_s=6.0), True)


def test_one_count_at_a_time_for_a_lane_of_new_jobs(clock):
    places = RecentPlaces(ttl_s=1.0)
    assert places.of_new("interactive") == (None, True)  # the first ever: this caller counts...
    assert places.of_new("interactive") == (None, True)  # ...and with nothing counted yet, so does the next
    places.remember_new("interactive", QueuePlace(position=10, eta_s=None), rate=None)
    clock[0] += 1.1
    assert places.of_new("interactive") == (QueuePlace(position=11, eta_s=None), True)  # expired: this one counts
    assert places.of_new("interactive") == (QueuePlace(position=12, eta_s=None), False)  # meanwhile: on the last
    places.remember_new("interactive", None, rate=None)  # the count found the job gone: nothing new is kept
    assert places.of_new("interactive") == (QueuePlace(position=13, eta_s=None), True)  # expired, nobody counting


def test_a_lane_ranking_closed_before_its_read_started_leaves_nothing_behind():
    """RecentRanks.close cancels the reads in flight, even one cancelled before it ran; the next read is new."""
    import asyncio

    reads = []

    async def read(queue: str):
        reads.append(queue)
        await asyncio.sleep(0)
        return queue

    async def run() -> tuple[bool, bool, str]:
        ranks = RecentRanks(read)
        waiting = asyncio.ensure_future(ranks.of("interactive"))
        await asyncio.sleep(0)  # the caller has asked: its read is scheduled, not started
        assert ranks._reading and not reads
        await ranks.close()
        cancelled = await asyncio.gather(waiting, return_exceptions=True)
        return (not ranks._reading, isinstance(cancelled[0], asyncio.CancelledError),
                await ranks.of("interactive"))

    assert asyncio.run(run()) == (True, True, "interactive") and reads == ["interactive"]
