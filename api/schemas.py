"""Response shapes. Requests are validated by common.job_request.JobRequest (shared with batches and the CLI)."""
from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel


class ImageOut(BaseModel):
    index: int
    seed: int
    url: str
    key: str
    sha256: str
    width: int
    height: int
    size_bytes: int


class Progress(BaseModel):
    step: int
    total: int
    fraction: float


class JobOut(BaseModel):
    id: str
    object: str = "job"
    status: str
    queue: str
    request: dict[str, Any]
    metadata: dict[str, Any] | None
    progress: Progress
    queue_position: int | None
    attempts: int
    max_attempts: int
    preemptions: int
    error: dict[str, Any] | None
    images: list[ImageOut]
    timings: dict[str, Any] | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    urls: dict[str, str]


class JobList(BaseModel):
    object: str = "list"
    data: list[JobOut]
    next_cursor: str | None
    has_more: bool
