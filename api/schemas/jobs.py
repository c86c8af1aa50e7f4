"""Job response shapes, and the API's one submit-time check that needs settings: `check_webhook_url`.

Requests are validated by common.job_request.JobRequest (shared with batches and the CLI); the webhook URL check
is here, not there, because only the API's submit paths (POST /v1/jobs, POST /v1/batches) make it.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from api.pagination import ListPage
from common.errors import InvalidRequest
from common.settings import WebhookSettings
from common.webhooks.ssrf import UnsafeURLError, check_url

# Examples of a POST /v1/jobs body (the request model, common.job_request.JobRequest, is shared with batch lines).
JOB_EXAMPLES: dict[str, dict[str, Any]] = {
    "prompt": {"summary": "a text prompt", "value": {
        "prompt": "a poster that says HELLO", "width": 256, "height": 256, "preset": "V4_TURBO_12", "seed": 3,
        "metadata": {"order": "A-17"}}},
    "caption": {"summary": "a structured caption", "value": {
        "caption": {"high_level_description": "a poster",
                    "compositional_deconstruction": {"background": "plain",
                                                     "elements": [{"type": "text", "text": "HI"}]}},
        "resolution": "256x256", "rendering_speed": "TURBO"}},
}


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
    queue: str = Field(description="the broker list it waits in: interactive-high, interactive, interactive-low "
                                   "(POST /v1/jobs by priority) or batch")
    priority: str | None = Field(description="its lane, for a job sent with POST /v1/jobs; a batch item's lane is "
                                             "its batch's `priority`")
    request: dict[str, Any]
    metadata: dict[str, Any] | None
    progress: Progress
    queue_position: int | None = Field(description=(
        "Queued jobs only: how many jobs will start before this one (0 = next), lanes and fair share included: a "
        "job waits for the jobs of higher lanes; a batch item is counted behind waiting interactive jobs and its "
        "tenant's own earlier items, and behind other tenants only as far as the weighted fair share takes them "
        "first. An estimate; null unless queued."))
    eta_s: float | None = Field(description=(
        "Queued jobs only: estimated seconds until the job starts, (queue_position + 1) / the fleet's recent "
        "throughput (jobs started per second over the last few minutes). Null unless queued, or when no job started "
        "recently."))
    attempts: int
    max_attempts: int
    preemptions: int
    error: dict[str, Any] | None
    images: list[ImageOut]
    timings: dict[str, Any] | None
    cache_hit: bool = Field(description="answered from the result cache: copies of an identical earlier run of "
                                        "yours (timings.cache_source_job), no device time")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    urls: dict[str, str]


class JobList(ListPage[JobOut]):
    pass


def check_webhook_url(url: str | None, webhooks: WebhookSettings) -> None:
    """Refuse a caller's webhook_url that is malformed or could reach a private address (the SSRF guard's
    DNS-free check; delivery checks again). Raises InvalidRequest: a 422 naming `webhook_url`."""
    if url is None:
        return
    try:
        check_url(url, allow_loopback=webhooks.allow_loopback)
    except UnsafeURLError as exc:
        raise InvalidRequest(f"webhook_url refused: {exc}", field="webhook_url") from None
