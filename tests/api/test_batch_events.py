"""`GET /v1/batches/{id}/events` (api/event_streams.py) against the real API process: `progress` with the counts,
rate and ETA as the items move (driven here in the database, the way workers and the finalizer move them), `done`
with the batch object at the end, Last-Event-ID resumption across the stream's time limit (2 s in the test stack)
without a repeated event, and 401/404/422 before any stream starts (another tenant's batch, an unknown or
malformed id, an oversized Last-Event-ID). Below: the rate itself (common.batch_counts.completion_rate) on real
rows, and the batch snapshots through the stream engine on their own.

The batches are made through the API, then held: their items are moved to a list no worker serves and marked
sent, so neither the feeder nor maintenance hands them to a worker another test may have started."""
from __future__ import annotations

import asyncio
import json
import types
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select, text, update

from tests.support import ApiClient, make_tenant

LINE = {"prompt": "a poster that says LIVE", "width": 256, "height": 256, "preset": "V4_TURBO_12", "steps": 2}
HELD = "held-by-test"


def new_batch(client: ApiClient, n: int) -> tuple[str, list[uuid.UUID]]:
    """A batch of `n` inline items, held (module doc); its id and its items' ids in line order."""
    from common.db import session_scope
    from common.models import Job

    resp = client.http.post("/v1/batches", json={"items": [{**LINE, "custom_id": f"i{i}", "seed": i}
                                                           for i in range(n)]})
    assert resp.status_code == 202, resp.text
    batch_id = resp.json()["id"]
    with session_scope() as session:
        session.execute(update(Job).where(Job.batch_id == uuid.UUID(batch_id))
                        .values(queue=HELD, enqueued_at=func.now()))
        jobs = list(session.scalars(select(Job.id).where(Job.batch_id == uuid.UUID(batch_id))
                                    .order_by(Job.batch_line)))
    return batch_id, jobs


def move(changes: dict[uuid.UUID, str], *, finished_ago_s: float = 0.0, finalize: str | None = None) -> None:
    """Jobs to their statuses, as workers leave them (started; finished `finished_ago_s` seconds ago), in one
    transaction; then, with `finalize` (a batch id), what the finalizer does once nothing is queued or running
    (less the manifest upload), in the same one."""
    from common.batches import begin_finalizing, finish_finalizing
    from common.db import session_scope
    from common.models import Job, JobStatus

    with session_scope() as session:
        for job_id, status in changes.items():
            values: dict = {"status": status, "started_at": func.now()}
            if status in JobStatus.TERMINAL:
                values["finished_at"] = func.now() - timedelta(seconds=finished_ago_s)
            session.execute(update(Job).where(Job.id == job_id).values(**values))
        if finalize:
            batch = begin_finalizing(session, batch_id=uuid.UUID(finalize), retry_after_s=600)
            assert batch is not None and finish_finalizing(session, batch=batch) is not None


