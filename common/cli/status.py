"""`letterpress status`: the fleet at a glance, for the operator at 3 a.m. Reads Postgres and Redis directly (the
settings' URLs), not the REST API: it sees every tenant, so it is an operator's command, not a tenant's.

Workers come from the registry they announce themselves in (common.fleet, worker/presence.py); images a minute
from the usage ledger's last minutes; the queue from the same snapshot as the API's queue gauges."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import redis as redis_lib
from sqlalchemy.exc import SQLAlchemyError

from common.broker import QUEUES, queue_depth
from common.cli.tables import human_duration, table
from common.db import session_scope
from common.fleet import queue_snapshot, workers_seen
from common.settings import Settings
from common.usage import batch_usage, recent_worker_throughput

THROUGHPUT_WINDOW_S = 300.0


def fleet_status(settings: Settings) -> dict[str, Any]:
    """Everything `letterpress status` shows, as plain JSON values; a source that cannot be read is named in
    `errors` and its part left empty (the rest still shows)."""
    out: dict[str, Any] = {"time": datetime.now(timezone.utc).isoformat(), "workers": [], "queues": {},
                           "batches": [], "errors": []}
    throughput: dict[str, tuple[int, float]] = {}
    try:
        with session_scope() as session:
            snapshot = queue_snapshot(session)
            throughput = recent_worker_throughput(session, window_s=THROUGHPUT_WINDOW_S)
            usage = batch_usage(session, [b.id for b in snapshot.batches], settings.pricing)
        out["queues"] = {q: {"waiting": c.waiting, "running": c.running, "oldest_waiting_s": round(c.oldest_waiting_s, 1)}
                         for q, c in snapshot.queues.items()}
        out["batches"] = [{"id": str(b.id), "tenant": b.tenant, "total": b.total, "finished": b.finished,
                           "remaining": b.remaining, "images_per_min": _round(b.images_per_min),
                           "eta_s": _round(b.eta_s), **_cost(usage[b.id].as_dict())} for b in snapshot.batches]
        out["webhook_events_pending"] = snapshot.webhook_events_pending
    except SQLAlchemyError as exc:
        out["errors"].append(f"postgres: {exc.__class__.__name__}: {str(exc).splitlines()[0][:200]}")
    for queue in QUEUES:
        depth = queue_depth(settings.redis.url, queue)
        out["queues"].setdefault(queue, {})["in_broker"] = depth
    try:
        client = redis_lib.Redis.from_url(settings.redis.url, socket_connect_timeout=2, socket_timeout=2)
        for worker in workers_seen(client):
            images, _ = throughput.get(worker["worker_id"], (0, 0.0))
            out["workers"].append({**worker, "images_per_min": round(images / THROUGHPUT_WINDOW_S * 60, 2)})
    except redis_lib.RedisError as exc:
        out["errors"].append(f"redis: {exc.__class__.__name__}: {exc}")
    return out


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def _cost(usage: dict) -> dict:
    return {"gpu_seconds": usage["gpu_seconds"], "estimated_cost": usage["estimated_cost"],
            "currency": usage["currency"]}


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
