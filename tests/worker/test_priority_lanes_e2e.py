"""Priority lanes with a real worker (common.fair_share through the feeder): tenant B's low-priority batch is
submitted first, tenant A's high-priority batch after it; A's batch overtakes and finishes first while B's keeps
getting turns (one in five by the default weights), and both complete in full. Its own stack, so no other
test's batches share the feeder."""
from __future__ import annotations

import uuid

import pytest
from sqlalchemy import text

from tests.support import wait_until
from tests.worker.conftest import make_own_stack

ITEM = {"prompt": "a poster that says LANE", "width": 64, "height": 64, "preset": "V4_TURBO_12", "steps": 1}


@pytest.fixture(scope="module")
def stack(services, stack_env, tmp_path_factory):
    stack = make_own_stack(services, stack_env, tmp_path_factory, bucket=f"lanes-{uuid.uuid4().hex[:6]}",
                           LETTERPRESS_API__MIN_SIDE="64", LETTERPRESS_BATCHES__FEED_DEPTH="2",
                           LETTERPRESS_WORKER__RESULT_CACHE="false")
    yield stack
    stack.procs.stop_all()
    stack.engine.dispose()
    stack.redis.stop()
    stack.pg.stop()


def submit(client, n: int, priority: str, tag: str) -> str:
    resp = client.http.post("/v1/batches", json={"priority": priority, "items": [
        {"custom_id": f"{tag}{i}", **ITEM, "seed": i} for i in range(n)]})
    assert resp.status_code == 202, resp.text
    return resp.json()["id"]


def test_a_high_batch_of_one_tenant_overtakes_a_low_one_of_another_and_neither_starves(stack):
    b_client, a_client = stack.client(), stack.client()
    low = submit(b_client, 20, "low", "b")
    high = submit(a_client, 10, "high", "a")
    stack.start_worker({"LETTERPRESS_WORKER__CPU_THREADS": "1"})
    try:
        done = {bid: wait_until(lambda c=c, bid=bid: (b := c.http.get(f"/v1/batches/{bid}").json())["status"]
                                in ("completed", "failed", "cancelled") and b, 300, what=f"batch {bid} done")
                for c, bid in ((a_client, high), (b_client, low))}
    finally:
        stack.stop_workers()
    assert done[high]["request_counts"]["succeeded"] == 10 and done[low]["request_counts"]["succeeded"] == 20
    assert done[high]["completed_at"] < done[low]["completed_at"]
    with stack.engine.connect() as conn:
        starts = [str(b) for (b,) in conn.execute(text(
            "SELECT batch_id FROM jobs WHERE batch_id IN (:a, :b) ORDER BY started_at, batch_line"),
            {"a": high, "b": low})]
    a_done_at = max(i for i, b in enumerate(starts) if b == high) + 1
    print("start order:", "".join("A" if b == high else "b" for b in starts))
    # By the weights, A's 10 items take 13 turns (B gets one in five): allow a turn or two of feeding slack.
    assert a_done_at <= 15, starts
    assert starts[:a_done_at].count(low) >= 2  # B was not starved while A ran


def test_interactive_lanes_are_served_in_order_and_all_before_batch_work(stack):
    client = stack.client()
    batch = submit(client, 2, "high", "x")  # even a high batch waits for every interactive lane
    jobs = {}
    for priority in ("low", "normal", "high"):  # submitted lowest first
        for i in range(2):
            resp = client.submit({**ITEM, "seed": i, "priority": priority})
            assert resp.status_code == 202 and resp.json()["priority"] == priority, resp.text
            assert resp.json()["queue"] == {"high": "interactive-high", "normal": "interactive",
                                            "low": "interactive-low"}[priority]
            jobs[resp.json()["id"]] = priority
    stack.start_worker({"LETTERPRESS_WORKER__CPU_THREADS": "1"})
    try:
        wait_until(lambda: client.http.get(f"/v1/batches/{batch}").json()["status"] == "completed", 300,
                   what="the batch done")
    finally:
        stack.stop_workers()
    with stack.engine.connect() as conn:
        rows = conn.execute(text("SELECT id::text, batch_id, started_at FROM jobs WHERE tenant_id = "
                                 "(SELECT tenant_id FROM batches WHERE id = :b)"), {"b": batch}).all()
    lane = {r.id: ("batch" if r.batch_id else jobs[r.id]) for r in rows}
    starts = {r.id: r.started_at for r in rows}
    order = ["high", "normal", "low", "batch"]
    for before, after in zip(order, order[1:]):
        assert max(starts[j] for j in starts if lane[j] == before) <= min(
            starts[j] for j in starts if lane[j] == after), (before, after, sorted(starts, key=starts.get))
