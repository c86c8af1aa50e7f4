"""common.queue_position on a real Postgres, in-process: the fair-share queue position and the ETA.

The position is global across tenants by design, so these tests run on a database of their own (no other test's
queued jobs or batches can be seen) and start each from an empty one. Feeding is done the feeder's way without
Redis: common.batches.feed_candidates picks, job_states.mark_enqueued marks (what dispatch does after a send)."""
from __future__ import annotations

import uuid
from datetime import datetime, timezone

import pytest
from sqlalchemy import event, func, select, text, update

from common import batches, job_states
from common import queue_position as qp
from common.batches import BatchOptions, items_source
from common.broker import BATCH_QUEUE, interactive_queue
from common.models import Batch, Job
from tests.support import scratch_settings

LINE = {"prompt": "a poster that says HELLO", "width": 256, "height": 256, "preset": "V4_TURBO_12", "steps": 2}
PARAMS = {"prompt": "p", "prompt_text": "p", "preset": "V4_TURBO_12", "width": 256, "height": 256, "steps": 2,
          "mu": 0.5, "std": 1.75, "guidance_schedule": [7.0, 3.0], "seed": 1, "seed_generated": False,
          "num_images": 1}


@pytest.fixture(scope="module")
def iso(services, stack_env):
    """Point this process (only) at a fresh database; restore afterwards."""
    with scratch_settings(services, stack_env, "lp_qpos") as settings:
        yield settings


@pytest.fixture
def db(iso):
    from common.db import session_scope

    with session_scope() as session:
        session.execute(text("TRUNCATE batches, jobs, tenants CASCADE"))
    qp.forget_throughput()
    return iso


def session():
    from common.db import session_scope

    return session_scope()


def tenant(name: str) -> uuid.UUID:
    from common.auth import get_or_create_tenant

    with session() as s:
        return get_or_create_tenant(s, name).id


def batch(settings, tenant_id: uuid.UUID, n: int, priority: str = "normal") -> list[uuid.UUID]:
    """A batch of n items; their job ids in line order."""
    with session() as s:
        b = batches.create_batch(
            s, tenant_id=tenant_id, source=items_source([{**LINE, "custom_id": f"c{i}"} for i in range(n)]),
            source_name="inline", options=BatchOptions(priority=priority), idempotency_key=None, api=settings.api,
            storage_prefix="images", max_attempts=3)
        return list(s.scalars(select(Job.id).where(Job.batch_id == b.id).order_by(Job.batch_line)))


def grow(job_id: uuid.UUID, n: int) -> None:
    """n more unfed items at the end of the job's batch (copies of the job, new lines): a big backlog, fast."""
    with session() as s:
        s.execute(text("""
            INSERT INTO jobs (id, tenant_id, queue, status, params, request_hash, attempts, max_attempts, preemptions,
                              cancel_requested, progress_step, progress_total, batch_id, custom_id, batch_line)
            SELECT gen_random_uuid(), j.tenant_id, j.queue, 'queued', j.params, j.request_hash, 0, 3, 0, false, 0,
                   j.progress_total, j.batch_id, 'grown-' || (m.top + i), m.top + i
            FROM jobs j, (SELECT max(batch_line) AS top FROM jobs WHERE batch_id = (SELECT batch_id FROM jobs
                                                                                     WHERE id = :id)) m,
                 generate_series(1, :n) i
            WHERE j.id = :id"""), {"id": job_id, "n": n})


def interactive(tenant_id: uuid.UUID, n: int, priority: str = "normal") -> list[uuid.UUID]:
    """n interactive jobs, each submitted and sent in its own transaction (as POST /v1/jobs does)."""
    ids = []
    for _ in range(n):
        with session() as s:
            job, _ = job_states.create_job(s, tenant_id=tenant_id, params=PARAMS,
                                           queue=interactive_queue(priority))
            ids.append(job.id)
        with session() as s:
            job_states.mark_enqueued(s, [ids[-1]])
    return ids


def feed(room: int) -> list[uuid.UUID]:
    """One feeder pass, minus Redis: what it picks is marked sent."""
    with session() as s:
        picked = [jid for jid, _ in batches.feed_candidates(s, room=room)]
        if picked:
            job_states.mark_enqueued(s, picked)
    return picked


