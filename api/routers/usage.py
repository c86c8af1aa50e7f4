"""/v1/usage: the caller's device time and estimated cost over a time range, grouped by day, batch or preset.
The ledger and the pricing live in common/usage.py; a tenant sees only its own usage records."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import CurrentTenant, SessionDep, SettingsDep
from api.schemas.errors import error_responses
from api.schemas.usage import UsageReportOut
from common.errors import InvalidRequest
from common.usage import GroupBy, usage_report

router = APIRouter(prefix="/v1/usage", tags=["usage"])
DEFAULT_RANGE = timedelta(days=30)


def _instant(value: str | None, field: str) -> datetime | None:
    """An ISO 8601 time (a time without a zone is UTC). Numbers are refused, not read as Unix times."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(f"`{field}` is not an ISO 8601 time (e.g. 2026-12-01T00:00:00Z)", field=field) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


_TIME = {"format": "date-time"}


@router.get("", response_model=UsageReportOut, response_model_by_alias=True, responses=error_responses(422))
def get_usage(
    session: SessionDep, tenant: CurrentTenant, settings: SettingsDep,
    start: Annotated[str | None, Query(alias="from", json_schema_extra=_TIME,
                                       description="inclusive; default: 30 days before `to`; ISO 8601, "
                                                   "a time without a zone is UTC")] = None,
    end: Annotated[str | None, Query(alias="to", json_schema_extra=_TIME,
                                     description="exclusive; default: now")] = None,
    group_by: Annotated[GroupBy, Query(description="day (UTC) | batch | preset")] = "day",
) -> dict:
    until = _instant(end, "to") or datetime.now(timezone.utc)
    since = _instant(start, "from") or until - DEFAULT_RANGE
    if since >= until:
        raise InvalidRequest("`from` must be before `to`", field="from")
    return usage_report(session, tenant_id=tenant.id, start=since, end=until, group_by=group_by,
                        pricing=settings.pricing)
