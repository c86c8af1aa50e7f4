"""Webhooks end to end with real parts: a job runs on the real GPU-worker process (tiny model, CPU), its terminal
transition writes the event to the outbox, and the separate webhook worker process (`letterpress
webhooks-worker`: Celery, `webhooks` queue, thread pool) delivers it to a real HTTP receiver on 127.0.0.1.
Signatures are checked with the `standardwebhooks` package.

The webhook worker here runs a short retry schedule (0, 0.5, 1, 2, 2 s, no jitter): the sub-second steps go as
Celery countdowns, the 2 s steps (longer than the 1 s maintenance period of the test stack) wait in Postgres
for the due-events pass, so both paths are exercised.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from standardwebhooks import Webhook

from tests.support import REPO, free_port, wait_until

JOB = {"prompt": "a poster that says HOOK", "width": 256, "height": 256, "preset": "V4_TURBO_12", "steps": 4,
       "seed": 7}
SCHEDULE = "[0, 0.5, 1, 2, 2]"


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    started: float
    finished: float | None = None


class Receiver:
    """A webhook receiver in a thread. Behaviour by path: /ok/…: 200; /flaky/N/…: 500 for the first N calls;
    /gone/…: 410; /slow/SECONDS/…: 200 after sleeping. `override[path] = status` answers that status instead."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.requests: list[Received] = []
        self.override: dict[str, int] = {}
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None
        self.start()

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                rec = Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body, time.time())
                with receiver.lock:
                    receiver.requests.append(rec)
                    seen = sum(1 for r in receiver.requests if r.path == self.path)
                status = receiver.status_for(self.path, seen)
                self.send_response(status)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")
                rec.finished = time.time()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def status_for(self, path: str, seen: int) -> int:
        if path in self.override:
            return self.override[path]
        kind, *args = path.strip("/").split("/")
        if kind == "flaky":
            return 500 if seen <= int(args[0]) else 200
        if kind == "gone":
            return 410
        if kind == "slow":
            time.sleep(float(args[0]))
        return 200

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def received(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.requests if r.path == path]


@pytest.fixture(scope="module")
def receiver():
    r = Receiver()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def webhooks_worker(processes, api_url):
    """The delivery worker process, as `letterpress webhooks-worker` starts it, with a short schedule."""
    yield processes.start_webhooks_worker("webhooks", {"LETTERPRESS_WEBHOOKS__RETRY_SCHEDULE_S": SCHEDULE,
                                                       "LETTERPRESS_WEBHOOKS__JITTER": "0"})
    processes.stop("webhooks")


def path(kind: str) -> str:
    return f"/{kind}/{uuid.uuid4().hex[:10]}"


def secret_of(client) -> str:
    resp = client.http.get("/v1/webhooks/secret")
    assert resp.status_code == 200, resp.text
    return resp.json()["secret"]


def deliveries(client, **params) -> dict:
    resp = client.http.get("/v1/webhooks/deliveries", params=params)
    assert resp.status_code == 200, resp.text
    return resp.json()


def wait_received(receiver, p: str, n: int = 1, timeout: float = 30) -> list[Received]:
    return wait_until(lambda: got if len(got := receiver.received(p)) >= n else None, timeout,
                      what=f"{n} call(s) to {p}")


def wait_event_status(client, job_id: str, status: str, timeout: float = 30) -> dict:
    def check():
        data = client.http.get("/v1/webhooks/events", params={"job_id": job_id}).json()["data"]
        return data[0] if data and data[0]["status"] == status else None
    return wait_until(check, timeout, what=f"event of job {job_id} {status}")


def without_urls(job: dict) -> dict:
    return {**{k: v for k, v in job.items() if k != "urls"},
            "images": [{k: v for k, v in i.items() if k != "url"} for i in job["images"]]}


