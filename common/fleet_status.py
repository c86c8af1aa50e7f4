"""The fleet at a glance as plain JSON values: workers (their announcements and recent images a minute), queues
(Postgres and the broker), batches in progress with rate, ETA and cost. `letterpress status` (common/cli/status.py)
prints it; the console's operations page (api/console/operations.py) shows it to admin keys. It spans every
tenant: an operator's view, never a tenant's."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import redis as redis_lib
from sqlalchemy.exc import SQLAlchemyError

from common.broker import QUEUES, queue_depth
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
        out["queues"] = {q: {"waiting": c.waiting, "running": c.running,
                             "oldest_waiting_s": round(c.oldest_waiting_s, 1)}
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
