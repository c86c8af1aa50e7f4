"""`python -m api.request_cost` (what `letterpress`'s front-door bench runs with `--in-process`): the call kinds go
through the real app and are answered as expected, and the report has one row each with a cost."""
from __future__ import annotations

import json

from api.request_cost import main
from tests.support import make_tenant


def test_it_measures_a_read_and_a_submit_through_the_app(stack_env, capsys):
    tenant = make_tenant()
    assert main(["--key", tenant.key, "--calls", "3", "--warm", "1"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["call"] for r in rows] == ["GET /v1/jobs/{id}", "POST /v1/jobs", "POST /v1/jobs, 20 at once"]
    assert [r["calls"] for r in rows] == [3, 3, 20]  # at once: whole groups of 20
    assert all(r["cpu_ms"] > 0 and r["wall_ms"] > 0 for r in rows)