def start(job_ids) -> None:
    """Workers took these: running, started now."""
    with session() as s:
        s.execute(update(Job).where(Job.id.in_(job_ids)).values(status="running", started_at=func.now()))


def finish(job_ids) -> None:
    """They succeeded; a batch with nothing left open is finalized (the feeder's finalize, without a manifest)."""
    with session() as s:
        s.execute(update(Job).where(Job.id.in_(job_ids)).values(status="succeeded", finished_at=func.now()))
        s.execute(text("""UPDATE batches b SET status = 'completed' WHERE status = 'in_progress' AND NOT EXISTS
                          (SELECT 1 FROM jobs j WHERE j.batch_id = b.id AND j.status IN ('queued', 'running'))"""))


def pos(job_id: uuid.UUID) -> int | None:
    """The position the API shows (common.queue_position.queue_place, as api/routers/jobs.py calls it)."""
    found = place(job_id)
    return None if found is None else found.position


def positions(job_ids) -> list[int | None]:
    return [pos(j) for j in job_ids]


def place(job_id: uuid.UUID) -> qp.QueuePlace | None:
    with session() as s:
        return qp.queue_place(s, job=job_states.get_job(s, job_id))


def places_of(job_ids) -> list[int | None]:
    """The positions a list page shows (common.queue_position.queue_places, as GET /v1/jobs calls it)."""
    with session() as s:
        jobs = [job_states.get_job(s, j) for j in job_ids]
        found = qp.queue_places(s, jobs)
    return [found[j].position if j in found else None for j in job_ids]


# ------------------------------------------------------------------------------------------------ the position

def test_interactive_jobs_wait_in_send_order(db):
    a, b, c = interactive(tenant("t"), 3)
    assert positions([a, b, c]) == [0, 1, 2]
    # a goes back to the queue (a retryable failure: unsent) and is sent again: it is last in the broker's list now
    with session() as s:
        s.execute(update(Job).where(Job.id == a).values(enqueued_at=None))
    assert positions([a, b, c]) == [2, 0, 1]
    with session() as s:
        job_states.mark_enqueued(s, [a])
    assert positions([a, b, c]) == [2, 0, 1]
    start([b])
    assert positions([a, b, c]) == [1, None, 0]  # not queued: no position


def test_a_small_tenants_items_are_not_behind_a_big_backlog(db):
    """Fair share: tenant A's three items, submitted after tenant B's thousand, go every other turn."""
    big = batch(db, tenant("big"), 1000)
    small = batch(db, tenant("small"), 3)
    assert positions(small) == [1, 3, 5]  # B's turn comes first (its batch is older), then they alternate
    assert positions(big[:6]) == [0, 2, 4, 6, 7, 8]  # once A runs out, B's items follow one another
    assert pos(big[999]) == 999 + 3


def test_a_tenants_batches_take_turns(db):
    t = tenant("t")
    first, second = batch(db, t, 4), batch(db, t, 2)
    assert positions(first) == [0, 2, 4, 5]
    assert positions(second) == [1, 3]


def test_interactive_jobs_waiting_come_before_batch_items(db):
    t = tenant("t")
    items = batch(db, t, 3)
    assert positions(items) == [0, 1, 2]
    interactive(t, 4)  # the feeder sends no batch item while interactive work waits
    assert positions(items) == [4, 5, 6]


def test_lanes_are_served_in_order_and_every_interactive_job_before_batch_items(db):
    t = tenant("t")
    items = batch(db, t, 5)
    assert feed(room=2) == items[:2]
    assert positions(items) == [0, 1, 2, 3, 4]
    jobs = interactive(t, 3)
    # workers serve the lists strictly in order: every waiting interactive job goes before a sent batch item
    assert positions(jobs) == [0, 1, 2]
    assert positions(items) == [3, 4, 5, 6, 7]
    high, low = interactive(t, 2, priority="high"), interactive(t, 1, priority="low")
    assert positions(high) == [0, 1]
    assert positions(jobs) == [2, 3, 4]
    assert positions(low) == [5]
    assert positions(items) == [6, 7, 8, 9, 10]
    assert places_of([*high, *jobs, *low]) == [0, 1, 2, 3, 4, 5]  # a list page: one statement per lane


