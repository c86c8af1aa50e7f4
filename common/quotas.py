"""Quotas per tenant: how many jobs a tenant may have active at once (queued or running interactive jobs, plus
batch items the feeder has sent and that have not finished), and how many images it may make in 24 hours (stored
in the last 24 hours by its usage ledger, plus those its active jobs will make).

- The limits are `LETTERPRESS_LIMITS__MAX_ACTIVE_JOBS` and `__MAX_IMAGES_PER_DAY` (0: none), or the tenant's own
  (`tenants.limits`) when an admin set them (`PATCH /v1/admin/tenants/{id}`; null there: the default again).
- `POST /v1/jobs` past a limit is a 429 with `Retry-After`, before anything is stored (the one-statement insert
  checks them in its own statement, the ORM path with `check_limits`). Concurrent submits of one tenant can pass
  the check together: the limit can be exceeded by the requests in flight at that moment, never more.
- Batch items count as they are fed, not at upload: the feeder gives no turn to a tenant at its limit
  (`tenants_at_limit`), so a million-line upload is accepted and runs at most `max_active_jobs` at a time.
- A check counts the tenant's active jobs over the partial index `ix_jobs_tenant_active` (migration 0010): about
  `limit` index entries at most, since a limited tenant cannot get far past its limit; none without a limit.
"""
from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Integer, and_, case, cast, func, literal_column, or_, select, text, true
from sqlalchemy.orm import Session

from common.errors import TooManyRequests
from common.models import Job, JobStatus, Tenant, UsageRecord
from common.settings import get_settings

RETRY_AFTER_S = 5
DAY_RETRY_AFTER_S = 600  # images a day: room comes back as the day's first images age out


# The predicate of ix_jobs_tenant_active, spelled as the index spells it (the planner proves the partial index from
# it) and without bound parameters: api/job_store.py compiles these expressions into SQL text run with its own.
ACTIVE = text(f"jobs.status IN ('{JobStatus.QUEUED}', '{JobStatus.RUNNING}') "
              "AND (jobs.batch_id IS NULL OR jobs.enqueued_at IS NOT NULL)")


def active_jobs(tenant_id) -> ColumnElement[bool]:
    """A tenant's active jobs (queued or running; batch items once fed)."""
    return and_(Job.tenant_id == tenant_id, ACTIVE)


def own_limit(limits_column, name: str, default) -> ColumnElement[int]:
    """The tenant's limit `name`: its own when set, else the default (0: none)."""
    own = cast(limits_column.op("->>")(literal_column(f"'{name}'")), Integer)
    return func.coalesce(own, default)


def max_active_jobs(limits_column, default) -> ColumnElement[int]:
    return own_limit(limits_column, "max_active_jobs", default)


def max_images_per_day(limits_column, default) -> ColumnElement[int]:
    return own_limit(limits_column, "max_images_per_day", default)


def active_count(tenant_id) -> ColumnElement[int]:
    """The tenant's active jobs, counted off ix_jobs_tenant_active (at most about its limit of entries: a limited
    tenant cannot have many more active jobs than that)."""
    return select(func.count()).select_from(Job).where(active_jobs(tenant_id)).scalar_subquery()


def images_committed(tenant_id) -> ColumnElement[int]:
    """Images stored for the tenant in the last 24 hours (its usage ledger) plus those its active jobs will make."""
    zero = literal_column("0")
    stored = (select(func.coalesce(func.sum(UsageRecord.images), zero))
              .where(UsageRecord.tenant_id == tenant_id,
                     UsageRecord.recorded_at > func.now() - literal_column("interval '1 day'")).scalar_subquery())
    pending = (select(func.coalesce(func.sum(cast(Job.params.op("->>")(literal_column("'num_images'")), Integer)),
                                    zero))
               .where(active_jobs(tenant_id)).scalar_subquery())
    return stored + pending


def within_limits(tenant_id, limits_column, defaults: Defaults, adding_images) -> ColumnElement[bool]:
    """True when the tenant may start one more job of `adding_images` images. CASEs, so a tenant without limits
    costs no count."""
    active_limit = max_active_jobs(limits_column, defaults.max_active_jobs)
    images_limit = max_images_per_day(limits_column, defaults.max_images_per_day)
    zero = literal_column("0")
    return and_(case((active_limit <= zero, true()), else_=active_count(tenant_id) < active_limit),
                case((images_limit <= zero, true()),
                     else_=images_committed(tenant_id) + adding_images <= images_limit))


@dataclass(frozen=True)
class Defaults:
    """The default limits, as SQL values (literal numbers, or bound parameters of a statement compiled once)."""
    max_active_jobs: Any
    max_images_per_day: Any

    @classmethod
    def from_settings(cls) -> Defaults:
        limits = get_settings().limits
        return cls(limits.max_active_jobs, limits.max_images_per_day)


def refusal(*, max_active: int, active: int, max_images: int, images: int, adding: int) -> TooManyRequests:
    """The 429 of a submit the limits refused (which limit it hit)."""
    if max_images and images + adding > max_images:
        return TooManyRequests(f"this tenant has made or queued {images} of its {max_images} images in 24 hours; "
                               f"{adding} more do not fit: retry later", retry_after_s=DAY_RETRY_AFTER_S,
                               field="quota")
    return TooManyRequests(f"this tenant has {active} jobs queued or running, its limit is {max_active}: wait for "
                           "some to finish", retry_after_s=RETRY_AFTER_S, field="quota")


def usage_row(tenant_id, limits_column, defaults: Defaults):
    """(max_active, active, max_images, images) of a tenant, for `refusal`."""
    return (max_active_jobs(limits_column, defaults.max_active_jobs).label("max_active"),
            active_count(tenant_id).label("active"),
            max_images_per_day(limits_column, defaults.max_images_per_day).label("max_images"),
            images_committed(tenant_id).label("images"))


def check_limits(session: Session, tenant: Tenant, adding_images: int) -> None:
    """429 when the tenant may not start a job of `adding_images` images now."""
    defaults = Defaults.from_settings()
    allowed = session.scalar(select(within_limits(Tenant.id, Tenant.limits, defaults, adding_images))
                             .where(Tenant.id == tenant.id))
    if not allowed:
        row = session.execute(select(*usage_row(Tenant.id, Tenant.limits, defaults)).where(Tenant.id == tenant.id)).one()
        raise refusal(max_active=row.max_active, active=row.active, max_images=row.max_images, images=row.images,
                      adding=adding_images)


def room_left(session: Session, tenant_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, int]:
    """How many more jobs each of these tenants may start now, for those with a limit (the feeder gives no more
    turns than that; a tenant without limits is absent). Against the images-a-day limit an item counts as one
    image here (its own `num_images` is counted once it is active)."""
    ids = list(tenant_ids)
    if not ids:
        return {}
    defaults = Defaults.from_settings()
    active_limit = max_active_jobs(Tenant.limits, defaults.max_active_jobs)
    images_limit = max_images_per_day(Tenant.limits, defaults.max_images_per_day)
    rows = session.execute(select(
        Tenant.id, case((active_limit > 0, active_limit - active_count(Tenant.id)), else_=None),
        case((images_limit > 0, images_limit - images_committed(Tenant.id)), else_=None))
        .where(Tenant.id.in_(ids), or_(active_limit > 0, images_limit > 0))).all()
    return {tenant_id: max(0, min(int(x) for x in (jobs, images) if x is not None))
            for tenant_id, jobs, images in rows}
