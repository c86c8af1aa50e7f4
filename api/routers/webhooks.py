"""/v1/webhooks: the tenant's signing secret (show, rotate), the delivery log, events, redelivery and disabled
endpoints. The API never calls a receiver itself: a redelivery is recorded and sent to the delivery worker."""
from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Response
from sqlalchemy import select

from api.deps import CurrentTenant, SessionDep
from api.pagination import newest_first
from api.schemas.errors import error_responses
from api.schemas.webhooks import (
    DeliveryList,
    DeliveryOut,
    DisabledEndpointOut,
    EventList,
    EventOut,
    RotateIn,
    SecretOut,
)
from common.errors import InvalidRequest, NotFound
from common.models import (
    WebhookDelivery,
    WebhookDisabledEndpoint,
    WebhookEvent,
    WebhookEventStatus,
)
from common.webhooks import outbox

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])


def event_out(e: WebhookEvent) -> EventOut:
    return EventOut(id=e.id, type=e.type, status=e.status, url=e.url, job_id=str(e.job_id) if e.job_id else None,
                    batch_id=str(e.batch_id) if e.batch_id else None, attempts=e.attempts,
                    next_attempt_at=e.next_attempt_at, last_error=e.last_error, created_at=e.created_at,
                    delivered_at=e.delivered_at, data=e.payload)


def delivery_out(d: WebhookDelivery) -> DeliveryOut:
    e = d.event
    return DeliveryOut(id=str(d.id), event_id=d.event_id, event_type=e.type, event_status=e.status,
                       job_id=str(e.job_id) if e.job_id else None, batch_id=str(e.batch_id) if e.batch_id else None,
                       attempt=d.attempt, trigger=d.trigger, url=d.url, ip=d.ip, status_code=d.status_code,
                       outcome=d.outcome, error=d.error, duration_ms=d.duration_ms,
                       response_excerpt=d.response_excerpt, created_at=d.created_at)


def _uuid(value: str | None, field: str) -> uuid.UUID | None:
    if value is None:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidRequest(f"{field} is not a valid id", field=field) from None


def _event(session, tenant_id: uuid.UUID, event_id: str) -> WebhookEvent:
    event = None if "\x00" in event_id else session.get(WebhookEvent, event_id)  # NUL: no id Postgres can hold
    if event is None or event.tenant_id != tenant_id:
        raise NotFound(f"webhook event {event_id} not found")
    return event


# ---------------------------------------------------------------------------------------------------- secret

@router.get("/secret", response_model=SecretOut, responses=error_responses())
def get_secret(session: SessionDep, tenant: CurrentTenant) -> SecretOut:
    """The tenant's signing secret, created on first use."""
    row = outbox.get_secret(session, tenant_id=tenant.id)
    session.commit()
    return SecretOut(**outbox.secret_info(row))


@router.post("/secret/rotate", response_model=SecretOut, responses=error_responses(413, 422))
def rotate_secret(session: SessionDep, tenant: CurrentTenant, body: RotateIn | None = None) -> SecretOut:
    """A new secret at once; the previous one keeps signing beside it for `previous_valid_for_s` (default 24 h)
    so receivers can switch without dropping a call."""
    body = body or RotateIn()
    row = outbox.rotate_secret(session, tenant_id=tenant.id, previous_valid_for_s=body.previous_valid_for_s)
    session.commit()
    return SecretOut(**outbox.secret_info(row))


# ---------------------------------------------------------------------------------------- deliveries, events

def _of_job_or_batch(query, job_id: str | None, batch_id: str | None):
    """`query` (over webhook events, or joined to them) narrowed to one job's or one batch's events."""
    if job_id is not None:
        query = query.where(WebhookEvent.job_id == _uuid(job_id, "job_id"))
    if batch_id is not None:
        query = query.where(WebhookEvent.batch_id == _uuid(batch_id, "batch_id"))
    return query


