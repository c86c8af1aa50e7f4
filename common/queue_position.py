"""Where a queued job stands: `position` (how many jobs will start before it; 0 = next) and `eta_s` (an estimate of
the seconds until it starts). The position is one SQL statement; the ETA adds the fleet's recent throughput, one
cheap query cached per process for a few seconds.

The model is the schedulers' own rules, read from the code:

- The broker (common/broker.py) holds two lists, `interactive` and `batch`; a worker takes one message at a time
  (prefetch 1) and kombu's Redis transport serves the lists in turn (it rotates their order after every message).
  Each list is FIFO in send order: `enqueued_at`, then `created_at` (and `batch_line`, `id`, for sends of one
  feeder pass, which share their `enqueued_at`). An unsent job (`enqueued_at` NULL: its send failed or it was
  requeued) is sent later, so it stands behind every sent one.
- Batch items wait in Postgres until the feeder (worker/feeder.py) sends them; it sends none while interactive work
  waits (`interactive_first`), and picks them with common.batches.feed_candidates by weighted fair share
  (common.fair_share, priority lanes): the tenant with the lowest pass, inside it the batch with the lowest pass,
  each turn adding 1/weight to both; each batch gives its unfed items in line order.

So, with W = interactive jobs waiting and F = batch items already sent and still queued:

- an interactive job with k sent/unsent interactive jobs before it in its list: `k + min(F, k)` (the workers
  alternate between the lists). Any other non-batch queue: `k`.
- a sent batch item with f sent items before it: `f + min(W, f)`.
- an unsent batch item, r unfed items before it in its own batch:
  `W + F + K + sum over other tenants T of min(unfed items of T, turns of T before virtual time
  pass(me) + K / weight(me))`, where K = r + sum over the tenant's other batches b with unfed items of
  min(unfed items of b, turns of b before pass(my batch) + r / weight(my batch)) is the number of turns the tenant
  takes before this item's. A client at pass p with weight w takes ceil((t - p) * w) turns before virtual time t,
  one more when it reaches t exactly and wins the tie (fair_share.turns_before); the passes are the scheduler's
  effective ones (fair_share.effective_passes, spelled in SQL by `_effective`).

It is exact for the scheduler's policy taken one item at a time (tests/common/test_queue_position.py checks it
against feed_candidates, one slot a pass, with and without priorities). It is an estimate beyond that: a
multi-item top-up orders the items of one pass slightly differently; a tenant's weight is that of its
highest-priority batch with items left, so when that batch runs out before its others the tenant's later turns
come more slowly than the model says; co-batching, retries, cancels, priority changes and new arrivals
(interactive jobs submitted later go first) move things further. A batch whose lines name adapters is fed one
adapter group after another (`batches.group_by_adapter`), while `r` below still counts the items before this one
in line order: for such a batch the position is the line-order estimate, not yet the grouped order (a known gap).

What it reveals: a single number. Another tenant's backlog enters only as `min(backlog, its turns before
ours)`, i.e. no more than the fair share itself implies (whether that tenant has more than our turns to go);
per-tenant or per-batch figures are never returned, and a tenant's own jobs are counted exactly.

Cost: every count walks an index range (`ix_jobs_batch_unfed` of migration 0002, `ix_jobs_queued_sent` of 0004,
`ix_jobs_status_queue_created` of 0001). A batch's unfed items are counted one by one up to EXACT_UPTO (and no
further than the cap, when only min(items, cap) is wanted); past that the rest are extrapolated over its remaining
line numbers at the density of the last half counted (exact for a batch's untouched tail, where lines are
consecutive; close for the scattered items of a resumed batch; low where a scattered head meets an untouched tail).
So a position costs about EXACT_UPTO index entries per in-progress batch at most, plus the broker lists' lengths,
never a whole backlog: a few ms (docs/PERFORMANCE.md, "Queue position"). A job of a broker list costs O(jobs ahead
of it) (an index range); for many polled jobs of one list, LANE_RANK_SQL reads the whole list once (its ids in
order, 16 bytes a job) and LaneRank places each of them from that (the API's polls, api/recent_places.py).

ETA: `(position + 1) / throughput`, where throughput is jobs started fleet-wide per second recently (interactive
and batch jobs share the workers): the last THROUGHPUT_SAMPLE starts within THROUGHPUT_WINDOW_S, over the time they
span when there are that many (a busy fleet: a recent, exact rate), else the starts in the window over the window.
None without a start in the window. A start is a first claim (`started_at`); a job's retries do not count again.
"""
from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import TextClause, text
from sqlalchemy.orm import Session

