"""Usage and cost: the ledger of device time each job used, and the reports priced from it.

The worker writes one `UsageRecord` for each attempt that ran a job's generation (`record_attempt`), in the same
transaction as the attempt's outcome, so the ledger and the job's status never disagree. Everything else reads it:
- `usage_report`: `GET /v1/usage` for one tenant, grouped by day, batch or preset.
- `batch_usage`: the `usage` of the batch object (API responses and batch.* webhook payloads).
- `recent_worker_throughput`: images a minute per worker for `letterpress status`.

Prices come from `PricingSettings` (common.settings) at read time; every figure is a sum of recorded seconds, so a
batch's `gpu_seconds` is exactly the sum of its items' records, and its cost exactly that times the price.
"""
from __future__ import annotations

import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import Date, cast, func, insert, literal, select
from sqlalchemy.orm import Session

from common.models import Job, UsageRecord
from common.settings import PricingSettings

GroupBy = Literal["day", "batch", "preset"]
GROUP_BY: tuple[GroupBy, ...] = ("day", "batch", "preset")
COST_DIGITS = 6  # currency units; a tiny-model job costs fractions of a cent


@dataclass(frozen=True)
class DeviceTime:
    """What an attempt used: seconds on a device of this kind, bought this way."""

    gpu_kind: str
    capacity: str
    seconds: float


def record_attempt(session: Session, *, job_id: uuid.UUID, attempt: int, outcome: str, worker_id: str,
                   used: DeviceTime, images: int = 0, cached: bool = False) -> None:
    """One ledger row; tenant, batch and preset are copied from the job in the same statement. `cached`: the
    attempt was answered from the result cache."""
    session.execute(insert(UsageRecord).from_select(
        ["tenant_id", "job_id", "batch_id", "preset", "attempt", "outcome", "worker_id", "gpu_kind", "capacity",
         "gpu_seconds", "images", "cached"],
        select(Job.tenant_id, Job.id, Job.batch_id, Job.params["preset"].astext, literal(attempt), literal(outcome),
               literal(worker_id), literal(used.gpu_kind), literal(used.capacity), literal(float(used.seconds)),
               literal(images), literal(cached)).where(Job.id == job_id)))


def price_per_hour(pricing: PricingSettings, gpu_kind: str, capacity: str) -> float | None:
    """The configured price of one hour of this kind: the longest key contained in the device name, else `*`."""
    table = pricing.spot_per_gpu_hour if capacity == "spot" else pricing.on_demand_per_gpu_hour
    name = gpu_kind.lower()
    matches = [key for key in table if key != "*" and key.lower() in name]
    if matches:
        return table[max(matches, key=len)]
    return table.get("*")


@dataclass
class Usage:
    """Totals over some ledger rows, priced."""

    gpu_seconds: float = 0.0
    images: int = 0
    attempts: int = 0
    estimated_cost: float = 0.0
    unpriced_gpu_seconds: float = 0.0  # seconds of a kind no price matches: never counted as free
    by_kind: dict[str, float] = field(default_factory=dict)  # gpu seconds per "kind (capacity)"
    currency: str = "USD"
    cache_hits: int = 0  # jobs answered from the result cache (their attempts ran no generation)

    def add(self, *, gpu_kind: str, capacity: str, seconds: float, images: int, attempts: int, cache_hits: int,
            pricing: PricingSettings) -> None:
        self.gpu_seconds += seconds
        self.images += images
        self.attempts += attempts - cache_hits
        self.cache_hits += cache_hits
        label = f"{gpu_kind} ({capacity})"
        self.by_kind[label] = self.by_kind.get(label, 0.0) + seconds
        price = price_per_hour(pricing, gpu_kind, capacity)
        if price is None:
            self.unpriced_gpu_seconds += seconds
        else:
            self.estimated_cost += seconds / 3600.0 * price

    def merge(self, other: "Usage") -> None:
        self.gpu_seconds += other.gpu_seconds
        self.images += other.images
        self.attempts += other.attempts
        self.cache_hits += other.cache_hits
        self.estimated_cost += other.estimated_cost
        self.unpriced_gpu_seconds += other.unpriced_gpu_seconds
        for label, seconds in other.by_kind.items():
            self.by_kind[label] = self.by_kind.get(label, 0.0) + seconds

    def as_dict(self) -> dict[str, Any]:
        return {"gpu_seconds": round(self.gpu_seconds, 3), "images": self.images, "attempts": self.attempts,
                "estimated_cost": round(self.estimated_cost, COST_DIGITS), "currency": self.currency,
                "unpriced_gpu_seconds": round(self.unpriced_gpu_seconds, 3),
                "gpu_seconds_by_kind": {k: round(v, 3) for k, v in sorted(self.by_kind.items())},
                "cache_hits": self.cache_hits}


