"""Admin API shapes (`/v1/admin`, keys with the `admin` scope): tenants and API keys of the installation."""
from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, field_validator

from common.auth import DEFAULT_SCOPES, SCOPES
from common.input_limits import PlainText
from common.settings import LimitsSettings

Scope = str


class TenantCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: PlainText = Field(min_length=1, max_length=200, pattern=r"^\S(.*\S)?$")


class TenantLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_active_jobs: int | None = Field(None, ge=0, le=10_000_000, strict=True,
                                        description="jobs queued or running at once (batch items once fed); 0: no "
                                                    "limit; null: the server's default")
    requests_per_key: str | None = Field(None, max_length=64,
                                         description="requests a key of this tenant may make, like 100/second; "
                                                     "\"\": no limit; null: the server's default")
    max_images_per_day: int | None = Field(None, ge=0, le=10**9, strict=True,
                                           description="images made in the last 24 hours plus queued; 0: no limit; "
                                                       "null: the server's default")


    @field_validator("requests_per_key")
    @classmethod
    def _a_rate(cls, value: str | None) -> str | None:
        return None if value is None else LimitsSettings.model_validate({"requests_per_key": value}).requests_per_key


class TenantUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    limits: TenantLimits


class TenantOut(BaseModel):
    object: str = "tenant"
    id: uuid.UUID
    name: str
    created_at: datetime
    limits: dict = Field(description="the tenant's own limits; absent ones are the server's defaults")


class TenantList(BaseModel):
    object: str = "list"
    data: list[TenantOut]


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tenant: PlainText = Field(min_length=1, max_length=200, description="the tenant's name (created if new)")
    name: PlainText = Field(min_length=1, max_length=200, description="what the key is for")
    scopes: list[Scope] = Field(default=list(DEFAULT_SCOPES), min_length=1, max_length=len(SCOPES),
                                description=f"a subset of {', '.join(SCOPES)}")
    expires_in_s: int | None = Field(None, ge=1, le=10 * 365 * 86400, strict=True,
                                     description="seconds until the key stops working; none: never")


class KeyOut(BaseModel):
    object: str = "api_key"
    id: uuid.UUID
    tenant: str
    name: str
    prefix: str = Field(description="the first characters of the key, to recognize it; never the key")
    scopes: list[str]
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None
    usable: bool


class KeyCreated(KeyOut):
    key: str = Field(description="the key itself: shown this once, stored only as a hash")


class KeyList(BaseModel):
    object: str = "list"
    data: list[KeyOut]