from common import fair_share
from common.broker import BATCH_QUEUE, INTERACTIVE_QUEUES
from common.models import Job, JobStatus
from common.settings import get_settings

THROUGHPUT_WINDOW_S = 300.0   # "recent": starts in the last five minutes
THROUGHPUT_SAMPLE = 200       # at most this many starts are read; a busy fleet's rate comes from their span
THROUGHPUT_CACHE_S = 5.0      # per process: one throughput query every few seconds, whatever the read rate


@dataclass(frozen=True)
class QueuePlace:
    position: int            # jobs that will start before this one (0 = next)
    eta_s: float | None      # seconds until it starts, estimated; None without recent throughput


EXACT_UPTO = 1000  # per batch, unfed items counted one by one; past them the count is extrapolated (module doc)


# The interactive lanes, in the order workers serve them (common.broker.QUEUES); any other queue after them.
_LANES = "(:lane_high, :lane_normal, :lane_low)"
LANE_PARAMS = {f"lane_{priority}": queue for priority, queue in INTERACTIVE_QUEUES.items()}
_LANE_ORDER = tuple(INTERACTIVE_QUEUES.values())


def lanes_before(queue: str) -> list[str]:
    """The interactive lanes workers serve before `queue`: every one of them for a queue that is not a lane. Passed
    to the statements as a list, so their count of those lanes' jobs is an index range; a rank computed per row in
    SQL read every queued job of every lane (a sequential scan: 30 ms at 50,000 queued, for any job's place)."""
    return list(_LANE_ORDER[:_LANE_ORDER.index(queue)] if queue in _LANE_ORDER else _LANE_ORDER)


def _unfed(batch: str, *, below: str | None = None, cap: str | None = None) -> str:
    """SQL for how many unfed items batch `batch` has before line `below`, or in all but at most `cap` (one of the
    two). The first :exact items are counted off the partial index ix_jobs_batch_unfed (its predicate spelled out so
    the planner takes it); when there are more, the rest are extrapolated over the remaining line numbers at the
    density of the second half of those counted (lines above the median, percentile_disc's rank :half), so the cost
    stays O(:exact) whatever the backlog."""
    assert (below is None) != (cap is None)
    where = f"u.batch_id = {batch} AND u.batch_id IS NOT NULL AND u.status = 'queued' AND u.enqueued_at IS NULL"
    if below is not None:
        where += f" AND u.batch_line < {below}"
    last_line = f"{below} - 1" if below is not None else f"(SELECT max(u.batch_line) FROM jobs u WHERE {where})"
    extrapolated = (f"h.n + round(({last_line} - h.last) * (h.n - :half)::numeric / greatest(h.last - h.mid, 1))")
    value = f"CASE WHEN h.n < :exact THEN h.n ELSE {extrapolated} END"
    # The limit is an expression of the outer row on purpose: unknown when planning, it is taken as a small fraction
    # of the rows, so the planner walks the index in line order instead of bitmap-scanning and sorting the whole
    # batch (which it picks for a constant limit when its row estimate is low and pages are not all-visible).
    limit = f"least({below if cap is None else cap}, :exact)"
    if cap is not None:
        value = f"least({cap}, {value})"
    return f"""(SELECT ({value})::bigint FROM (
            SELECT count(*) AS n, max(x.line) AS last, percentile_disc(0.5) WITHIN GROUP (ORDER BY x.line) AS mid
            FROM (SELECT u.batch_line AS line FROM jobs u WHERE {where} ORDER BY u.batch_line LIMIT {limit}) x) h)"""



