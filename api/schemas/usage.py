"""Usage shapes: the `usage` of a batch object and `GET /v1/usage` (built by common/usage.py)."""
from __future__ import annotations

from datetime import date, datetime

from pydantic import BaseModel, ConfigDict, Field


class UsageOut(BaseModel):
    gpu_seconds: float = Field(description="device seconds of generation billed (warm-up is billed to nobody); "
                                           "every attempt that generated counts, retries and preemptions too")
    images: int = Field(description="images stored")
    attempts: int = Field(description="attempts that ran the generation")
    estimated_cost: float = Field(description="gpu_seconds priced per GPU kind and capacity (spot or on demand) "
                                              "at the configured prices (LETTERPRESS_PRICING__*)")
    currency: str
    unpriced_gpu_seconds: float = Field(description="seconds on a GPU kind no configured price matches: not in "
                                                    "estimated_cost")
    gpu_seconds_by_kind: dict[str, float] = Field(description='seconds per "GPU kind (capacity)"')
    cache_hits: int = Field(description="jobs answered from the result cache: copies of an identical earlier run, "
                                        "no device time (not counted in attempts)")


class UsageGroupOut(UsageOut):
    model_config = ConfigDict(extra="allow")  # the group's key: `day`, `batch` or `preset`, as `group_by` says

    day: date | None = None
    batch: str | None = Field(None, description="the batch id; null for jobs outside a batch")
    preset: str | None = None


class UsageReportOut(BaseModel):
    object: str = "usage"
    group_by: str
    from_: datetime = Field(alias="from")
    to: datetime
    data: list[UsageGroupOut]
    total: UsageOut

    model_config = ConfigDict(populate_by_name=True)
