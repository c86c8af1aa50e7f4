"""The console's operations page, for keys with the `admin` scope: workers, queue depths, batches in progress and
throughput across every tenant (common.fleet_status, what `letterpress status` prints). Any other key: 403."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from api.console.auth import ConsoleRoute, CurrentUser
from api.console.rendering import render
from api.deps import SettingsDep
from common.errors import Forbidden
from common.fleet_status import fleet_status

router = APIRouter(prefix="/ui", route_class=ConsoleRoute, include_in_schema=False)


@router.get("/operations")
def operations(request: Request, user: CurrentUser, settings: SettingsDep) -> Response:
    if "admin" not in user.scopes:
        raise Forbidden("the operations page spans every tenant: it needs a key with the `admin` scope")
    return render(request, "operations.html", fleet=fleet_status(settings))