def read_stream(client: ApiClient, batch_id: str, last_event_id: str | None = None,
                on_event=lambda event: None) -> list[dict]:
    """One connection's events, [{event, id, data}], each handed to `on_event` as it arrives."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    events, current = [], {}
    with client.http.stream("GET", f"/v1/batches/{batch_id}/events", headers=headers, timeout=30) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["cache-control"] == "no-cache" and resp.headers["x-accel-buffering"] == "no"
        for line in resp.iter_lines():
            if line.startswith(":"):
                continue
            if line == "":
                if current:
                    events.append(current)
                    on_event(current)
                current = {}
            else:
                field, _, value = line.partition(": ")
                current[field] = json.loads(value) if field == "data" else value
    return events


@pytest.fixture
def owner(stack_env):
    """A tenant the feeder gives no turn: at its limit of one active job (a held one). A worker another test left
    running on this stack would otherwise feed and run a batch's items in the moment between the API creating
    them and `new_batch` holding them (it happened in CI: a moved count off by the item a worker ran)."""
    from common.db import session_scope
    from common.job_states import create_job
    from common.models import Job, Tenant
    from tests.common.test_job_states import PARAMS

    tenant = make_tenant()
    with session_scope() as session:
        session.execute(update(Tenant).where(Tenant.id == tenant.id).values(limits={"max_active_jobs": 1}))
        held = create_job(session, tenant_id=tenant.id, params=PARAMS, queue=HELD)[0]
        session.execute(update(Job).where(Job.id == held.id).values(enqueued_at=func.now()))
        session.commit()
    yield tenant
    from tests.api.tenant_objects import cancel_everything

    cancel_everything(tenant.id)


def counts(total=0, queued=0, running=0, succeeded=0, failed=0, canceled=0) -> dict:
    return dict(total=total, queued=queued, running=running, succeeded=succeeded, failed=failed, canceled=canceled)


def test_a_batch_streams_counts_rate_and_eta_then_done_with_the_batch(api_url, owner):
    client = ApiClient(api_url, owner.key)
    batch_id, jobs = new_batch(client, 3)
    steps = [lambda: move({jobs[0]: "running", jobs[1]: "succeeded"}),
             lambda: move({jobs[0]: "succeeded", jobs[2]: "failed"}, finalize=batch_id)]

    def drive(event: dict) -> None:  # the next change once the stream has shown the last one
        if event["event"] == "progress" and steps:
            steps.pop(0)()

    seen, last = [], None
    for _ in range(10):  # each connection lasts at most 2 s here: reconnect as a client would
        got = read_stream(client, batch_id, last, drive)
        seen += got
        if got and got[-1]["event"] == "done":
            break
        last = next((e["id"] for e in reversed(got) if "id" in e), last)
    first, moved = [e["data"] for e in seen if e["event"] == "progress"]  # one for each state, none repeated
    assert first == {"status": "in_progress", "request_counts": counts(3, queued=3), "items_per_min": None,
                     "eta_s": None}
    assert moved["status"] == "in_progress" and moved["request_counts"] == counts(3, 1, 1, 1)
    # one item finished a second or two after the batch started: a rate, and the two open items at that rate
    assert moved["items_per_min"] > 0
    # both are rounded (the rate to 0.01/min, the eta to 0.1 s): the eta within half its last digit and a bit
    assert moved["eta_s"] == pytest.approx(2 / (moved["items_per_min"] / 60), abs=0.06)
    done = seen[-1]
    assert done["event"] == "done" and done["data"]["status"] == "completed"
    assert done["data"]["request_counts"] == counts(3, succeeded=2, failed=1)
    assert done["data"] == client.http.get(f"/v1/batches/{batch_id}").json()  # the batch object, whole
    ids = [e["id"] for e in seen if "id" in e]
    assert len(ids) == len(set(ids)), ids  # nothing sent twice across reconnects
    assert done["id"] == "completed.3.0.0.2.1.0"
    # the client saw `done`: reconnecting with its id ends at once, with nothing more
    assert read_stream(client, batch_id, done["id"]) == []


def test_last_event_id_resumes_after_what_the_client_saw(api_url, owner):
    client = ApiClient(api_url, owner.key)
    batch_id, jobs = new_batch(client, 2)
    first = read_stream(client, batch_id)  # nothing moves: one progress, then the time limit
    assert [e["event"] for e in first] == ["progress", "timeout"]
    seen = first[0]["id"]
    assert seen == "in_progress.2.2.0.0.0.0" and first[1]["data"] == {"reconnect": True, "last_event_id": seen}
    # reconnecting with it: the unchanged batch is not sent again
    assert [e["event"] for e in read_stream(client, batch_id, seen)] == ["timeout"]
    move({jobs[0]: "canceled"})
    again = read_stream(client, batch_id, seen)
    assert again[0]["event"] == "progress" and again[0]["data"]["request_counts"] == counts(2, queued=1, canceled=1)
    assert again[0]["data"]["items_per_min"] is None  # a canceled item is no work done: no rate yet
    # an id the stream never sent (a client's own, or an older server's) is just "something else": sent afresh
    assert read_stream(client, batch_id, "made-up")[0]["id"] == again[0]["id"]


def test_strangers_unknown_and_malformed_ids_are_refused_before_any_stream(api_url, owner):
    client = ApiClient(api_url, owner.key)
    batch_id, _ = new_batch(client, 1)
    for who, path, status in [(make_tenant().key, f"/v1/batches/{batch_id}/events", 404),
                              (owner.key, f"/v1/batches/{uuid.uuid4()}/events", 404),
                              (owner.key, "/v1/batches/not-a-uuid/events", 404),
                              (None, f"/v1/batches/{batch_id}/events", 401)]:
        resp = ApiClient(api_url, who).http.get(path)
        assert resp.status_code == status, (path, resp.text)
        assert resp.headers["content-type"].startswith("application/json")
        assert owner.name not in resp.text and "request_counts" not in resp.text
    # a malformed id answers as the job stream's does
    assert client.http.get("/v1/jobs/not-a-uuid/events").status_code == 404
    long = client.http.get(f"/v1/batches/{batch_id}/events", headers={"Last-Event-ID": "x" * 201})
    assert long.status_code == 422 and long.json()["error"]["field"]


# ------------------------------------------------------------------------------------------------- the rate

@pytest.fixture
def batch_rows(stack_env):
    """make(n, started_ago_s): a batch of `n` queued items (no API, no queue: the rows only), its id and items."""
    from common.batches import BatchOptions, create_batch, items_source
    from common.db import session_scope
    from common.models import Batch, Job
    from common.settings import get_settings

    tenant = make_tenant()

    def make(n: int, started_ago_s: float) -> tuple[uuid.UUID, list[uuid.UUID]]:
        with session_scope() as session:
            batch = create_batch(session, tenant_id=tenant.id, source=items_source(
                [{**LINE, "custom_id": f"r{i}", "seed": i} for i in range(n)]), source_name="inline",
                options=BatchOptions(), idempotency_key=None, api=get_settings().api, storage_prefix="images",
                max_attempts=3)
            session.execute(update(Job).where(Job.batch_id == batch.id).values(queue=HELD, enqueued_at=func.now()))
            session.execute(update(Batch).where(Batch.id == batch.id)
                            .values(in_progress_at=func.now() - timedelta(seconds=started_ago_s)))
            return batch.id, list(session.scalars(select(Job.id).where(Job.batch_id == batch.id)
                                                  .order_by(Job.batch_line)))
    yield make
    from tests.api.tenant_objects import cancel_everything

    cancel_everything(tenant.id)


def rate_of(batch_id: uuid.UUID, remaining: int):
    from common.batch_counts import completion_rate
    from common.db import session_scope
    from common.models import Batch

    with session_scope() as session:
        batch = session.get(Batch, batch_id)
        return completion_rate(session, batch_id=batch_id, since=batch.in_progress_at, remaining=remaining)


def test_the_rate_counts_recent_finishes_over_the_window(batch_rows):
    batch_id, jobs = batch_rows(40, started_ago_s=3600)
    for i, job in enumerate(jobs[:30]):  # 30 in the last five minutes
        move({job: "succeeded" if i % 3 else "failed"}, finished_ago_s=5 + i * 9)
    move({job: "succeeded" for job in jobs[30:35]}, finished_ago_s=400)  # before the window: not counted
    move({job: "canceled" for job in jobs[35:38]})  # no work done: not counted
    rate = rate_of(batch_id, remaining=2)
    assert rate.per_min == pytest.approx(30 / 300 * 60)  # 6 a minute
    assert rate.eta_s == pytest.approx(2 / 0.1)


def test_a_young_batch_is_measured_since_it_started(batch_rows):
    batch_id, jobs = batch_rows(20, started_ago_s=60)
    for i, job in enumerate(jobs[:12]):
        move({job: "succeeded"}, finished_ago_s=i * 4)
    rate = rate_of(batch_id, remaining=8)
    assert rate.per_min == pytest.approx(12, rel=0.05)  # 12 in the minute since it started, not 12 in five
    assert rate.eta_s == pytest.approx(8 / 0.2, rel=0.05)


def test_a_fast_batch_is_measured_over_its_latest_finishes(batch_rows, monkeypatch):
    from common import batch_counts

    monkeypatch.setattr(batch_counts, "RATE_SAMPLE", 5)
    batch_id, jobs = batch_rows(12, started_ago_s=3600)
    for i, job in enumerate(jobs[:10]):  # one every 2 s; the latest five reach back 10 s
        move({job: "succeeded"}, finished_ago_s=2 + i * 2)
    assert rate_of(batch_id, remaining=2).per_min == pytest.approx(5 / 10 * 60, rel=0.1)


def test_no_finish_is_no_rate(batch_rows):
    batch_id, _ = batch_rows(3, started_ago_s=60)
    assert (rate_of(batch_id, remaining=3).per_min, rate_of(batch_id, remaining=3).eta_s) == (None, None)
    assert rate_of(batch_id, remaining=0).eta_s == 0.0


def test_the_rate_reads_the_batch_finished_index(batch_rows):
    """The statement can use ix_jobs_batch_finished (migration 0015): its predicate is implied, so a large
    batch's rate reads its latest finishes, not every item."""
    from common.batch_counts import FINISHES_SQL, RATE_SAMPLE, RATE_WINDOW_S
    from common.db import session_scope

    batch_id, _ = batch_rows(2, started_ago_s=60)
    with session_scope() as session:
        session.execute(text("SET LOCAL enable_seqscan = off"))
        session.execute(text("SET LOCAL enable_bitmapscan = off"))
        plan = "\n".join(session.scalars(text("EXPLAIN " + FINISHES_SQL.text), {
            "batch_id": batch_id, "since": datetime.now(timezone.utc), "window": RATE_WINDOW_S,
            "sample": RATE_SAMPLE}))
    assert "ix_jobs_batch_finished" in plan, plan


