"""`LeanRoute`: a route FastAPI documents but need not serve, for the hottest call (`GET /v1/jobs/{id}`).

FastAPI serves a call by solving the endpoint's dependency graph, validating the return value against the
response model and serializing it: a fifth of the API process's CPU a poll (py-spy of the running server at 600
polls a second; docs/PERFORMANCE.md, "Front door: the hot calls"). When every input of a route is cheap to read
from the request itself, `@served_by(handler)` on its endpoint has the route (a LeanRoute) call `handler(request)`
directly. The endpoint's decorator and signature still make the route's OpenAPI entry, unchanged, and the
endpoint calls the same handler, so the route answers the same under a plain APIRoute. The handler checks what the
signature declares (tests/api/test_lean_routes.py compares the two ways on the same calls).
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

Handler = Callable[[Request], Awaitable[Response]]


class LeanRoute(APIRoute):
    def get_route_handler(self) -> Handler:
        handler = getattr(self.endpoint, "lean_handler", None)
        return handler if handler is not None else super().get_route_handler()


def served_by(handler: Handler):
    """Mark an endpoint as served by `handler` when its route is a LeanRoute."""
    def mark(endpoint):
        endpoint.lean_handler = handler
        return endpoint
    return mark