def test_job_completion_reaches_the_receiver_signed(client, worker, webhooks_worker, receiver, tenant, stack_env):
    secret = secret_of(client)
    assert secret.startswith("whsec_") and secret_of(client) == secret  # created once, then stable
    cli = subprocess.run([sys.executable, "-m", "common.cli.main", "webhooks", "secret", "--tenant", tenant.name],
                         cwd=REPO, env={**os.environ, **stack_env}, capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0 and cli.stdout.strip() == secret, cli.stderr

    p = path("ok")
    job = client.submit({**JOB, "webhook_url": receiver.url(p)}).json()
    assert client.wait(job["id"])["status"] == "succeeded"
    [call] = wait_received(receiver, p)
    body = Webhook(secret).verify(call.body, call.headers)  # raises unless the signature and timestamp hold
    assert call.headers["webhook-id"].startswith("msg_") and call.headers["content-type"] == "application/json"
    assert body["type"] == "job.succeeded"
    # the payload is the job as GET returns it (URLs aside: presigned per call, and the base the worker knows)
    got = client.get(job["id"])
    assert without_urls(body["data"]) == without_urls(got)
    assert body["data"]["urls"]["self"].endswith(f"/v1/jobs/{job['id']}")
    assert [i["url"] for i in body["data"]["images"]]

    event = wait_event_status(client, job["id"], "delivered")
    assert event["id"] == call.headers["webhook-id"] and event["type"] == "job.succeeded" and event["attempts"] == 1
    [d] = deliveries(client, job_id=job["id"])["data"]
    assert (d["status_code"], d["outcome"], d["attempt"], d["trigger"]) == (200, "success", 1, "scheduled")
    assert d["event_id"] == event["id"] and d["ip"] == "127.0.0.1" and d["response_excerpt"] == "ok"


def test_redelivery_keeps_the_webhook_id_and_rotation_signs_twice(client, worker, webhooks_worker, receiver):
    old = secret_of(client)
    p = path("ok")
    job = client.submit({**JOB, "webhook_url": receiver.url(p)}).json()
    [first] = wait_received(receiver, p, timeout=60)
    rotated = client.http.post("/v1/webhooks/secret/rotate", json={"previous_valid_for_s": 3600})
    assert rotated.status_code == 200 and rotated.json()["previous_secret_expires_at"]
    new = rotated.json()["secret"]
    assert new != old and secret_of(client) == new

    [d] = wait_until(lambda: deliveries(client, job_id=job["id"])["data"], 30, what="first delivery logged")
    resp = client.http.post(f"/v1/webhooks/deliveries/{d['id']}/redeliver")
    assert resp.status_code == 202, resp.text
    _, again = wait_received(receiver, p, 2)
    assert again.headers["webhook-id"] == first.headers["webhook-id"] and again.body == first.body
    assert len(again.headers["webhook-signature"].split(" ")) == 2  # new and previous secret
    for secret in (old, new):
        Webhook(secret).verify(again.body, again.headers)
    log = wait_until(lambda: r if len(r := deliveries(client, event_id=d["event_id"])["data"]) == 2 else None, 30,
                     what="redelivery logged")
    assert [(x["attempt"], x["trigger"], x["outcome"]) for x in log] == [(2, "redeliver", "success"),
                                                                        (1, "scheduled", "success")]
    assert client.http.post(f"/v1/webhooks/deliveries/{uuid.uuid4()}/redeliver").status_code == 404
    bad = client.http.post("/v1/webhooks/secret/rotate", json={"previous_valid_for_s": -1})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "previous_valid_for_s"


def test_retries_after_500s_carry_the_same_webhook_id(client, worker, webhooks_worker, receiver):
    secret = secret_of(client)
    p = path("flaky/2")
    job = client.submit({**JOB, "webhook_url": receiver.url(p)}).json()
    calls = wait_received(receiver, p, 3, timeout=60)
    assert len({c.headers["webhook-id"] for c in calls}) == 1  # a retry is the same message
    assert len({c.body for c in calls}) == 1
    for c in calls:
        Webhook(secret).verify(c.body, c.headers)
    assert calls[1].started - calls[0].started >= 0.4 and calls[2].started - calls[1].started >= 0.9  # schedule
    wait_event_status(client, job["id"], "delivered")

    # the delivery log: newest first, paged, filtered
    page = deliveries(client, job_id=job["id"], limit=2)
    assert [(d["attempt"], d["status_code"], d["outcome"]) for d in page["data"]] == [(3, 200, "success"),
                                                                                      (2, 500, "retry")]
    assert page["has_more"] and page["data"][1]["error"] == "HTTP 500"
    rest = deliveries(client, job_id=job["id"], limit=2, cursor=page["next_cursor"])
    assert [d["attempt"] for d in rest["data"]] == [1] and not rest["has_more"]
    assert len(deliveries(client, event_id=calls[0].headers["webhook-id"])["data"]) == 3
    assert deliveries(client, job_id=str(uuid.uuid4()))["data"] == []
    bad = client.http.get("/v1/webhooks/deliveries", params={"job_id": "nope"})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "job_id"


def test_receiver_down_for_a_while_then_back(client, worker, webhooks_worker):
    down = Receiver()
    down.stop()  # nothing listens on its port: connections are refused
    secret = secret_of(client)
    p = path("ok")
    job = client.submit({**JOB, "webhook_url": down.url(p)}).json()
    assert client.wait(job["id"])["status"] == "succeeded"  # the job does not wait for its webhook
    wait_until(lambda: len(deliveries(client, job_id=job["id"])["data"]) >= 2, 30, what="two failed attempts")
    down.start()  # back on the same port
    try:
        [call] = wait_received(down, p, timeout=30)
        Webhook(secret).verify(call.body, call.headers)
        event = wait_event_status(client, job["id"], "delivered")
        log = deliveries(client, job_id=job["id"])["data"]
        assert log[0]["outcome"] == "success" and log[0]["attempt"] == event["attempts"] >= 3
        assert all(d["status_code"] is None and d["error"] for d in log[1:])  # refused connections, logged
    finally:
        down.stop()


def test_410_disables_the_endpoint_until_redelivered(client, worker, webhooks_worker, receiver):
    p = path("gone")
    url = receiver.url(p)
    first = client.submit({**JOB, "webhook_url": url}).json()
    wait_event_status(client, first["id"], "disabled")
    assert len(receiver.received(p)) == 1  # no retry after 410
    disabled = client.http.get("/v1/webhooks/disabled-endpoints").json()
    assert [e["url"] for e in disabled] == [url] and "410" in disabled[0]["reason"]

    second = client.submit({**JOB, "webhook_url": url, "seed": 8}).json()
    assert client.wait(second["id"])["status"] == "succeeded"
    event = wait_event_status(client, second["id"], "disabled")
    time.sleep(1.5)
    assert len(receiver.received(p)) == 1 and event["attempts"] == 0  # recorded, never sent

    receiver.override[p] = 200  # the receiver is fixed; an explicit redelivery re-enables the endpoint
    assert client.http.post(f"/v1/webhooks/events/{event['id']}/redeliver").status_code == 202
    call = wait_received(receiver, p, 2)[1]
    assert call.headers["webhook-id"] == event["id"] and json.loads(call.body)["data"]["id"] == second["id"]
    wait_event_status(client, second["id"], "delivered")
    assert client.http.get("/v1/webhooks/disabled-endpoints").json() == []


def test_slow_receiver_does_not_slow_generation(client, worker, webhooks_worker, receiver):
    p = path("slow/5")
    jobs = [client.submit({**JOB, "webhook_url": receiver.url(p), "seed": s}).json() for s in (11, 12)]
    done = [client.wait(j["id"]) for j in jobs]
    finished_all = time.time()
    assert [d["status"] for d in done] == ["succeeded", "succeeded"]
    # both jobs finished while the receiver was still sitting on the first job's call: the GPU worker only
    # wrote an outbox row and sent an id; the webhook worker's threads wait on the receiver
    calls = wait_received(receiver, p, 1)
    assert calls[0].finished is None or calls[0].finished > finished_all
    assert all(d["timings"]["generate_s"] < 5 for d in done)
    both = wait_received(receiver, p, 2, timeout=30)
    assert {json.loads(c.body)["data"]["id"] for c in both} == {j["id"] for j in jobs}
    for j in jobs:
        wait_event_status(client, j["id"], "delivered", timeout=20)


def test_batch_completion_and_cancellation_reach_the_receiver(client, worker, webhooks_worker, receiver):
    secret = secret_of(client)
    line = {"prompt": "a poster that says BATCH", "width": 256, "height": 256, "preset": "V4_TURBO_12", "steps": 1}
    p_done, p_cancel = path("ok"), path("ok")
    done = client.http.post("/v1/batches", json={"items": [{**line, "custom_id": f"c{i}", "seed": i}
                                                           for i in range(2)],
                                                 "webhook_url": receiver.url(p_done)})
    assert done.status_code == 202, done.text
    canceled = client.http.post("/v1/batches", json={"items": [{**line, "custom_id": "x", "seed": 9}],
                                                     "webhook_url": receiver.url(p_cancel)}).json()
    client.http.post(f"/v1/batches/{canceled['id']}/cancel")
    [call] = wait_received(receiver, p_done, timeout=90)
    body = Webhook(secret).verify(call.body, call.headers)
    assert body["type"] == "batch.completed" and body["data"]["id"] == done.json()["id"]
    got = client.http.get(f"/v1/batches/{done.json()['id']}").json()
    assert body["data"]["request_counts"] == got["request_counts"] == {
        "total": 2, "queued": 0, "running": 0, "succeeded": 2, "failed": 0, "canceled": 0}
    drop = ("urls", "results_url")
    assert {k: v for k, v in body["data"].items() if k not in drop} == {k: v for k, v in got.items() if k not in drop}
    [call] = wait_received(receiver, p_cancel, timeout=60)
    body = Webhook(secret).verify(call.body, call.headers)
    assert body["type"] == "batch.cancelled" and body["data"]["status"] == "cancelled"
    events = client.http.get("/v1/webhooks/events", params={"batch_id": canceled["id"]}).json()["data"]
    assert [e["type"] for e in events] == ["batch.cancelled"]
    assert len(deliveries(client, batch_id=done.json()["id"])["data"]) == 1