def _turns(pass_: str, weight: str, at: str, wins_tie: str) -> str:
    """SQL of common.fair_share.turns_before: the turns a client at `pass_` with `weight` takes before virtual
    time `at` (one more when it reaches `at` exactly and wins the tie)."""
    span = f"(({at}) - {pass_}) * {weight}"
    return (f"(CASE WHEN {span} < 0 THEN 0 ELSE ceil({span})::bigint"
            f" + CASE WHEN {span} = floor({span}) AND {wins_tie} THEN 1 ELSE 0 END END)")


def _effective(pass_: str, partition: str) -> tuple[str, str]:
    """SQL of common.fair_share.effective_passes over a window: the known pass clamped to the floor (NULL kept,
    as `p0`), then the effective pass (a NULL at the floor, 0 when no pass is known)."""
    floor = f"max({pass_}) OVER ({partition}) - :slack"
    return (f"CASE WHEN {pass_} IS NOT NULL THEN greatest({pass_}, {floor}) END",
            f"coalesce(p0, {floor.replace(pass_, 'p0')}, 0)")


_B_CLAMP, _B_PASS = _effective("feed_pass", "PARTITION BY tenant_id")  # batches, inside each tenant
_T_CLAMP, _T_PASS = _effective("feed_pass", "")                         # tenants, among themselves

# A batch item. Every count is of the caller's own rows or capped at the caller's turns.
BATCH_SQL = text(f"""
WITH me AS (
    SELECT j.id, j.tenant_id, j.batch_id, j.batch_line, j.enqueued_at, j.created_at
    FROM jobs j WHERE j.id = :job_id AND j.status = 'queued'
),
waiting AS (    -- W: interactive jobs waiting (every lane); the feeder sends no batch item while any does
    SELECT count(*) AS n FROM jobs WHERE status = 'queued' AND queue IN {_LANES}
),
sent AS (       -- F: batch items already in the broker (all of them, or those before me when I am one)
    SELECT count(*) AS n FROM jobs j, me
    WHERE j.status = 'queued' AND j.queue = :batch AND j.enqueued_at IS NOT NULL
      AND (j.enqueued_at, j.created_at, j.batch_line, j.id)
          < (coalesce(me.enqueued_at, 'infinity'), me.created_at, me.batch_line, me.id)
),
ahead AS (      -- r: my batch's unfed items before my line (none once I am sent)
    SELECT CASE WHEN me.enqueued_at IS NULL THEN {_unfed("me.batch_id", below="me.batch_line")} ELSE 0 END AS r
    FROM me
),
active AS (     -- the feeder's batches: in progress with items left to send, each with its priority's weight
    SELECT b.id, b.tenant_id, b.created_at, b.feed_pass,
           (CASE b.priority WHEN 'high' THEN :w_high WHEN 'low' THEN :w_low ELSE :w_normal END)::float8 AS w
    FROM batches b
    WHERE b.status = 'in_progress' AND EXISTS (SELECT 1 FROM jobs u WHERE u.batch_id = b.id
          AND u.batch_id IS NOT NULL AND u.status = 'queued' AND u.enqueued_at IS NULL)
),
bpass AS (      -- their effective passes inside their tenants
    SELECT id, tenant_id, created_at, w, {_B_PASS} AS p
    FROM (SELECT a.*, {_B_CLAMP} AS p0 FROM active a) c
),
tpass AS (      -- the tenants': weight of the highest-priority batch, effective pass among tenants
    SELECT tenant_id, created_at, w, {_T_PASS} AS p
    FROM (SELECT t.id AS tenant_id, t.created_at, g.w, {_T_CLAMP} AS p0
          FROM (SELECT tenant_id, max(w) AS w FROM active GROUP BY tenant_id) g JOIN tenants t ON t.id = g.tenant_id) c
),
mine AS (
    SELECT b.p AS bp, b.w AS bw, b.created_at AS bc, b.id AS bid, t.p AS tp, t.w AS tw, t.created_at AS tc,
           t.tenant_id
    FROM me JOIN bpass b ON b.id = me.batch_id JOIN tpass t ON t.tenant_id = me.tenant_id
),
own AS (        -- my tenant's other batches: each gives min(its unfed, its turns before my batch's r-th)
    SELECT coalesce(sum({_unfed("b.id", cap=_turns("b.p", "b.w", "m.bp + a.r / m.bw",
                                                   "(b.created_at, b.id) < (m.bc, m.bid)"))}), 0) AS n
    FROM mine m CROSS JOIN ahead a JOIN bpass b ON b.tenant_id = m.tenant_id AND b.id <> m.bid
),
rounds AS (     -- K: turns my tenant takes before my item's
    SELECT a.r + own.n AS k FROM ahead a, own
),
caps AS (       -- each other tenant's turns before my tenant's K-th
    SELECT t.tenant_id, {_turns("t.p", "t.w", "m.tp + r.k / m.tw",
                                "(t.created_at, t.tenant_id) < (m.tc, m.tenant_id)")} AS cap
    FROM tpass t, mine m, rounds r WHERE t.tenant_id <> m.tenant_id
),
others AS (     -- sum over other tenants of min(its unfed items, its cap); each batch's count stops at the cap
    SELECT coalesce(sum(least(per.n, per.cap)), 0) AS n FROM (
        SELECT c.tenant_id, c.cap, sum({_unfed("b.id", cap="c.cap")}) AS n
        FROM caps c JOIN bpass b ON b.tenant_id = c.tenant_id
        GROUP BY c.tenant_id, c.cap) per
)
SELECT (CASE WHEN me.enqueued_at IS NOT NULL THEN s.n + w.n
             ELSE w.n + s.n + r.k + o.n END)::bigint AS position
FROM me, waiting w, sent s, rounds r, others o
""")

