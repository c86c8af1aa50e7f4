"""`letterpress api` with several uvicorn processes (LETTERPRESS_API__WORKERS=2): a scrape of /metrics, whichever
process answers it, counts the requests every process served (prometheus_client's multiprocess files, set up by
common.devstack.stack.api_env), so Prometheus sees one consistent series instead of one process's share."""
from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.mmap_dict import MmapedDict

from tests.support import Processes, free_port, wait_http

pytestmark = pytest.mark.slow
HEALTHZ = 'http_requests_total{handler="/healthz",method="GET",status="2xx"}'


def counted(text: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(HEALTHZ))


def served_by_process(directory: Path) -> list[float]:
    """The /healthz requests each process counted, from its own multiprocess file."""
    per_process = []
    for path in directory.glob("counter_*.db"):
        values = MmapedDict.read_all_values_from_file(str(path))
        per_process.append(sum(value for key, value, *_ in values
                               if json.loads(key)[1] == "http_requests_total" and '"/healthz"' in key))
    return per_process


def test_every_scrape_counts_the_requests_of_every_api_process(stack_env, tmp_path):
    procs = Processes({**stack_env, "LETTERPRESS_API__WORKERS": "2", "LETTERPRESS_HOME": str(tmp_path / "home")},
                      tmp_path)
    port = free_port()
    procs._spawn("api2", [sys.executable, "-m", "common.cli.main", "api", "--host", "127.0.0.1", "--port", str(port)])
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/healthz")
        before = counted(httpx.get(url + "/metrics").text)
        with ThreadPoolExecutor(12) as pool:  # a new connection each, 12 at once: both processes accept some
            assert set(pool.map(lambda _: httpx.get(url + "/healthz").status_code, range(60))) == {200}
        served = served_by_process(tmp_path / "home" / "run" / f"api-metrics-{port}")
        assert len([n for n in served if n > 0]) == 2, served  # both processes answered requests
        scrapes = [counted(httpx.get(url + "/metrics").text) - before for _ in range(6)]
        assert scrapes == [60] * 6, scrapes  # every scrape, whichever process answered it, counts them all
    finally:
        procs.stop("api2")
