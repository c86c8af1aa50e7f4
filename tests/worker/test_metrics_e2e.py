"""Metrics through a real Prometheus server: deploy/prometheus/prometheus.yml and alerts.yml, scraping a private
stack (its own Postgres and Redis, so every count here is exact), asserted with PromQL over Prometheus's HTTP API.
The server is the `prometheus` Debian package (.ci/run installs it)."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import httpx
import pytest
import yaml

from common.devstack.servers import free_port
from tests.support import REPO, wait_until

pytestmark = pytest.mark.slow

DEPLOY = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "letterpress.json"
SHORT = {"prompt": "a sign that says OPEN", "width": 256, "height": 256, "preset": "V4_TURBO_12", "seed": 5}
LONG = {**SHORT, "width": 512, "height": 512, "steps": 80}


class Prometheus:
    """The server on the deploy config: scrape and rule intervals of 0.5 s, targets from files the test writes
    (file discovery, so a worker started later is picked up), the alert rules as shipped but with `for: 0s`."""

    def __init__(self, root: Path):
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("the Prometheus server is not installed: `apt-get install prometheus` (.ci/run does)")
        self.root, self.port = root, free_port()
        config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
        config["global"].update(scrape_interval="500ms", evaluation_interval="500ms")
        for job in config["scrape_configs"]:
            job.pop("static_configs")
            job["file_sd_configs"] = [{"files": [str(root / f"{job['job_name']}.json")], "refresh_interval": "1s"}]
            self.targets(job["job_name"], [])
        rules = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
        for group in rules["groups"]:
            for rule in group["rules"]:
                rule["for"] = "0s"
        (root / "alerts.yml").write_text(yaml.safe_dump(rules))
        (root / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.proc = subprocess.Popen(
            [binary, f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=open(root / "prometheus.log", "wb"), stderr=subprocess.STDOUT)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10)
        wait_until(self._ready, 60, what="prometheus ready")

    def _ready(self) -> bool:
        try:
            return self.http.get("/-/ready").status_code == 200
        except httpx.HTTPError:
            return False

    def targets(self, job: str, addresses: list[str]) -> None:
        (self.root / f"{job}.json").write_text(json.dumps([{"targets": addresses}]))

    def query(self, promql: str) -> list[dict]:
        body = self.http.get("/api/v1/query", params={"query": promql}).json()
        assert body["status"] == "success", body
        return body["data"]["result"]

    def value(self, promql: str) -> float | None:
        """The single value of an expression; None while it has no data."""
        result = self.query(promql)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    def eventually(self, promql: str, expected: float, timeout: float = 30) -> None:
        """The expression settles on `expected` (a scrape and a rule evaluation are 0.5 s apart)."""
        try:
            wait_until(lambda: self.value(promql) == expected, timeout, what=f"{promql} == {expected}")
        except Exception:
            raise AssertionError(f"{promql} is {self.value(promql)}, expected {expected}") from None

    def firing(self) -> set[tuple[str, str]]:
        """(alert name, instance) of every firing alert."""
        alerts = self.http.get("/api/v1/alerts").json()["data"]["alerts"]
        return {(a["labels"]["alertname"], a["labels"].get("instance", "")) for a in alerts if a["state"] == "firing"}

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def prometheus(own_stack, tmp_path_factory):
    server = Prometheus(tmp_path_factory.mktemp("prometheus"))
    server.targets("letterpress-api", [own_stack.api_url.removeprefix("http://")])
    yield server
    server.stop()


def scrape_target(stack, name: str) -> str:
    return f"127.0.0.1:{stack.procs.metrics_ports[name]}"


@pytest.fixture
def webhook_receiver():
    """A local endpoint that answers every delivery 204."""
    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *_):
            pass

    server = HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/hook"
    server.shutdown()


def dashboard_queries() -> list[tuple[str, str, bool]]:
    """(panel title, PromQL, GPU-only) of every target of the Grafana dashboard."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(p["title"], t["expr"], "GPU workers only" in p.get("description", "")) for p in panels for t in p["targets"]]