# Any other job: FIFO in its broker list (sent ones in send order, then unsent ones by age), behind every job
# waiting in the lanes served before its own.
FIFO_SQL = text("""
WITH me AS (
    SELECT id, queue, enqueued_at, created_at FROM jobs WHERE id = :job_id AND status = 'queued'
),
sent AS (
    SELECT count(*) AS n FROM jobs j, me
    WHERE j.status = 'queued' AND j.queue = me.queue AND j.enqueued_at IS NOT NULL
      AND (j.enqueued_at, j.created_at, j.id) < (coalesce(me.enqueued_at, 'infinity'), me.created_at, me.id)
),
unsent AS (
    SELECT count(*) AS n FROM jobs j, me
    WHERE me.enqueued_at IS NULL AND j.status = 'queued' AND j.queue = me.queue AND j.enqueued_at IS NULL
      AND (j.created_at, j.id) < (me.created_at, me.id)
),
higher AS (     -- jobs waiting in the lanes served before mine (lanes_before)
    SELECT count(*) AS n FROM jobs WHERE status = 'queued' AND queue = ANY(CAST(:higher AS varchar[]))
)
SELECT s.n + u.n + h.n AS position FROM me, sent s, unsent u, higher h
""")

# A broker list's order, as FIFO_SQL counts it: sent jobs in send order, then unsent ones by age.
_LIST_ORDER = "enqueued_at NULLS LAST, created_at, id"
_HIGHER = "SELECT count(*) FROM jobs WHERE status = 'queued' AND queue = ANY(CAST(:higher AS varchar[]))"

# FIFO_SQL for many jobs of one broker list at once (a list page): the same count, as each job's rank in the list's
# order, in one statement instead of one per job.
FIFO_MANY_SQL = text(f"""
WITH ranked AS (
    SELECT id, row_number() OVER (ORDER BY {_LIST_ORDER}) - 1 AS k
    FROM jobs WHERE status = 'queued' AND queue = :queue
)
SELECT r.id, r.k + ({_HIGHER}) AS position FROM ranked r WHERE r.id = ANY(:ids)
""")