@router.get("/deliveries", response_model=DeliveryList, responses=error_responses(422))
def list_deliveries(session: SessionDep, tenant: CurrentTenant, job_id: str | None = None,
                    batch_id: str | None = None, event_id: str | None = None,
                    limit: Annotated[int, Query(ge=1, le=200)] = 50, cursor: str | None = None) -> DeliveryList:
    """Every attempt, newest first; filter by job, batch or event."""
    query = select(WebhookDelivery).where(WebhookDelivery.tenant_id == tenant.id)
    if job_id is not None or batch_id is not None:
        query = _of_job_or_batch(query.join(WebhookEvent, WebhookEvent.id == WebhookDelivery.event_id),
                                 job_id, batch_id)
    if event_id is not None:
        query = query.where(WebhookDelivery.event_id == event_id)
    page = newest_first(session, query, WebhookDelivery, cursor=cursor, limit=limit)
    return DeliveryList.of(page, [delivery_out(d) for d in page.rows])


@router.post("/deliveries/{delivery_id}/redeliver", status_code=202, response_model=EventOut,
             responses=error_responses(404, 413, 422))
def redeliver_delivery(delivery_id: str, session: SessionDep, tenant: CurrentTenant) -> EventOut:
    """Send the delivery's event again, with the same webhook-id (one attempt; see the deliveries log)."""
    try:
        delivery = session.get(WebhookDelivery, uuid.UUID(delivery_id))
    except ValueError:
        delivery = None
    if delivery is None or delivery.tenant_id != tenant.id:
        raise NotFound(f"webhook delivery {delivery_id} not found")
    event = outbox.request_redelivery(session, event=delivery.event)
    session.commit()
    return event_out(event)


@router.get("/events", response_model=EventList, responses=error_responses(422))
def list_events(session: SessionDep, tenant: CurrentTenant, job_id: str | None = None, batch_id: str | None = None,
                status: Annotated[str | None, Query(pattern="^(" + "|".join(WebhookEventStatus.ALL) + ")$")] = None,
                limit: Annotated[int, Query(ge=1, le=200)] = 50, cursor: str | None = None) -> EventList:
    query = _of_job_or_batch(select(WebhookEvent).where(WebhookEvent.tenant_id == tenant.id), job_id, batch_id)
    if status is not None:
        query = query.where(WebhookEvent.status == status)
    page = newest_first(session, query, WebhookEvent, cursor=cursor, limit=limit, id_type=str)
    return EventList.of(page, [event_out(e) for e in page.rows])


@router.get("/events/{event_id}", response_model=EventOut, responses=error_responses(404, 422))
def get_event(event_id: str, session: SessionDep, tenant: CurrentTenant) -> EventOut:
    return event_out(_event(session, tenant.id, event_id))


@router.post("/events/{event_id}/redeliver", status_code=202, response_model=EventOut,
             responses=error_responses(404, 413, 422))
def redeliver_event(event_id: str, session: SessionDep, tenant: CurrentTenant) -> EventOut:
    """Send the event again with the same webhook-id (also for an event never sent: its endpoint was disabled)."""
    event = outbox.request_redelivery(session, event=_event(session, tenant.id, event_id))
    session.commit()
    return event_out(event)


# --------------------------------------------------------------------------------------- disabled endpoints

@router.get("/disabled-endpoints", response_model=list[DisabledEndpointOut],
            responses=error_responses())
def list_disabled_endpoints(session: SessionDep, tenant: CurrentTenant) -> list[DisabledEndpointOut]:
    """Endpoints that answered 410 Gone: nothing is sent to them until re-enabled (or a redelivery)."""
    rows = session.scalars(select(WebhookDisabledEndpoint).where(WebhookDisabledEndpoint.tenant_id == tenant.id)
                           .order_by(WebhookDisabledEndpoint.disabled_at.desc()))
    return [DisabledEndpointOut(url=r.url, reason=r.reason, event_id=r.event_id, disabled_at=r.disabled_at)
            for r in rows]


@router.delete("/disabled-endpoints", status_code=204, responses=error_responses(404, 422))
def enable_endpoint(session: SessionDep, tenant: CurrentTenant, url: Annotated[str, Query(max_length=2048)]):
    """Re-enable an endpoint (new events are sent to it again)."""
    if not outbox.enable_endpoint(session, tenant_id=tenant.id, url=url):
        raise NotFound("that endpoint is not disabled", field="url")
    session.commit()
    return Response(status_code=204)