def test_the_lanes_before_a_queue_are_those_workers_serve_first():
    high, normal, low = (interactive_queue(p) for p in ("high", "normal", "low"))
    assert qp.lanes_before(high) == []
    assert qp.lanes_before(normal) == [high]
    assert qp.lanes_before(low) == [high, normal]
    assert qp.lanes_before(BATCH_QUEUE) == qp.lanes_before("test-none") == [high, normal, low]


def test_the_position_reveals_no_more_than_the_rounds(db):
    """Tenant A's positions do not move when tenant B's backlog grows from 10 to 10,000: B only ever gets the turns
    round robin gives it before A's. A backlog smaller than those turns moves them by at most the turns."""
    b_items = batch(db, tenant("b"), 10)
    a_items = batch(db, tenant("a"), 5)
    before = positions(a_items)
    assert before == [1, 3, 5, 7, 9]  # B's turn first, then in turn
    grow(b_items[-1], 9_990)
    assert positions(a_items) == before

    c_items = batch(db, tenant("c"), 2)  # C's turn comes after A's
    before = positions(a_items)
    assert before == [1, 4, 7, 9, 11]  # C's two items are done by A's fourth turn
    grow(c_items[-1], 9_998)
    after = positions(a_items)
    assert after == [1, 4, 7, 10, 13]
    assert all(0 <= new - old <= turns for new, old, turns in zip(after, before, range(5)))


def test_the_model_is_the_feeders_order(db):
    """Every item's position is the turn at which feed_candidates, one slot at a time, sends it: three tenants
    after some history (so the least-recently-fed stamps, not creation, decide), items finishing as they are sent."""
    for t, n in (("b", 12), ("a", 3), ("c", 7)):
        batch(db, tenant(t), n)
    for _ in range(5):
        finish(feed(room=1))
    assert_predicts_the_feeder()


def test_the_model_is_the_feeders_order_inside_a_tenant(db):
    t = tenant("t")
    for n in (5, 2, 7):
        batch(db, t, n)
    finish(feed(room=1))
    assert_predicts_the_feeder()


def test_the_model_is_the_feeders_order_across_priority_lanes(db):
    """Priority lanes (common.fair_share): weighted turns between tenants and between a tenant's batches, and a
    tenant joining late. (The mixed tenant's high batch outlasts its low one: a tenant whose highest batch runs out
    first drops to a lower weight, which the model does not foresee; the module doc says so.)"""
    batch(db, tenant("low"), 9, priority="low")
    t = tenant("mixed")
    batch(db, t, 2, priority="low")
    batch(db, t, 10, priority="high")
    for _ in range(3):
        finish(feed(room=1))
    batch(db, tenant("late"), 5, priority="high")
    assert_predicts_the_feeder()


def test_a_high_batch_goes_four_turns_to_a_low_ones_one(db):
    low = batch(db, tenant("first"), 20, priority="low")
    high = batch(db, tenant("second"), 20, priority="high")
    assert positions(low[:3]) == [0, 5, 10]  # the older tenant wins the first tie, then takes one turn in five
    assert positions(high[:8]) == [1, 2, 3, 4, 6, 7, 8, 9]


def assert_predicts_the_feeder():
    with session() as s:
        queued = list(s.scalars(select(Job.id).where(Job.status == "queued")))
    predicted = {j: pos(j) for j in queued}
    assert sorted(predicted.values()) == list(range(len(queued)))  # one item a turn
    order = []
    while sent := feed(room=1):
        order += sent
        finish(sent)
    assert len(order) == len(queued)
    assert {j: order.index(j) for j in queued} == predicted