# A broker list at once, for LaneRank: the ids of its first RANKED_MOST queued jobs in the list's order (16 bytes
# each, one bytea: no row or object per job), the jobs waiting in the lanes served before it, and when it was read.
RANKED_MOST = 50_000  # 800 kB; read in about 45 ms on the 2-core machine, a place found in it in at most 0.2 ms
LANE_RANK_SQL = text(f"""
SELECT now() AS read_at, ({_HIGHER}) AS higher,
       coalesce((SELECT string_agg(uuid_send(id), ''::bytea ORDER BY {_LIST_ORDER}) FROM (
                     SELECT id, enqueued_at, created_at FROM jobs WHERE status = 'queued' AND queue = :queue
                     ORDER BY {_LIST_ORDER} LIMIT {RANKED_MOST}) listed), ''::bytea) AS ids
""")


@dataclass(frozen=True)
class LaneRank:
    """A broker list ranked at one moment (LANE_RANK_SQL): every queued job's position in it, from one read."""
    read_at: datetime  # the database's time of the read
    higher: int        # jobs waiting then in the lanes served before this one
    ids: bytes         # the list's queued job ids then, in its order, 16 bytes each

    @classmethod
    def of_row(cls, row) -> LaneRank:
        return cls(read_at=row["read_at"], higher=int(row["higher"]), ids=bytes(row["ids"]))

    def position(self, job_id: uuid.UUID, created_at: datetime) -> int | None:
        """The job's position when the list was read; for a job created since, the place behind every job read
        (it was not queued yet: its position then, the jobs queued alongside it aside). None: the job was not in
        the list then although it existed (requeued since, in another list, or past the first RANKED_MOST): count
        it on its own (FIFO_SQL)."""
        needle, at = job_id.bytes, self.ids.find(job_id.bytes)
        while at >= 0 and at % 16:  # a match across two ids (never seen with random ids, but cheap to rule out)
            at = self.ids.find(needle, at + 1)
        if at >= 0:
            return at // 16 + self.higher
        whole = len(self.ids) < RANKED_MOST * 16  # else the jobs past the first RANKED_MOST are counted on their own
        return len(self.ids) // 16 + self.higher if whole and created_at > self.read_at else None


THROUGHPUT_SQL = text("""
SELECT count(*) AS n, extract(epoch FROM now() - min(started_at)) AS span_s FROM (
    SELECT started_at FROM jobs WHERE started_at > now() - make_interval(secs => :window)
    ORDER BY started_at DESC LIMIT :sample) recent
""")


def position_query(*, job_id: uuid.UUID, queue: str, batch_item: bool,
                   exact_upto: int = EXACT_UPTO) -> tuple[TextClause, dict]:
    """The one statement of a job's position and its parameters (a row with `position`; none when not queued);
    `queue` is the job's broker list. `position` runs it on a session; the API's async poll (api/job_store.py) on
    its own connection."""
    exact_upto = max(2, exact_upto)
    weights = get_settings().batches.priority_weights
    return (BATCH_SQL if batch_item else FIFO_SQL), {
        "job_id": job_id, "batch": BATCH_QUEUE, **LANE_PARAMS, "higher": lanes_before(queue),
        "exact": exact_upto, "half": (exact_upto + 1) // 2,  # half: the median's rank (percentile_disc(0.5))
        "w_high": weights["high"], "w_normal": weights["normal"], "w_low": weights["low"],
        "slack": fair_share.slack(weights)}


def position(session: Session, *, job_id: uuid.UUID, queue: str, batch_item: bool,
             exact_upto: int = EXACT_UPTO) -> int | None:
    """The job's position (one statement), or None when it is not queued."""
    sql, params = position_query(job_id=job_id, queue=queue, batch_item=batch_item, exact_upto=exact_upto)
    value = session.scalar(sql, params)
    return None if value is None else int(value)