def test_prometheus_loads_the_shipped_config_and_rules():
    for args in (["check", "config", str(DEPLOY / "prometheus.yml")], ["check", "rules", str(DEPLOY / "alerts.yml")]):
        done = subprocess.run(["promtool", *args], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr


def test_jobs_queue_and_workers_as_prometheus_sees_them(fresh_workers, prometheus, webhook_receiver):
    stack = fresh_workers
    client = stack.client()
    stack.procs.start_webhooks_worker("webhooks")
    prometheus.targets("letterpress-webhooks", [scrape_target(stack, "webhooks")])
    ids = [client.submit({**SHORT, "seed": seed, "webhook_url": webhook_receiver}).json()["id"] for seed in range(3)]
    prometheus.eventually('letterpress_queue_jobs_waiting{queue="interactive"}', 3)
    assert prometheus.value('letterpress_queue_oldest_waiting_seconds{queue="interactive"}') > 0
    name, _ = stack.start_worker()
    prometheus.targets("letterpress-worker", [scrape_target(stack, name)])
    assert [client.wait(i)["status"] for i in ids] == ["succeeded"] * 3

    prometheus.eventually("letterpress_api_jobs_accepted_total", 3)
    prometheus.eventually('sum(http_requests_total{handler="/v1/jobs", method="POST", status="2xx"})', 3)
    prometheus.eventually('letterpress_worker_jobs_total{outcome="succeeded"}', 3)
    prometheus.eventually("letterpress_worker_images_total", 3)
    assert prometheus.value('letterpress_worker_gpu_seconds_total{gpu_kind="cpu", capacity="on_demand"}') > 0
    prometheus.eventually('letterpress_worker_attempts_started_total{kind="first"}', 3)
    prometheus.eventually('sum(letterpress_worker_generation_seconds_count{preset="V4_TURBO_12", size="256x256"})', 3)
    prometheus.eventually('letterpress_worker_queue_wait_seconds_count{queue="interactive"}', 3)
    prometheus.eventually('letterpress_queue_jobs_waiting{queue="interactive"}', 0)
    prometheus.eventually('letterpress_queue_broker_messages{queue="interactive"}', 0)
    prometheus.eventually("letterpress_worker_ready", 1)
    assert prometheus.value("letterpress_worker_warmup_seconds") > 0
    assert prometheus.value("letterpress_worker_lease_renewals_total") >= 3  # one beat at least a job
    assert prometheus.value("max(letterpress_queue_scrape_error)") == 0
    assert ("LetterpressWorkerDown", scrape_target(stack, name)) not in prometheus.firing()
    prometheus.eventually('letterpress_webhook_deliveries_total{outcome="success"}', 3)
    assert prometheus.value("letterpress_webhook_delivery_seconds_count") == 3
    prometheus.eventually("letterpress_webhook_events_pending", 0)
    stack.procs.stop("webhooks")


def test_a_worker_killed_mid_job_is_one_expired_lease_one_retry_and_an_alert(fresh_workers, prometheus):
    stack = fresh_workers
    client = stack.client()
    first, _ = stack.start_worker()
    prometheus.targets("letterpress-worker", [scrape_target(stack, first)])
    job = client.submit(LONG).json()
    wait_until(lambda: client.get(job["id"])["progress"]["step"] >= 1, 90, what="job running")
    prometheus.eventually("sum(letterpress_queue_jobs_running)", 1)
    stack.procs.signal(first, signal.SIGKILL)
    # the dead target is scraped as down, and the shipped rule (with `for` cut to 0 s) fires
    down = ("LetterpressWorkerDown", scrape_target(stack, first))
    wait_until(lambda: down in prometheus.firing(), 30, what="LetterpressWorkerDown firing")

    second, _ = stack.start_worker()
    prometheus.targets("letterpress-worker", [scrape_target(stack, first), scrape_target(stack, second)])
    assert client.wait(job["id"], timeout=180)["attempts"] == 2
    worker = f'instance="{scrape_target(stack, second)}"'
    prometheus.eventually(f"letterpress_maintenance_leases_expired_total{{{worker}}}", 1)
    prometheus.eventually(f'letterpress_worker_attempts_started_total{{{worker}, kind="retry"}}', 1)
    prometheus.eventually(f'letterpress_worker_jobs_total{{{worker}, outcome="succeeded"}}', 1)
    # two samples of the retry counter before this worker stops at the test's end, so that a range query over it
    # (the dashboard's `increase(...[1h])`, next test) has data once the worker is gone; one sample gives none
    retries = f'count_over_time(letterpress_worker_attempts_started_total{{{worker}, kind="retry"}}[10m])'
    wait_until(lambda: (prometheus.value(retries) or 0) >= 2, 30, what="two samples of the retry counter")


def test_every_dashboard_panel_draws_from_live_metrics(fresh_workers, prometheus):
    """After the two tests above (jobs, webhooks, a retry, a dead worker), with a batch in progress: every
    expression of deploy/grafana/letterpress.json returns data, so a renamed or missing metric fails here. The GPU
    panels have no data on this CPU machine: their expressions must still be valid PromQL."""
    stack = fresh_workers
    client = stack.client()
    name, _ = stack.start_worker()
    prometheus.targets("letterpress-worker", [scrape_target(stack, name), *json.loads(
        (prometheus.root / "letterpress-worker.json").read_text())[0]["targets"]])
    resp = client.http.post("/v1/batches", json={"items": [{**LONG, "custom_id": f"l{i}", "seed": 50 + i}
                                                                   for i in range(3)]})  # distinct: no cache hits
    assert resp.status_code == 202, resp.text
    prometheus.eventually(f'letterpress_worker_ready{{instance="{scrape_target(stack, name)}"}}', 1)
    wait_until(lambda: prometheus.query("letterpress_batch_items_remaining"), 30, what="a batch in progress")
    empty = []
    for title, expr, gpu_only in dashboard_queries():
        result = prometheus.query(expr)  # a malformed expression fails the query itself
        if not result and not gpu_only:
            empty.append(f"{title}: {expr}")
    client.http.post(f"/v1/batches/{resp.json()['id']}/cancel")
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)