def test_past_the_exact_count_a_batchs_items_are_extrapolated(db):
    """Counting stops after `exact_upto` items per batch (cost O(exact_upto), not O(backlog)); the rest are
    extrapolated over line numbers, exactly for a batch's untouched tail and closely for a sparse one."""
    big = batch(db, tenant("b"), 60)
    mine = batch(db, tenant("a"), 50)

    def at(job_id, exact_upto):
        with session() as s:
            return qp.position(s, job_id=job_id, queue=BATCH_QUEUE, batch_item=True, exact_upto=exact_upto)

    for j in (mine[0], mine[9], mine[49], big[30], big[59]):
        assert at(j, 8) == at(j, 1000) == pos(j)
    finish(mine[1:40:2])  # every other item of A's first 40 done out of order: its unfed lines are sparse
    for j in (mine[30], mine[38]):
        exact = at(j, 1000)
        assert exact == pos(j) and abs(at(j, 8) - exact) <= max(2, exact // 10)


def test_a_position_is_one_statement(db):
    t = tenant("t")
    items = batch(db, t, 3)
    job = interactive(t, 1)[0]
    assert place(job).eta_s is None  # (the throughput is read and cached)
    statements: list[str] = []
    with session() as s:
        jobs = [job_states.get_job(s, j) for j in (items[2], job)]
        event.listen(s.connection(), "before_cursor_execute", lambda *args: statements.append(args[2]))
        assert [qp.queue_place(s, job=j).position for j in jobs] == [3, 0]
    assert len(statements) == 2


# ------------------------------------------------------------------------------------------------------- the ETA

def started(n: int, every_s: float, ago_s: float = 0.0) -> None:
    """n finished jobs of history, started every `every_s` seconds, the newest `ago_s` seconds ago."""
    t = tenant("history")
    with session() as s:
        s.execute(text("""
            INSERT INTO jobs (id, tenant_id, queue, status, params, request_hash, attempts, max_attempts, preemptions,
                              cancel_requested, progress_step, progress_total, started_at, finished_at)
            SELECT gen_random_uuid(), :t, 'interactive', 'succeeded', '{"steps": 2}', 'h', 1, 3, 0, false, 2, 2,
                   now() - make_interval(secs => :ago + i * :every), now()
            FROM generate_series(0, :n - 1) i"""), {"t": t, "n": n, "every": every_s, "ago": ago_s})


def test_eta_from_the_recent_throughput(db):
    t = tenant("t")
    jobs = interactive(t, 3)
    started(30, every_s=5.0)  # 30 starts in the five-minute window: 0.1 a second
    assert place(jobs[2]) == qp.QueuePlace(position=2, eta_s=30.0)


def test_a_busy_fleets_rate_comes_from_its_latest_starts(db):
    job = interactive(tenant("t"), 1)[0]
    started(1000, every_s=0.1)  # ten a second: the latest 200 starts span 20 s
    eta = place(job).eta_s
    assert eta == pytest.approx(0.1, abs=0.05)


def test_no_eta_without_recent_throughput(db):
    t = tenant("t")
    job = interactive(t, 1)[0]
    assert place(job) == qp.QueuePlace(position=0, eta_s=None)
    qp.forget_throughput()
    started(10, every_s=1.0, ago_s=qp.THROUGHPUT_WINDOW_S + 60)  # only long ago
    assert place(job) == qp.QueuePlace(position=0, eta_s=None)
    start([job])
    assert place(job) is None  # not queued: neither a position nor an ETA


def test_the_throughput_is_cached_for_a_few_seconds(db):
    job = interactive(tenant("t"), 1)[0]
    started(30, every_s=5.0)
    assert place(job).eta_s == 10.0
    started(270, every_s=1.0)  # the rate changes, but this process asked a moment ago
    statements: list[str] = []
    with session() as s:
        row = job_states.get_job(s, job)
        event.listen(s.connection(), "before_cursor_execute", lambda *args: statements.append(args[2]))
        assert qp.queue_place(s, job=row).eta_s == 10.0
    assert len(statements) == 1  # the position only
    qp.forget_throughput()
    assert place(job).eta_s < 10.0


def test_batches_not_in_progress_take_no_turns(db):
    """As in feed_candidates: a cancelling batch's leftovers are not counted against anyone."""
    b_items = batch(db, tenant("b"), 10)
    a_items = batch(db, tenant("a"), 3)
    with session() as s:
        s.execute(update(Batch).where(Batch.id == select(Job.batch_id).where(Job.id == b_items[0])
                                      .scalar_subquery()).values(status="cancelling"))
    assert positions(a_items) == [0, 1, 2]


def test_a_list_page_shows_the_same_positions_in_fewer_statements(db):
    """queue_places (GET /v1/jobs) gives each job the position queue_place gives it alone: interactive jobs sent
    and unsent, sent and unfed batch items, running and finished jobs; the interactive ones in one statement."""
    from common.db import get_engine

    t, u = tenant("t"), tenant("u")
    b1 = batch(db, t, 4)
    feed(2)
    a, b, c, d = interactive(u, 4)
    with session() as s:  # c goes back to the queue unsent
        s.execute(update(Job).where(Job.id == c).values(enqueued_at=None))
    start([d])
    jobs = [a, b, c, d, *b1]
    assert places_of(jobs) == positions(jobs)
    # sent batch items never go before interactive jobs; c, unsent, stands behind the sent ones
    assert places_of([a, b, c, d]) == [0, 1, 2, None]

    statements = []
    engine = get_engine()
    listen = lambda *args: statements.append(args[2])  # noqa: E731 - (conn, cursor, statement, ...)
    event.listen(engine, "before_cursor_execute", listen)
    try:
        places_of([a, b, c])
    finally:
        event.remove(engine, "before_cursor_execute", listen)
    assert sum("row_number()" in st for st in statements) == 1
    assert not any("WITH me AS" in st for st in statements)  # no per-job position statement


def rank_of(queue: str) -> qp.LaneRank:
    with session() as s:
        row = s.execute(qp.LANE_RANK_SQL, {"queue": queue, "higher": qp.lanes_before(queue)}).mappings().one()
    return qp.LaneRank.of_row(row)


def test_a_lanes_ranking_gives_every_job_the_position_of_its_own_count(db):
    """LaneRank (the API's polls of a lane's jobs, api/recent_places.RecentRanks): sent and unsent jobs, the lanes
    served before, a job that left the lane; a job created after the ranking stands behind every job in it."""
    t = tenant("t")
    high = interactive(t, 2, priority="high")
    a, b, c, d = interactive(t, 4)
    with session() as s:  # c goes back to the queue unsent: behind every sent job
        s.execute(update(Job).where(Job.id == c).values(enqueued_at=None))
    start([b])
    rank = rank_of(interactive_queue("normal"))
    with session() as s:
        created = {j.id: j.created_at for j in s.scalars(select(Job))}
    assert [rank.position(j, created[j]) for j in (a, c, d)] == positions([a, c, d]) == [2, 4, 3]
    assert rank.position(b, created[b]) is None  # not in the lane when ranked, older than the ranking: counted alone
    assert rank_of(interactive_queue("high")).position(high[1], created[high[1]]) == pos(high[1]) == 1
    [late] = interactive(t, 1)
    with session() as s:
        late_created = s.get(Job, late).created_at
    # behind the 3 ranked and the 2 high ones: an estimate at most a ranking old (its own count puts it before
    # c, which is unsent)
    assert (rank.position(late, late_created), pos(late)) == (5, 4)
    empty = rank_of("a-lane-with-no-jobs")  # behind every lane: 2 high, 4 normal (a, c, d, late)
    assert (empty.higher, empty.ids) == (6, b"")


def test_a_ranking_holds_the_first_jobs_of_a_list_only_and_leaves_the_rest_to_their_own_counts(db, monkeypatch):
    limited = text(qp.LANE_RANK_SQL.text.replace(f"LIMIT {qp.RANKED_MOST}", "LIMIT 2"))
    monkeypatch.setattr(qp, "RANKED_MOST", 2)
    monkeypatch.setattr(qp, "LANE_RANK_SQL", limited)
    a, b, c = interactive(tenant("t"), 3)
    rank = rank_of(interactive_queue("normal"))
    assert [rank.position(j, rank.read_at) for j in (a, b, c)] == [0, 1, None]  # c: counted on its own
    [late] = interactive(tenant("t"), 1)
    assert rank.position(late, datetime.now(timezone.utc)) is None  # the list was not whole: count it