# ------------------------------------------------------------------------------------------------- snapshots

def test_batch_snapshots_through_the_stream_engine():
    """Progress only on a change of status or counts (the rate rides along), done with the rendered object; the
    rate is not asked for an ended batch, nor the object for a running one."""
    from api import event_streams
    from common.batch_counts import CompletionRate, RequestCounts
    from common.settings import ApiSettings

    reads = iter([("in_progress", RequestCounts(2, 2)), ("in_progress", RequestCounts(2, 2)),
                  ("in_progress", RequestCounts(2, 1, 0, 1)), ("completed", RequestCounts(2, 0, 0, 2))])
    asked = []

    async def read():
        status, c = next(reads)
        return event_streams.batch_snapshot(
            types.SimpleNamespace(status=status), c,
            rate=lambda: asked.append("rate") or CompletionRate(3.0, 20.0),
            render=lambda: asked.append("render") or {"object": "batch", "status": status})

    async def collect():
        api = ApiSettings(events_poll_s=0.01, events_max_s=5)
        return [chunk async for chunk in event_streams.event_stream(read, api, None)]

    chunks = asyncio.run(collect())
    assert [c.split(b"\n")[:2] for c in chunks] == [[b"event: progress", b"id: in_progress.2.2.0.0.0.0"],
                                                    [b"event: progress", b"id: in_progress.2.1.0.1.0.0"],
                                                    [b"event: done", b"id: completed.2.0.0.2.0.0"]]
    assert json.loads(chunks[1].split(b"data: ")[1]) == {
        "status": "in_progress", "request_counts": counts(2, queued=1, succeeded=1), "items_per_min": 3.0,
        "eta_s": 20.0}
    assert json.loads(chunks[2].split(b"data: ")[1]) == {"object": "batch", "status": "completed"}
    assert asked == ["rate"] * 3 + ["render"]
