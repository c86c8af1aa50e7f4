"""`letterpress api` with several uvicorn processes (LETTERPRESS_API__WORKERS=2): a scrape of /metrics, whichever
process answers it, counts the requests every process served (prometheus_client's multiprocess files, set up by
common.devstack.stack.api_env), so Prometheus sees one consistent series instead of one process's share."""
from __future__ import annotations

import sys

import httpx
import pytest

from tests.support import Processes, free_port, wait_http

pytestmark = pytest.mark.slow
HEALTHZ = 'http_requests_total{handler="/healthz",method="GET",status="2xx"}'


def counted(text: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(HEALTHZ))


def test_every_scrape_counts_the_requests_of_every_api_process(stack_env, tmp_path):
    procs = Processes({**stack_env, "LETTERPRESS_API__WORKERS": "2", "LETTERPRESS_HOME": str(tmp_path / "home")},
                      tmp_path)
    port = free_port()
    procs._spawn("api2", [sys.executable, "-m", "common.cli.main", "api", "--host", "127.0.0.1", "--port", str(port)])
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/healthz")
        before = counted(httpx.get(url + "/metrics").text)
        for _ in range(60):  # a new connection each: the kernel spreads them over both processes
            assert httpx.get(url + "/healthz").status_code == 200
        files = list((tmp_path / "home" / "run" / f"api-metrics-{port}").glob("counter_*.db"))
        assert len(files) >= 2, files  # both processes counted requests
        scrapes = [counted(httpx.get(url + "/metrics").text) - before for _ in range(6)]
        assert scrapes == [60] * 6, scrapes
    finally:
        procs.stop("api2")
