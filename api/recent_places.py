"""Queue places the API process computed in the last PLACE_TTL_S, so a poll does not count the queue again.

A position is one statement (common.queue_position), but it counts index entries up to the job's place: a job
10,000 deep costs Postgres milliseconds a poll, and clients poll often. Within a second the answer barely moves
(the ETA is an estimate anyway), so each process keeps, per job, the place it last computed, for PLACE_TTL_S:
a job polled 1,000 times a second costs one count a second.

A new job (`POST /v1/jobs`) stands behind every job queued in its lane and the lanes served before it, so its
place is that of the newest job of its queue: the first submit to a queue after the TTL counts it (the real
statement, on the new job); the next ones within the TTL add the jobs this process queued there since. That is
at most PLACE_TTL_S old, counting jobs other processes submitted meanwhile late and jobs workers took meanwhile
early; the next poll of the job counts afresh.

One count at a time per job and per lane: when a place is older than the TTL, the first caller counts it again
and the others are answered the last place counted meanwhile (older by at most the count's duration). Without
that, every request arriving during a count started its own, and since a count takes longer the deeper the
queue, a deep queue under load multiplied its counts: Postgres's CPU a submit grew from 0.9 to 3.1 ms between
4,000 and 16,000 queued jobs at 400 submits a second (docs/PERFORMANCE.md, "Front door: one count at a time").

A job of a broker list (not a batch item) is counted from its lane's ranking (RecentRanks): the whole list's
job ids in order, read in one statement at most once a TTL per process and lane (common.queue_position.LaneRank),
so polls of many jobs of a deep lane (each client polling its own) cost one read of the lane a second rather than
a count each. At 1,000 polls a second spread over 1,000 jobs of a lane 4,800 deep, the counts made Postgres shed
40% of them (docs/PERFORMANCE.md, "Front door: polls of many jobs").

No caller waits for a recount: when a place is older than the TTL, the caller that is to count it again is
answered the last place too and counts in the background (api/job_store.py); only a job or a lane never counted
in this process is counted while its caller waits. A count takes milliseconds to tens of them in a deep queue, and
the requests that waited on one were a share of the front door's p99. A place answered is therefore at most the
TTL plus one count old.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from common.queue_position import LaneRank, QueuePlace, eta_s

PLACE_TTL_S = 1.0
KEPT = 10_000  # jobs whose place is remembered per process


@dataclass
class _Newest:
    until: float
    place: QueuePlace
    rate: float | None   # jobs started per second when it was counted (for the ETA)
    added: int = 0       # jobs this process queued behind it since


class RecentPlaces:
    def __init__(self, ttl_s: float = PLACE_TTL_S):
        self.ttl_s = ttl_s
        self._by_job: OrderedDict[uuid.UUID, tuple[float, QueuePlace | None]] = OrderedDict()
        self._newest: dict[str, _Newest] = {}
        self._counting: set[uuid.UUID | str] = set()  # the jobs and lanes whose place a caller is counting now

    def of(self, job_id: uuid.UUID) -> tuple[bool, QueuePlace | None, bool]:
        """(known, place, count). known: `place` is the answer, counted within the TTL or, when older, the last
        one. count: the caller is to count the place again, then `remember` (or `forget_count`): while it waits
        when the place is not known, in the background when it is (its TTL is over and nobody counts it now)."""
        hit = self._by_job.get(job_id)
        if hit is not None and (hit[0] >= time.monotonic() or job_id in self._counting):
            return True, hit[1], False
        self._counting.add(job_id)
        return (False, None, True) if hit is None else (True, hit[1], True)

    def remember(self, job_id: uuid.UUID, place: QueuePlace | None) -> None:
        self._counting.discard(job_id)
        self._by_job[job_id] = (time.monotonic() + self.ttl_s, place)
        self._by_job.move_to_end(job_id)
        while len(self._by_job) > KEPT:
            self._by_job.popitem(last=False)

    def forget_count(self, key: uuid.UUID | str) -> None:
        """The count of this job's (or lane's) place failed: the next caller counts."""
        self._counting.discard(key)

    def of_new(self, queue: str) -> tuple[QueuePlace | None, bool]:
        """(place, count) of a job just queued in `queue`: the newest counted place there plus the jobs queued
        behind it since, or None when none was counted. count: the caller is to count the new job's place, then
        `remember_new` (or `forget_count`): while it waits when the place is None, in the background when not
        (the newest place's TTL is over and nobody counts the lane now)."""
        newest = self._newest.get(queue)
        count = newest is None or (newest.until < time.monotonic() and queue not in self._counting)
        if count:
            self._counting.add(queue)
        if newest is None:
            return None, count
        newest.added += 1
        position = newest.place.position + newest.added
        return replace(newest.place, position=position, eta_s=eta_s(position, newest.rate)), count

    def remember_new(self, queue: str, place: QueuePlace | None, rate: float | None) -> None:
        self._counting.discard(queue)
        if place is not None:
            self._newest[queue] = _Newest(until=time.monotonic() + self.ttl_s, place=place, rate=rate)


class RecentRanks:
    """Each lane's LaneRank, read at most once a TTL; callers while one is read wait for that one. Use it from one
    event loop only (the server's: api/job_store.py), where the read it shares outlives any one request."""

    def __init__(self, read: Callable[[str], Awaitable[LaneRank]], ttl_s: float = PLACE_TTL_S):
        self.ttl_s = ttl_s
        self._read = read
        self._ranks: dict[str, tuple[float, LaneRank]] = {}
        self._reading: dict[str, asyncio.Future] = {}

    async def of(self, queue: str) -> LaneRank:
        """The lane's ranking, read within the TTL (now, when it is older)."""
        kept = self._ranks.get(queue)
        if kept is not None and kept[0] >= time.monotonic():
            return kept[1]
        reading = self._reading.get(queue)
        if reading is None:
            reading = self._reading[queue] = asyncio.ensure_future(self._read_and_keep(queue))
        return await asyncio.shield(reading)  # a caller cancelled does not cancel the others' read

    async def close(self) -> None:
        """Cancel the reads in flight (the pool they read on is closing)."""
        reading = list(self._reading.values())
        for read in reading:
            read.cancel()
        await asyncio.gather(*reading, return_exceptions=True)
        self._reading.clear()  # a read cancelled before it started never ran its own cleanup

    async def _read_and_keep(self, queue: str) -> LaneRank:
        try:
            rank = await self._read(queue)
            self._ranks[queue] = (time.monotonic() + self.ttl_s, rank)
            return rank
        finally:
            self._reading.pop(queue, None)
