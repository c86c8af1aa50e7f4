"""One error root for the domain. The API maps each subclass to a status code and a JSON body
`{"error": {"type": ..., "message": ..., "field": ...}}` in one handler (api/errors.py)."""
from __future__ import annotations


class LetterpressError(Exception):
    status_code = 500
    type = "internal_error"

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict:
        body = {"type": self.type, "message": self.message}
        if self.field:
            body["field"] = self.field
        return body


class InvalidRequest(LetterpressError):
    status_code = 422
    type = "invalid_request"


class AuthenticationError(LetterpressError):
    status_code = 401
    type = "unauthorized"


class Forbidden(LetterpressError):
    """The key is valid but lacks the scope this call needs."""
    status_code = 403
    type = "forbidden"


class NotFound(LetterpressError):
    status_code = 404
    type = "not_found"


class Conflict(LetterpressError):
    status_code = 409
    type = "conflict"


class TooManyRequests(LetterpressError):
    """A bound on concurrent work was reached; retry after `retry_after_s` (the `Retry-After` header)."""
    status_code = 429
    type = "rate_limited"

    def __init__(self, message: str, *, retry_after_s: int = 1, field: str | None = None):
        super().__init__(message, field=field)
        self.retry_after_s = retry_after_s


class ServiceUnavailable(LetterpressError):
    status_code = 503
    type = "service_unavailable"


class ModelError(LetterpressError):
    """The model cannot be loaded or run as configured; the message says what to do."""
    type = "model_error"


class StorageError(LetterpressError):
    type = "storage_error"


class LeaseLost(LetterpressError):
    """An attempt's fencing token no longer matches: another attempt owns the job. The attempt must stop."""
    status_code = 409
    type = "lease_lost"
