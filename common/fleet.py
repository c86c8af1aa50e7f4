"""What the fleet is doing now: the queue as Postgres sees it, and the workers that announced themselves.

- `queue_snapshot`: a few grouped counts on Postgres indexes. The API's queue gauges (api/metrics.py) and
  `letterpress status` (common/cli/status.py) both read it, so the dashboard and the operator's terminal agree.
- The worker registry: each GPU worker writes a small JSON value to Redis (`announce`, from worker/presence.py) every few
  seconds with a TTL of a few periods; a worker that dies (SIGKILL, a lost node) disappears when the TTL runs out,
  one that stops cleanly removes itself (`withdraw`). `workers_seen` lists them.
"""
from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import redis as redis_lib
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from common.broker import QUEUES
from common.models import (
    Batch,
    BatchStatus,
    Job,
    JobStatus,
    Tenant,
    WebhookDisabledEndpoint,
    WebhookEvent,
    WebhookEventStatus,
)

log = logging.getLogger(__name__)
WORKER_KEY_PREFIX = "letterpress:workers:"


@dataclass
class QueueCounts:
    waiting: int = 0  # queued in Postgres (batch items the feeder has not sent included)
    oldest_waiting_s: float = 0.0
    running: int = 0


@dataclass
class ActiveBatch:
    id: uuid.UUID
    tenant: str
    total: int
    remaining: int  # queued or running
    in_progress_at: datetime | None
    now: datetime

    @property
    def finished(self) -> int:
        return self.total - self.remaining

    @property
    def images_per_min(self) -> float | None:
        return progress_rate(self.finished, self.in_progress_at, self.now)[0]

    @property
    def eta_s(self) -> float | None:
        return progress_rate(self.finished, self.in_progress_at, self.now, remaining=self.remaining)[1]


def progress_rate(finished: int, started_at: datetime | None, now: datetime,
                  remaining: int = 0) -> tuple[float | None, float | None]:
    """(items finished a minute since `started_at`, seconds to finish `remaining` more at that rate); None where
    nothing has finished yet."""
    elapsed = (now - started_at).total_seconds() if started_at else 0.0
    if finished <= 0 or elapsed <= 0:
        return None, None
    per_min = finished / elapsed * 60
    return per_min, remaining / per_min * 60


@dataclass
class QueueSnapshot:
    queues: dict[str, QueueCounts] = field(default_factory=dict)
    batches: list[ActiveBatch] = field(default_factory=list)  # in progress, oldest first
    webhook_events_pending: int = 0
    webhook_endpoints_disabled: int = 0


def queue_snapshot(session: Session) -> QueueSnapshot:
    """The queue now: per queue, jobs waiting, the oldest one's age and jobs running; the batches in progress."""
    now = session.scalar(select(func.now()))
    rows = session.execute(
        select(Job.status, Job.queue, func.count(), func.extract("epoch", now - func.min(Job.created_at)))
        .where(Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]))
        .group_by(Job.status, Job.queue)).all()
    remaining = (select(Job.batch_id, func.count().label("remaining"))
                 .where(Job.batch_id.is_not(None), Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]))
                 .group_by(Job.batch_id).subquery())
    batches = session.execute(
        select(Batch.id, Tenant.name, Batch.total, func.coalesce(remaining.c.remaining, 0), Batch.in_progress_at)
        .join(Tenant, Tenant.id == Batch.tenant_id)
        .outerjoin(remaining, remaining.c.batch_id == Batch.id)
        .where(Batch.status == BatchStatus.IN_PROGRESS)
        .order_by(Batch.created_at)).all()
    snapshot = QueueSnapshot(
        batches=[ActiveBatch(id=b, tenant=t, total=total, remaining=left, in_progress_at=started, now=now)
                 for b, t, total, left, started in batches],
        webhook_events_pending=session.scalar(select(func.count()).select_from(WebhookEvent)
                                              .where(WebhookEvent.status == WebhookEventStatus.PENDING)),
        webhook_endpoints_disabled=session.scalar(select(func.count()).select_from(WebhookDisabledEndpoint)))
    seen = {(status, queue): (count, age) for status, queue, count, age in rows}
    for queue in QUEUES:
        count, age = seen.get((JobStatus.QUEUED, queue), (0, 0))
        snapshot.queues[queue] = QueueCounts(waiting=count, oldest_waiting_s=float(age or 0),
                                             running=seen.get((JobStatus.RUNNING, queue), (0, 0))[0])
    return snapshot


# ------------------------------------------------------------------------------------------ worker registry

def announce(client: redis_lib.Redis, worker_id: str, info: dict[str, Any], ttl_s: float) -> None:
    """This worker is alive and doing `info` (plain JSON values); forgotten `ttl_s` after the last call."""
    key = WORKER_KEY_PREFIX + worker_id
    client.set(key, json.dumps({**info, "worker_id": worker_id}), px=max(int(ttl_s * 1000), 1000))


def withdraw(client: redis_lib.Redis, worker_id: str) -> None:
    client.delete(WORKER_KEY_PREFIX + worker_id)


def workers_seen(client: redis_lib.Redis) -> list[dict[str, Any]]:
    """Every worker whose announcement has not expired, by worker id."""
    keys = sorted(client.scan_iter(match=WORKER_KEY_PREFIX + "*", count=1000))
    found = []
    for raw in client.mget(keys) if keys else []:
        if raw is None:  # expired between the scan and the read
            continue
        try:
            found.append(json.loads(raw))
        except ValueError:
            log.warning("worker registry: an unreadable entry was skipped")
    return sorted(found, key=lambda w: w.get("worker_id", ""))
