"""One handler family mapping errors to status codes and `{"error": {"type", "message", "field"?}}` bodies."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import (
    DataError,
    DBAPIError,
    IntegrityError,
    InterfaceError,
    OperationalError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from common.errors import LetterpressError
from common.job_request import RequestError

log = logging.getLogger(__name__)


def _field_of(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or ".".join(str(p) for p in loc)


def error_response(status: int, type_: str, message: str, field: str | None = None, *,
                   headers: dict[str, str] | None = None, **extra) -> JSONResponse:
    body = {"type": type_, "message": message, **extra}
    if field:
        body["field"] = field
    return JSONResponse(status_code=status, content={"error": body}, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(LetterpressError)
    async def _domain(_: Request, exc: LetterpressError):
        retry_after = getattr(exc, "retry_after_s", None)
        return error_response(exc.status_code, exc.type, exc.message, exc.field,
                              headers={"Retry-After": str(retry_after)} if retry_after is not None else None)

    @app.exception_handler(RequestError)
    async def _request(_: Request, exc: RequestError):
        return error_response(422, "invalid_request", str(exc), exc.field)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        errors = [{"field": _field_of(tuple(e["loc"])), "message": e["msg"]} for e in exc.errors()]
        first = errors[0] if errors else {"field": None, "message": "invalid request"}
        return error_response(422, "validation_error", first["message"], first["field"], errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        # keep the exception's headers: a 405 carries `Allow` (the methods the path answers)
        return error_response(exc.status_code, "http_error", str(exc.detail), headers=getattr(exc, "headers", None))

    # Only a database that cannot be reached is an outage (503). A value it refuses or a constraint it enforces
    # is the request's doing (validation should have caught it first; this is the net under it); anything else
    # is our bug (500), logged in full, never shown.
    @app.exception_handler(PoolTimeout)
    async def _overloaded(_: Request, exc: PoolTimeout):
        log.warning("no database connection free within the pool timeout: answering 503 (overload)")
        return error_response(503, "overloaded", "the server is busy; retry shortly", headers={"Retry-After": "1"})

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    async def _database_down(_: Request, exc: Exception):
        log.error("database unavailable: %s", exc)
        return error_response(503, "service_unavailable", "the database is unavailable; retry shortly",
                              headers={"Retry-After": "5"})

    @app.exception_handler(DataError)
    async def _refused_value(_: Request, exc: DataError):
        log.warning("the database refused a value of a request: %s", exc.orig)
        return error_response(422, "invalid_request", "a value in the request cannot be stored")

    @app.exception_handler(IntegrityError)
    async def _constraint(_: Request, exc: IntegrityError):
        log.warning("a request broke a database constraint: %s", exc.orig)
        return error_response(409, "conflict", "the request conflicts with the current state; read it and retry")

    @app.exception_handler(DBAPIError)
    async def _database_error(_: Request, exc: DBAPIError):
        if exc.connection_invalidated:
            return await _database_down(_, exc)
        log.exception("database error", exc_info=exc)
        return error_response(500, "internal_error", "internal error")
