"""Adapter-aware feeding with real workers (common.batches.feed_candidates, `batches.group_by_adapter`): a batch
of jobs over three adapters in random order, run by two workers that keep one adapter loaded each
(`adapters.resident=1`, so every switch is a load), once fed in line order and once fed group by group. The
switches are the workers' own counters (`letterpress_worker_adapter_switches_total`). A second tenant's small
batch, submitted after the big one, still finishes first: grouping reorders items inside a batch only.

`LETTERPRESS_TEST_ADAPTER_JOBS` sets the batch size (default 48; docs/PERFORMANCE.md "Adapter switches" ran
1,000)."""
from __future__ import annotations

import os
import random
import uuid

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import wait_until
from tests.tiny_loras import tiny_transformer, write_lora
from tests.worker.conftest import make_own_stack

JOBS = int(os.environ.get("LETTERPRESS_TEST_ADAPTER_JOBS", "48"))
ITEM = {"width": 64, "height": 64, "preset": "V4_TURBO_12", "steps": 1}
NAMES = ("look-a", "look-b", "look-c")


@pytest.fixture(scope="module")
def stack(services, stack_env, tmp_path_factory):
    stack = make_own_stack(services, stack_env, tmp_path_factory, bucket=f"lora-{uuid.uuid4().hex[:6]}",
                           LETTERPRESS_API__MIN_SIDE="64", LETTERPRESS_ADAPTERS__RESIDENT="1")
    yield stack
    stack.procs.stop_all()
    stack.engine.dispose()
    stack.redis.stop()
    stack.pg.stop()


def switches(stack, names: list[str]) -> int:
    total = 0.0
    for name in names:
        text = httpx.get(f"http://127.0.0.1:{stack.procs.metrics_ports[name]}/metrics").text
        for family in text_string_to_metric_families(text):
            if family.name == "letterpress_worker_adapter_switches":
                total += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return int(total)


def wait_batch(client, batch_id: str) -> dict:
    return wait_until(lambda: (b := client.http.get(f"/v1/batches/{batch_id}").json())["status"] in
                      ("completed", "failed", "cancelled") and b, 600, what=f"batch {batch_id} done")


def run_mixed_batch(stack, tiny_model, tmp_path, *, group: bool) -> tuple[int, dict, dict]:
    client, other = stack.client(), stack.client()
    transformer = tiny_transformer(tiny_model)
    for i, name in enumerate(NAMES):
        path = write_lora(tmp_path / f"{name}.safetensors", transformer, seed=i + 1)
        resp = client.http.post("/v1/adapters", data={"name": name}, files={"file": (path.name, path.read_bytes())})
        assert resp.status_code == 201, resp.text
    rng = random.Random(7)
    lines = [{"custom_id": f"i{i}", "prompt": f"a poster number {i}", **ITEM, "seed": i,
              "loras": [{"name": rng.choice(NAMES)}]} for i in range(JOBS)]
    env = {"LETTERPRESS_BATCHES__GROUP_BY_ADAPTER": "true" if group else "false",
           "LETTERPRESS_WORKER__CPU_THREADS": "1"}
    workers = [stack.start_worker(env)[0] for _ in range(2)]
    try:
        big = client.http.post("/v1/batches", json={"items": lines}, timeout=60)
        assert big.status_code == 202, big.text
        small = other.http.post("/v1/batches", json={"items": [{"custom_id": f"s{i}", "prompt": "small", **ITEM}
                                                               for i in range(4)]})
        assert small.status_code == 202, small.text
        big_done, small_done = wait_batch(client, big.json()["id"]), wait_batch(other, small.json()["id"])
        return switches(stack, workers), big_done, small_done
    finally:
        stack.stop_workers()
        stack.workers.clear()


def test_feeding_group_by_group_cuts_adapter_switches_and_starves_no_one(stack, tiny_model, tmp_path):
    mixed, big_mixed, _ = run_mixed_batch(stack, tiny_model, tmp_path / "mixed", group=False)
    grouped, big_grouped, small = run_mixed_batch(stack, tiny_model, tmp_path / "grouped", group=True)
    print(f"adapter switches for {JOBS} mixed jobs on 2 workers: line order {mixed}, grouped {grouped}")
    for batch in (big_mixed, big_grouped):
        assert batch["request_counts"]["succeeded"] == JOBS, batch
    # Line order: about 2/3 of the jobs change adapter on their worker. Grouped: each worker changes a few times
    # per group boundary (the two workers share the queue, so both see every group).
    assert mixed >= JOBS // 3, mixed
    assert grouped <= 4 * len(NAMES), grouped
    assert small["status"] == "completed" and small["completed_at"] < big_grouped["completed_at"]
