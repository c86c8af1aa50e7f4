"""The error body every failure answers with (`{"error": {"type", "message", "field"?, ...}}`, built by
api/errors.py) and `error_responses`, the `responses=` of a route: which statuses it answers, each with that body.

Every route lists its own statuses so the OpenAPI document tells the truth (Schemathesis holds it to that:
tests/api/test_fuzz.py)."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str = Field(description="machine-readable kind, e.g. unauthorized, not_found, conflict, "
                                  "validation_error, invalid_request, service_unavailable, http_error")
    message: str = Field(description="what went wrong and, where it helps, what to do")
    field: str | None = Field(None, description="the request field (body path, header, query or path parameter) "
                                                "the error is about, when there is one")
    errors: list[dict[str, Any]] | None = Field(
        None, description="every problem found: `{field, message}` for a validation error, line-numbered "
                          "`{line, field?, message, custom_id?}` entries for an invalid batch")
    invalid_count: int | None = Field(None, description="an invalid batch: how many lines are invalid")


class ErrorOut(BaseModel):
    """The body of every 4xx and 5xx answer."""
    error: ErrorDetail


_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}
_DESCRIPTIONS: dict[int, str] = {
    400: "The body cannot be parsed (a malformed multipart form, say)",
    401: "Missing or invalid API key (send `Authorization: Bearer <key>`)",
    403: "The API key is valid but lacks the scope this call needs (read for GET, submit for the rest, admin for "
         "/v1/admin)",
    404: "No such object for this tenant (another tenant's objects are not found either)",
    409: "Conflict with the object's current state, or an Idempotency-Key reused with other input",
    413: "Request body too large",
    422: "Invalid request: `field` names the offending field",
    429: "Too many requests (the key's request rate, the tenant's limit of active jobs, batch ingests at once, "
         "or wrong API keys from this address); retry after `Retry-After` seconds",
    503: "A dependency (the database) is unavailable; retry after `Retry-After` seconds",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route that can answer these statuses with an ErrorOut body. 401 and 503 (database
    unavailable) are included for every /v1 route: authentication reads the database; so are 403 (a key without
    the call's scope) and 429 (too many wrong keys
from one address, api/wrong_keys.py). Give 422 for every route
    with a parameter (FastAPI would otherwise document its own validation body, which is not ours)."""
    wanted = sorted({401, 403, 429, 503, *statuses})
    responses: dict[int | str, dict[str, Any]] = {}
    for status in wanted:
        response: dict[str, Any] = {"model": ErrorOut, "description": _DESCRIPTIONS.get(status, "Error")}
        if status in (429, 503):
            response["headers"] = _RETRY_AFTER
        responses[status] = response
    return responses
