"""Preemption safety with real processes: SIGKILL (lease expiry), SIGTERM drain (free preemption), a spot notice,
Redis down at submit (lost enqueue), Postgres down (503, then recovery)."""
from __future__ import annotations

import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

from tests.support import wait_until

SHORT = {"prompt": "a sign that says OPEN", "width": 256, "height": 256, "preset": "V4_TURBO_12", "seed": 5}
LONG = {**SHORT, "width": 512, "height": 512, "steps": 80}


def wait_running(client, job_id, min_step=1, timeout=90):
    return wait_until(lambda: (j := client.get(job_id))["progress"]["step"] >= min_step and j, timeout,
                      what=f"job {job_id} past step {min_step}")


def test_sigkill_worker_job_requeued_after_lease_and_counts_an_attempt(fresh_workers):
    stack = fresh_workers
    client = stack.client()
    name, _ = stack.start_worker()
    job = client.submit(LONG).json()
    wait_running(client, job["id"])
    stack.procs.signal(name, signal.SIGKILL)
    killed_at = time.monotonic()
    stack.start_worker()
    # lease TTL (6 s) + maintenance period (1 s) + a margin, long before Redis's one-hour visibility timeout
    wait_until(lambda: client.get(job["id"])["attempts"] == 2, 30, what="second attempt")
    assert time.monotonic() - killed_at < 20
    done = client.wait(job["id"], timeout=180)
    assert done["status"] == "succeeded" and done["attempts"] == 2 and done["preemptions"] == 0


def test_sigterm_drains_and_returns_the_job_free(fresh_workers):
    stack = fresh_workers
    client = stack.client()
    name, _ = stack.start_worker({"LETTERPRESS_WORKER__DRAIN_GRACE_S": "0.5"})
    job = client.submit(LONG).json()
    wait_running(client, job["id"])
    stack.procs.signal(name, signal.SIGTERM)
    assert stack.procs.wait_exit(name, timeout=60) == 0
    released = client.get(job["id"])
    assert released["status"] == "queued"
    assert (released["attempts"], released["preemptions"]) == (0, 1)
    stack.start_worker()
    done = client.wait(job["id"], timeout=180)
    assert done["status"] == "succeeded" and (done["attempts"], done["preemptions"]) == (1, 1)


def test_sigterm_within_grace_lets_the_running_job_finish(fresh_workers):
    stack = fresh_workers
    client = stack.client()
    name, _ = stack.start_worker({"LETTERPRESS_WORKER__DRAIN_GRACE_S": "120"})
    job = client.submit({**LONG, "steps": 30}).json()
    wait_running(client, job["id"])
    stack.procs.signal(name, signal.SIGTERM)
    assert stack.procs.wait_exit(name, timeout=150) == 0
    done = client.get(job["id"])
    assert done["status"] == "succeeded" and done["attempts"] == 1 and done["preemptions"] == 0


class SpotNotice(BaseHTTPRequestHandler):
    preempted = False

    def do_GET(self):
        self.send_response(200 if SpotNotice.preempted else 404)
        self.end_headers()
        self.wfile.write(b'{"action": "terminate"}' if SpotNotice.preempted else b"")

    def log_message(self, *args):
        pass


def test_spot_notice_drains_the_worker(fresh_workers):
    stack = fresh_workers
    client = stack.client()
    server = HTTPServer(("127.0.0.1", 0), SpotNotice)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    SpotNotice.preempted = False
    name, _ = stack.start_worker({"LETTERPRESS_WORKER__SPOT_NOTICE_URL": f"http://127.0.0.1:{server.server_port}/",
                                  "LETTERPRESS_WORKER__SPOT_POLL_S": "0.2",
                                  "LETTERPRESS_WORKER__DRAIN_GRACE_S": "0.5"})
    job = client.submit(LONG).json()
    wait_running(client, job["id"])
    SpotNotice.preempted = True
    assert stack.procs.wait_exit(name, timeout=60) == 0
    released = client.get(job["id"])
    server.shutdown()
    assert released["status"] == "queued" and released["preemptions"] == 1 and released["attempts"] == 0
    assert "spot preemption notice" in stack.procs.log(name)
    client.http.post(f"/v1/jobs/{job['id']}/cancel")  # leave no work behind for the next test's worker


def test_redis_down_at_submit_is_enqueued_by_maintenance(fresh_workers):
    stack = fresh_workers
    client = stack.client()
    stack.start_worker()
    stack.redis.kill()
    resp = client.submit(SHORT)
    assert resp.status_code == 202  # Postgres holds the job
    job = resp.json()
    assert job["status"] == "queued"
    stack.redis.start()
    done = client.wait(job["id"], timeout=180)
    assert done["status"] == "succeeded"


def test_postgres_down_is_a_clear_503_and_everything_recovers(fresh_workers):
    stack = fresh_workers
    client = stack.client()
    stack.start_worker()
    before = client.submit(SHORT).json()  # the API's connection pools now hold connections the kill will break
    client.wait(before["id"], timeout=90)
    stack.pg.kill()
    for resp in (client.submit(SHORT), client.http.get(f"/v1/jobs/{before['id']}")):
        assert resp.status_code == 503, resp.text
        assert resp.json()["error"]["type"] == "service_unavailable"
    assert client.http.get("/readyz").status_code == 503
    stack.pg.start()
    wait_until(lambda: client.http.get("/readyz").status_code == 200, 30, what="ready again")
    # the first submit and read after the restart succeed: a pooled connection the restart broke is replaced
    assert client.http.get(f"/v1/jobs/{before['id']}").status_code == 200
    resp = client.submit(SHORT)
    assert resp.status_code == 202, resp.text
    assert client.wait(resp.json()["id"], timeout=90)["status"] == "succeeded"


def test_frozen_worker_wakes_after_takeover_and_writes_nothing(fresh_workers):
    """Fencing: a worker frozen past its lease (SIGSTOP) wakes while another attempt runs its job; the stale
    attempt must stop without recording anything."""
    stack = fresh_workers
    client = stack.client()
    frozen, _ = stack.start_worker()
    job = client.submit(LONG).json()
    wait_running(client, job["id"])
    stack.procs.signal(frozen, signal.SIGSTOP)
    stack.start_worker()
    wait_until(lambda: (j := client.get(job["id"]))["attempts"] == 2 and j["status"] == "running", 60,
               what="job taken over by the second worker")
    stack.procs.signal(frozen, signal.SIGCONT)
    done = client.wait(job["id"], timeout=180)
    assert done["status"] == "succeeded" and done["attempts"] == 2
    wait_until(lambda: "lease lost" in stack.procs.log(frozen), 30, what="the stale attempt noticed")
    assert ": 'succeeded'" not in stack.procs.log(frozen)
