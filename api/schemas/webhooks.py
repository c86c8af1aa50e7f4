"""Webhook response shapes: the signing secret, events, the delivery log and disabled endpoints."""
from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from api.pagination import ListPage
from common.webhooks import outbox


class SecretOut(BaseModel):
    object: str = "webhook_secret"
    secret: str = Field(description="whsec_... : verify the webhook-signature header with any Standard Webhooks "
                                    "library")
    created_at: datetime
    rotated_at: datetime | None
    previous_secret_expires_at: datetime | None = Field(
        description="during a rotation: until then every call also carries a signature with the previous secret")


class RotateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # strict: a JSON integer (not `false` or "60", which lax mode would read as 0 and 60)
    previous_valid_for_s: int = Field(outbox.DEFAULT_ROTATION_WINDOW_S, ge=0, le=7 * 24 * 3600, strict=True,
                                      description="how long the previous secret keeps signing (0: stop at once)")


class EventOut(BaseModel):
    id: str
    object: str = "webhook_event"
    type: str
    status: str
    url: str
    job_id: str | None
    batch_id: str | None
    attempts: int
    next_attempt_at: datetime | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None
    data: dict[str, Any]


class DeliveryOut(BaseModel):
    id: str
    object: str = "webhook_delivery"
    event_id: str
    event_type: str
    event_status: str
    job_id: str | None
    batch_id: str | None
    attempt: int
    trigger: str
    url: str
    ip: str | None
    status_code: int | None
    outcome: str
    error: str | None
    duration_ms: int
    response_excerpt: str | None
    created_at: datetime


class DisabledEndpointOut(BaseModel):
    object: str = "webhook_disabled_endpoint"
    url: str
    reason: str
    event_id: str | None
    disabled_at: datetime


class EventList(ListPage[EventOut]):
    pass


class DeliveryList(ListPage[DeliveryOut]):
    pass
