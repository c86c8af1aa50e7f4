"""One handler family mapping errors to status codes and `{"error": {"type", "message", "field"?}}` bodies."""
from __future__ import annotations

import logging

import psycopg
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
from psycopg_pool import PoolTimeout as AsyncPoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from common.errors import LetterpressError
from common.job_request import RequestError

log = logging.getLogger(__name__)


def _field_of(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or ".".join(str(p) for p in loc)


def _validation_error(e: dict) -> dict:
    """`{field, message}` of one pydantic/FastAPI error. A body that is not JSON names the body (FastAPI's `loc` is
    `("body", <character position>)`, which would read as a field "0")."""
    if e.get("type") == "json_invalid":
        reason = (e.get("ctx") or {}).get("error") or e["msg"]
        return {"field": "body", "message": f"the body is not valid JSON: {reason} (character {e['loc'][-1]})"}
    return {"field": _field_of(tuple(e["loc"])), "message": e["msg"]}


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _allowed_methods(request: Request) -> str | None:
    """Every method some route takes at this path, for a 405's `Allow`: the router's own names only the first
    route that matched the path (POST of /v1/jobs, not GET)."""
    routes = request.app.router.routes
    allowed = [method for method in _METHODS
               if any(route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes)]
    return ", ".join(allowed) or None


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
        errors = [_validation_error(e) for e in exc.errors()]
        first = errors[0] if errors else {"field": None, "message": "invalid request"}
        return error_response(422, "validation_error", first["message"], first["field"], errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 400 and isinstance(exc.__cause__, (UnicodeDecodeError, RecursionError)):
            # FastAPI's answer to a JSON body it cannot decode (not UTF-8, nested past the parser's limit): a 422
            # naming the body, as for any other malformed JSON (and as POST /v1/batches answers the same bodies)
            return error_response(422, "invalid_request", "the body is not valid JSON: not UTF-8, or nested too "
                                                          "deeply", "body")
        headers = getattr(exc, "headers", None)  # kept: a 405 carries `Allow`, a 413 `Connection: close`
        if exc.status_code == 405 and (allowed := _allowed_methods(request)):
            headers = {**(headers or {}), "Allow": allowed}
        return error_response(exc.status_code, "http_error", str(exc.detail), headers=headers)

    # Only a database that cannot be reached is an outage (503). A value it refuses or a constraint it enforces
    # is the request's doing (validation should have caught it first; this is the net under it); anything else
    # is our bug (500), logged in full, never shown.
    # The async routes (api/job_store.py) raise psycopg's and psycopg_pool's own classes, mapped the same way.
    @app.exception_handler(PoolTimeout)
    @app.exception_handler(AsyncPoolTimeout)
    async def _overloaded(_: Request, exc: Exception):
        log.warning("no database connection free within the pool timeout: answering 503 (overload)")
        return error_response(503, "overloaded", "the server is busy; retry shortly", headers={"Retry-After": "1"})

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    @app.exception_handler(psycopg.OperationalError)
    @app.exception_handler(psycopg.InterfaceError)
    async def _database_down(_: Request, exc: Exception):
        log.error("database unavailable: %s", exc)
        return error_response(503, "service_unavailable", "the database is unavailable; retry shortly",
                              headers={"Retry-After": "5"})

    @app.exception_handler(DataError)
    @app.exception_handler(psycopg.DataError)
    async def _refused_value(_: Request, exc: Exception):
        log.warning("the database refused a value of a request: %s", getattr(exc, "orig", exc))
        return error_response(422, "invalid_request", "a value in the request cannot be stored")

    @app.exception_handler(IntegrityError)
    @app.exception_handler(psycopg.IntegrityError)
    async def _constraint(_: Request, exc: Exception):
        log.warning("a request broke a database constraint: %s", getattr(exc, "orig", exc))
        return error_response(409, "conflict", "the request conflicts with the current state; read it and retry")

    @app.exception_handler(DBAPIError)
    @app.exception_handler(psycopg.Error)
    async def _database_error(_: Request, exc: Exception):
        if getattr(exc, "connection_invalidated", False):
            return await _database_down(_, exc)
        log.exception("database error", exc_info=exc)
        return error_response(500, "internal_error", "internal error")
