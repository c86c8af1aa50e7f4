"""`letterpress status`: the fleet at a glance, for the operator at 3 a.m. Reads Postgres and Redis directly (the
settings' URLs), not the REST API: it sees every tenant, so it is an operator's command, not a tenant's.

Workers come from the registry they announce themselves in (common.fleet, worker/presence.py); images a minute
from the usage ledger's last minutes; the queue from the same snapshot as the API's queue gauges."""
from __future__ import annotations

from typing import Any

from common.cli.tables import human_duration, table
from common.fleet_status import fleet_status

__all__ = ["fleet_status", "render"]  # fleet_status lives in common (the console shows it too); rendered here


def render(status: dict[str, Any]) -> str:
    lines = [f"Workers ({len(status['workers'])} seen)"]
    if status["workers"]:
        lines += table(["WORKER", "STATE", "GPU", "CAPACITY", "VARIANT", "CURRENT JOB", "IMAGES/MIN (5 min)"],
                        [[w["worker_id"], w["state"], w["gpu_kind"], w["capacity"], w["variant"], w["current_job"],
                          w["images_per_min"]] for w in status["workers"]])
    else:
        lines.append("  none: no worker has announced itself in the last few seconds")
    lines.append("Queues")
    lines += table(["QUEUE", "WAITING", "IN BROKER", "RUNNING", "OLDEST WAITING"],
                    [[q, c.get("waiting"), c.get("in_broker"), c.get("running"),
                      human_duration(c.get("oldest_waiting_s")) if c.get("waiting") else "-"]
                     for q, c in status["queues"].items()])
    lines.append(f"Batches in progress ({len(status['batches'])})")
    if status["batches"]:
        lines += table(["BATCH", "TENANT", "DONE", "IMAGES/MIN", "ETA", "GPU-SECONDS", "COST"],
                        [[b["id"], b["tenant"], f"{b['finished']}/{b['total']}", b["images_per_min"],
                          human_duration(b["eta_s"]), b["gpu_seconds"],
                          f"{b['estimated_cost']:.4f} {b['currency']}"]
                         for b in status["batches"]])
    lines += [f"error: {e}" for e in status["errors"]]
    return "\n".join(lines)