def _priced(rows, pricing: PricingSettings) -> dict[Any, Usage]:
    """Fold (key, gpu_kind, capacity, seconds, images, rows, cached rows) into one priced `Usage` per key."""
    out: dict[Any, Usage] = defaultdict(lambda: Usage(currency=pricing.currency))
    for key, gpu_kind, capacity, seconds, images, attempts, cache_hits in rows:
        out[key].add(gpu_kind=gpu_kind, capacity=capacity, seconds=seconds, images=images, attempts=attempts,
                     cache_hits=cache_hits, pricing=pricing)
    return out


def _sums():
    R = UsageRecord
    return (R.gpu_kind, R.capacity, func.sum(R.gpu_seconds), func.sum(R.images), func.count(),
            func.count().filter(R.cached))


def batch_usage(session: Session, batch_ids: list[uuid.UUID], pricing: PricingSettings) -> dict[uuid.UUID, Usage]:
    """Each batch's usage so far: one GROUP BY over the batch index."""
    if not batch_ids:
        return {}
    R = UsageRecord
    rows = session.execute(select(R.batch_id, *_sums()).where(R.batch_id.in_(batch_ids))
                           .group_by(R.batch_id, R.gpu_kind, R.capacity))
    priced = _priced(rows, pricing)
    return {bid: priced.get(bid, Usage(currency=pricing.currency)) for bid in batch_ids}


def usage_report(session: Session, *, tenant_id: uuid.UUID, start: datetime, end: datetime, group_by: GroupBy,
                 pricing: PricingSettings) -> dict[str, Any]:
    """`GET /v1/usage`: the tenant's usage recorded in [start, end), one entry per day (UTC), batch or preset,
    and the total."""
    R = UsageRecord
    key = {"day": cast(func.timezone("UTC", R.recorded_at), Date), "batch": R.batch_id, "preset": R.preset}[group_by]
    rows = session.execute(select(key, *_sums())
                           .where(R.tenant_id == tenant_id, R.recorded_at >= start, R.recorded_at < end)
                           .group_by(key, R.gpu_kind, R.capacity))
    groups = _priced(rows, pricing)
    total = Usage(currency=pricing.currency)
    for usage in groups.values():
        total.merge(usage)

    def label(value: Any) -> str | None:
        return None if value is None else str(value)

    data = [{group_by: label(k), **groups[k].as_dict()}
            for k in sorted(groups, key=lambda k: (k is None, str(k)))]
    return {"object": "usage", "group_by": group_by, "from": start, "to": end, "data": data,
            "total": total.as_dict()}


def recent_worker_throughput(session: Session, *, window_s: float) -> dict[str, tuple[int, float]]:
    """Images and device seconds per worker recorded in the last `window_s` seconds (`letterpress status`)."""
    R = UsageRecord
    rows = session.execute(select(R.worker_id, func.sum(R.images), func.sum(R.gpu_seconds))
                           .where(R.recorded_at >= func.now() - timedelta(seconds=window_s)).group_by(R.worker_id))
    return {worker: (int(images), float(seconds)) for worker, images, seconds in rows}
