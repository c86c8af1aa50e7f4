"""Quotas per tenant: how many jobs a tenant may have active at once (queued or running interactive jobs, plus
batch items the feeder has sent and that have not finished).

- The limit is `LETTERPRESS_LIMITS__MAX_ACTIVE_JOBS` (0: none), or the tenant's own `tenants.limits.max_active_jobs`
  when an admin set one (`PATCH /v1/admin/tenants/{id}`; null there: the default again).
- `POST /v1/jobs` past the limit is a 429 with `Retry-After`, before anything is stored (the one-statement insert
  checks it in its own statement, the ORM path with `check_active_jobs`). Concurrent submits of one tenant can pass
  the check together: the limit can be exceeded by the requests in flight at that moment, never more.
- Batch items count as they are fed, not at upload: the feeder gives no turn to a tenant at its limit
  (`tenants_at_limit`), so a million-line upload is accepted and runs at most `max_active_jobs` at a time.
- A check counts the tenant's active jobs over the partial index `ix_jobs_tenant_active` (migration 0010): about
  `limit` index entries at most, since a limited tenant cannot get far past its limit; none without a limit.
"""
from __future__ import annotations

import uuid
from collections.abc import Iterable

from sqlalchemy import ColumnElement, Integer, and_, case, cast, func, literal_column, select, text, true
from sqlalchemy.orm import Session

from common.errors import TooManyRequests
from common.models import Job, JobStatus, Tenant
from common.settings import get_settings

RETRY_AFTER_S = 5


# The predicate of ix_jobs_tenant_active, spelled as the index spells it (the planner proves the partial index from
# it) and without bound parameters: api/job_store.py compiles these expressions into SQL text run with its own.
ACTIVE = text(f"jobs.status IN ('{JobStatus.QUEUED}', '{JobStatus.RUNNING}') "
              "AND (jobs.batch_id IS NULL OR jobs.enqueued_at IS NOT NULL)")


def active_jobs(tenant_id) -> ColumnElement[bool]:
    """A tenant's active jobs (queued or running; batch items once fed)."""
    return and_(Job.tenant_id == tenant_id, ACTIVE)


def max_active_jobs(limits_column, default) -> ColumnElement[int]:
    """The tenant's limit: its own when set, else the default (0: none)."""
    own = cast(limits_column.op("->>")(literal_column("'max_active_jobs'")), Integer)
    return func.coalesce(own, default)


def active_count(tenant_id) -> ColumnElement[int]:
    """The tenant's active jobs, counted off ix_jobs_tenant_active (at most about its limit of entries: a limited
    tenant cannot have many more active jobs than that)."""
    return select(func.count()).select_from(Job).where(active_jobs(tenant_id)).scalar_subquery()


def within_limit(tenant_id, limits_column, default) -> ColumnElement[bool]:
    """True when the tenant may start one more job. A CASE, so a tenant without a limit costs no count."""
    limit = max_active_jobs(limits_column, default)
    return case((limit <= literal_column("0"), true()), else_=active_count(tenant_id) < limit)


def too_many(limit: int) -> TooManyRequests:
    return TooManyRequests(f"this tenant has {limit} jobs queued or running, its limit: wait for some to finish",
                           retry_after_s=RETRY_AFTER_S, field="quota")


def check_active_jobs(session: Session, tenant: Tenant) -> None:
    """429 when the tenant is at its limit of active jobs."""
    default = get_settings().limits.max_active_jobs
    limit = session.scalar(select(max_active_jobs(Tenant.limits, default)).where(Tenant.id == tenant.id))
    if limit and session.scalar(select(active_count(tenant.id))) >= limit:
        raise too_many(limit)


def room_left(session: Session, tenant_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, int]:
    """How many more jobs each of these tenants may start now, for those with a limit (the feeder gives no more
    turns than that; a tenant without a limit is absent)."""
    ids = list(tenant_ids)
    if not ids:
        return {}
    limit = max_active_jobs(Tenant.limits, get_settings().limits.max_active_jobs)
    rows = session.execute(select(Tenant.id, limit - active_count(Tenant.id))
                           .where(Tenant.id.in_(ids), limit > 0)).all()
    return {tenant_id: max(0, int(left)) for tenant_id, left in rows}
