"""`python -m worker.bench.front_door`, small: its own Postgres, Redis and two uvicorn processes, a second of each
load, two uploads. The figures themselves are docs/PERFORMANCE.md's; this checks that the instrument runs and
reports what it claims (statuses, latency, the API's CPU a request, its event loops' lag and the load
generator's own)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from worker.bench.batch_ingest import REPO

pytestmark = pytest.mark.slow


def test_the_bench_runs_each_rate_and_reports_it(tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "-m", "worker.bench.front_door", "--submit-rates", "20", "--read-rates",
                           "40", "--duration", "1", "--pause", "0", "--warmup", "0.5", "--uploads", "2",
                           "--upload-lines", "5", "--upload-seconds", "1", "--api-workers", "2", "--read-jobs", "5",
                           "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    (submit,), (read,) = result["submit"], result["read"]
    assert submit["statuses"] == {"202": 20} and read["statuses"] == {"200": 40}
    assert read["jobs"] == 5  # spread over five of the queued jobs
    for run in (submit, read):
        assert run["answered"] == run["sent"] and 0 < run["p50_ms"] <= run["p99_ms"] and run["server_cpu_ms"] > 0
        # two processes, a timer each every 0.25 s, over at least the run's second
        assert run["loop_lag"]["observed"] >= 4 and 0 <= run["loop_lag"]["over_50ms"] <= run["loop_lag"]["observed"]
        assert run["load_generator_late_p99_ms"] >= 0
    uploads = result["uploads"]
    assert uploads["statuses"].get("202", 0) >= 1 and set(uploads["statuses"]) <= {"202", "429"}
    assert uploads["healthz_probes"] >= 1
    assert "| POST /v1/jobs | 20 | 20 | 20 | 202: 20 |" in proc.stdout
    assert "| GET /v1/jobs/{id} | 40 | 40 | 40 | 200: 40 |" in proc.stdout