THROUGHPUT_PARAMS = {"window": THROUGHPUT_WINDOW_S, "sample": THROUGHPUT_SAMPLE}

# per process: database URL -> (when it was read, jobs started per second)
_cache: dict[str, tuple[float, float | None]] = {}
_cache_lock = threading.Lock()


def cached_throughput(database: str, *, max_age_s: float = THROUGHPUT_CACHE_S) -> tuple[bool, float | None]:
    """(True, rate) when this process read the throughput of `database` less than `max_age_s` ago, else
    (False, None): run THROUGHPUT_SQL with THROUGHPUT_PARAMS and hand its row to remember_throughput."""
    with _cache_lock:
        hit = _cache.get(database)
    if hit is not None and time.monotonic() - hit[0] < max_age_s:
        return True, hit[1]
    return False, None


def remember_throughput(database: str, n: int, span_s: float | None) -> float | None:
    """The rate from THROUGHPUT_SQL's row (`n` starts, the oldest `span_s` seconds ago), cached for `database`."""
    if not n:
        rate = None
    elif n >= THROUGHPUT_SAMPLE and span_s and span_s > 0:
        rate = n / float(span_s)  # a busy fleet: the span of its latest starts
    else:
        rate = n / THROUGHPUT_WINDOW_S
    with _cache_lock:
        _cache[database] = (time.monotonic(), rate)
    return rate


def recent_throughput(session: Session, *, max_age_s: float = THROUGHPUT_CACHE_S) -> float | None:
    """Jobs started per second fleet-wide, recently (see the module doc); None without a start in the window.
    Cached per process and database for `max_age_s`."""
    database = session.get_bind().url.render_as_string(hide_password=False)
    hit, rate = cached_throughput(database, max_age_s=max_age_s)
    if hit:
        return rate
    row = session.execute(THROUGHPUT_SQL, THROUGHPUT_PARAMS).one()
    return remember_throughput(database, row.n, row.span_s)


def forget_throughput() -> None:
    """Drop the cached throughput (tests)."""
    with _cache_lock:
        _cache.clear()


def eta_s(position: int, throughput: float | None) -> float | None:
    """(position + 1) / throughput, in seconds to a tenth; None without a throughput."""
    if not throughput:
        return None
    return round((position + 1) / throughput, 1)


def queue_place(session: Session, *, job: Job) -> QueuePlace | None:
    """Where a queued job stands and when it should start; None when the job is not queued (any more)."""
    if job.status != JobStatus.QUEUED:
        return None
    pos = position(session, job_id=job.id, queue=job.queue, batch_item=job.batch_id is not None)
    if pos is None:  # it left the queue since it was read
        return None
    return QueuePlace(position=pos, eta_s=eta_s(pos, recent_throughput(session)))


def queue_places(session: Session, jobs: Sequence[Job]) -> dict[uuid.UUID, QueuePlace]:
    """`queue_place` of many jobs (a list page) by job id, for the queued ones: the jobs of each broker list in one
    statement (FIFO_MANY_SQL), batch items one statement each (their position depends on the feeder's turns)."""
    queued = [job for job in jobs if job.status == JobStatus.QUEUED]
    found: dict[uuid.UUID, int] = {}
    by_queue: dict[str, list[uuid.UUID]] = {}
    for job in queued:
        if job.batch_id is None:
            by_queue.setdefault(job.queue, []).append(job.id)
        elif (p := position(session, job_id=job.id, queue=job.queue, batch_item=True)) is not None:
            found[job.id] = p
    for queue, ids in by_queue.items():
        rows = session.execute(FIFO_MANY_SQL, {"queue": queue, "ids": ids, "higher": lanes_before(queue)})
        found.update({row.id: int(row.position) for row in rows})
    if not found:
        return {}
    throughput = recent_throughput(session)
    return {job_id: QueuePlace(position=p, eta_s=eta_s(p, throughput)) for job_id, p in found.items()}
