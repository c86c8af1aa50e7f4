"""Batch request and response shapes: POST /v1/batches (JSON, or the multipart form fields beside `file`) and
the batch object (an OpenAI-Batch-like `object: "batch"`)."""
from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from api.pagination import ListPage
from api.schemas.usage import UsageOut
from common.fair_share import PRIORITIES, Priority
from common.input_limits import PlainText, StorableJson

PRIORITY_DOC = ("the batch's lane: high, normal or low. The feeder shares GPUs between tenants and between a "
                "tenant's batches by weighted fair share (by default 4:2:1), so a high batch overtakes a low one "
                "and neither starves; jobs sent with POST /v1/jobs go before every batch")


class BatchCreate(BaseModel):
    """The JSON body (or the multipart form fields beside `file`). Exactly one input: `items`, `input_url`, or
    the uploaded file."""
    model_config = ConfigDict(extra="forbid")

    items: list[Any] | None = Field(None, description="inline lines: JobRequest fields + custom_id")
    input_url: str | None = Field(None, pattern=r"^s3://[^/]+/.+", description="s3://bucket/key of a JSONL file")
    skip_invalid: bool = False
    metadata: StorableJson | None = None
    webhook_url: PlainText | None = Field(None, max_length=2048)
    priority: Priority = Field("normal", description=PRIORITY_DOC)


class BatchPriority(BaseModel):
    """POST /v1/batches/{id}/priority: move a batch to another lane while it runs."""
    model_config = ConfigDict(extra="forbid")

    priority: Priority = Field(description=PRIORITY_DOC)


# POST /v1/batches reads its body itself (a JSON body, or a multipart upload of a JSONL file: see
# api/routers/batches.py `_read_request`), so FastAPI sees none: this is the requestBody its OpenAPI operation shows.
BATCH_REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "application/json": {
            "schema": BatchCreate.model_json_schema(),
            "examples": {"inline": {"summary": "two inline items", "value": {
                "items": [{"custom_id": "hello", "prompt": "a poster that says HELLO", "width": 256, "height": 256},
                          {"custom_id": "bye", "prompt": "a poster that says BYE", "preset": "V4_TURBO_12"}],
                "metadata": {"campaign": "spring"}}}},
        },
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "title": "BatchUpload",
                "description": "A JSONL file (one JobRequest + custom_id per line) and the batch options.",
                "properties": {
                    "file": {"type": "string", "format": "binary",
                             "description": "the JSONL input: one JSON object per line"},
                    "skip_invalid": {"type": "boolean", "default": False,
                                     "description": "skip invalid lines instead of refusing the batch"},
                    "metadata": {"type": "string", "contentMediaType": "application/json",
                                 "description": "a JSON object, as text"},
                    "webhook_url": {"type": "string", "maxLength": 2048},
                    "priority": {"type": "string", "enum": list(PRIORITIES), "default": "normal",
                                 "description": PRIORITY_DOC},
                },
                "required": ["file"],
            },
            "examples": {"upload": {"summary": "a JSONL file of two lines", "value": {
                "file": '{"custom_id": "a", "prompt": "a poster that says A", "width": 256, "height": 256}\n'
                        '{"custom_id": "b", "prompt": "a poster that says B", "width": 256, "height": 256}\n',
                "skip_invalid": True, "metadata": '{"campaign": "spring"}'}}},
        },
    },
}


class RequestCountsOut(BaseModel):
    total: int
    queued: int
    running: int
    succeeded: int
    failed: int
    canceled: int


class BatchOut(BaseModel):
    id: str
    object: str = "batch"
    status: str
    input_source: str | None
    request_counts: RequestCountsOut
    usage: UsageOut = Field(description="device time and estimated cost so far: the sum of the items' usage records")
    cache_hit_rate: float | None = Field(description="the share of succeeded items answered from the result cache "
                                                     "(usage.cache_hits / succeeded); null before any succeeded")
    invalid: dict[str, Any] | None = Field(None, description="lines skipped with skip_invalid: {count, lines}")
    metadata: dict[str, Any] | None
    webhook_url: str | None
    priority: Priority
    manifest_key: str
    results_url: str
    created_at: datetime
    in_progress_at: datetime | None
    finalizing_at: datetime | None
    completed_at: datetime | None
    failed_at: datetime | None
    cancelling_at: datetime | None
    cancelled_at: datetime | None
    manifest_written_at: datetime | None
    urls: dict[str, str]


class BatchList(ListPage[BatchOut]):
    pass
