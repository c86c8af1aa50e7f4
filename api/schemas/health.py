"""Health response shapes: liveness (`/healthz`) and readiness (`/readyz`, 200 or 503 with the same body)."""
from __future__ import annotations

from pydantic import BaseModel, Field


class HealthOut(BaseModel):
    status: str = Field(description="`ok`")


class ReadyOut(BaseModel):
    status: str = Field(description="`ok`, or `unavailable` when a dependency does not answer")
    checks: dict[str, str] = Field(description="per dependency (postgres, redis): `ok` or `error: <kind>`")
