"""The console's webhooks page: the signing secret (shown only after a click, a POST), the delivery log with its
filters, and redelivery; each through the REST routes' own functions (api/routers/webhooks.py)."""
from __future__ import annotations

from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.responses import RedirectResponse, Response

from api.console.auth import ConsoleRoute, CurrentUser, submitted_form
from api.console.rendering import render
from api.deps import SessionDep
from api.routers import webhooks as webhook_routes

router = APIRouter(prefix="/ui", route_class=ConsoleRoute, include_in_schema=False)
FILTERS = ("job_id", "batch_id", "event_id")


def _page(request: Request, session, user, *, secret: dict | None = None) -> Response:
    filters = {name: request.query_params[name].strip() for name in FILTERS if request.query_params.get(name)}
    deliveries = webhook_routes.list_deliveries(session, user.tenant, limit=50,
                                                cursor=request.query_params.get("cursor"), **filters)
    more_url = (f"/ui/webhooks?{urlencode({**filters, 'cursor': deliveries.next_cursor})}"
                if deliveries.has_more else None)
    return render(request, "webhooks.html", deliveries=jsonable_encoder(deliveries.data), filters=filters,
                  more_url=more_url, secret=secret)


@router.get("/webhooks")
def webhooks_page(request: Request, user: CurrentUser, session: SessionDep) -> Response:
    return _page(request, session, user)


@router.post("/webhooks/secret")
async def reveal_secret(request: Request, user: CurrentUser, session: SessionDep) -> Response:
    """The page with the secret shown: a POST (with the CSRF token) so no link, prefetch or history shows it."""
    await submitted_form(request, user, scope="read")

    def page() -> Response:
        secret = jsonable_encoder(webhook_routes.get_secret(session, user.tenant))
        return _page(request, session, user, secret=secret)

    return await run_in_threadpool(page)


@router.post("/webhooks/deliveries/{delivery_id}/redeliver")
async def redeliver(delivery_id: str, request: Request, user: CurrentUser, session: SessionDep) -> Response:
    await submitted_form(request, user)
    await run_in_threadpool(webhook_routes.redeliver_delivery, delivery_id, session, user.tenant)
    return RedirectResponse("/ui/webhooks", status_code=303)
