"""Who is signed in to the console, and the rules every console route follows.

- `ConsoleRoute` (the route class of every console router) turns the console's refusals into pages: no session
  is a redirect to the sign-in form, a domain error (404 for another tenant's id, 409, 422...) is an error page
  with the same status the API would answer.
- `current_user` (the dependency of every signed-in page): the session of the cookie, its key re-checked.
- `submitted_form`: the body of a POST, read only after the session was checked (a stranger's body is never
  parsed), with its CSRF token checked against the session's (and the Origin, when the browser sends one).
- `/ui/login` and `/ui/logout`: sign in with an API key (wrong keys count against the client's address exactly as
  on /v1, api/wrong_keys.py), sign out.
"""
from __future__ import annotations

import hmac
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import quote, urlsplit

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, Response
from fastapi.routing import APIRoute
from starlette.datastructures import FormData

from api.console import sessions
from api.console.rendering import render
from api.deps import SettingsDep
from api.wrong_keys import sign_in_failures
from common.auth import KEY_PREFIX, hash_key, key_holder
from common.db import session_scope
from common.errors import AuthenticationError, Forbidden, LetterpressError
from common.job_request import RequestError
from common.models import Tenant
from common.settings import Settings

log = logging.getLogger(__name__)


class SignInRequired(Exception):
    """No live session (or its key no longer works): the page redirects to the sign-in form."""


class FormRefused(Exception):
    """A POST without the session's CSRF token, or from another origin."""


@dataclass(frozen=True)
class ConsoleUser:
    tenant: Tenant
    key_hash: str
    scopes: tuple[str, ...]
    session: sessions.ConsoleSession

    @property
    def csrf(self) -> str:
        return self.session.csrf

    @property
    def can_submit(self) -> bool:
        return "submit" in self.scopes


class ConsoleRoute(APIRoute):
    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def console_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except SignInRequired:
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                return RedirectResponse(f"/ui/login?next={quote(target, safe='')}", status_code=303)
            except FormRefused as exc:
                return render(request, "error.html", status=403, status_code=403, message=str(exc))
            except LetterpressError as exc:
                return render(request, "error.html", status=exc.status_code, status_code=exc.status_code,
                              message=exc.message)
            except RequestError as exc:
                return render(request, "error.html", status=422, status_code=422, message=str(exc))

        return console_handler


def _tenant_and_scopes(key_hash: str) -> tuple[Tenant, tuple[str, ...]]:
    """The key's tenant and scopes; 401 for a key that no longer works, 403 for one without `read`."""
    with session_scope() as db:
        tenant, scopes = key_holder(db, key_hash)
        if "read" not in scopes:
            raise Forbidden(f"this API key lacks the `read` scope the console needs (it has: {', '.join(scopes)})")
        db.expunge(tenant)
        return tenant, tuple(scopes)


async def current_user(request: Request, settings: SettingsDep) -> ConsoleUser:
    session = await sessions.find(settings, request.cookies.get(sessions.COOKIE))
    if session is None:
        raise SignInRequired
    try:
        tenant, scopes = await run_in_threadpool(_tenant_and_scopes, session.key_hash)
    except (AuthenticationError, Forbidden):  # revoked, expired, or a key without `read`
        await sessions.end(settings, session)
        raise SignInRequired from None
    user = ConsoleUser(tenant=tenant, key_hash=session.key_hash, scopes=scopes, session=session)
    request.state.console_user = user  # for the page's header and forms (api/console/rendering.py)
    return user


CurrentUser = Annotated[ConsoleUser, Depends(current_user)]


def _same_origin(request: Request) -> bool:
    origin = request.headers.get("origin")
    if origin is None or origin == "null" and request.url.path == "/ui/login":
        return True  # browsers that send no Origin still send the cookie only same-site (SameSite=Strict)
    parts = urlsplit(origin)
    return parts.netloc == request.headers.get("host", "") and parts.scheme in ("http", "https")


async def submitted_form(request: Request, user: ConsoleUser, *, scope: str = "submit") -> FormData:
    """The POSTed form of a signed-in user whose key holds `scope`, its CSRF token and origin checked."""
    if scope not in user.scopes:
        raise Forbidden(f"this API key lacks the `{scope}` scope (it has: {', '.join(user.scopes)})")
    if not _same_origin(request):
        raise FormRefused("this form was posted from another site")
    form = await request.form()
    if not user.session.csrf_ok(_text(form, "csrf_token")):
        raise FormRefused("the form's security token is missing or stale: reload the page and try again")
    return form


def _text(form: FormData, name: str) -> str | None:
    value = form.get(name)
    return value if isinstance(value, str) else None


def _cookie_secure(request: Request, settings: Settings) -> bool:
    mode = settings.console.secure_cookie
    return mode == "always" or (mode == "auto" and request.url.scheme == "https")


def _safe_next(target: str | None) -> str:
    """Only a path of the console itself (never another site: an open redirect)."""
    if target and target.startswith("/ui") and not target.startswith("//") and "\\" not in target:
        return target
    return "/ui/gallery"


# ------------------------------------------------------------------------------------------------- routes

router = APIRouter(prefix="/ui", route_class=ConsoleRoute, include_in_schema=False)


def _login_page(request: Request, settings: Settings, *, status: int = 200, error: str | None = None,
                next_path: str | None = None) -> Response:
    token = secrets.token_urlsafe(32)
    response = render(request, "login.html", status=status, login_csrf=token, error=error,
                      next=_safe_next(next_path or request.query_params.get("next")))
    response.set_cookie(sessions.LOGIN_CSRF_COOKIE, token, max_age=3600, path="/ui/login", httponly=True,
                        samesite="strict", secure=_cookie_secure(request, settings))
    return response


@router.get("/login")
async def login_form(request: Request, settings: SettingsDep) -> Response:
    return _login_page(request, settings)


@router.post("/login")
async def login(request: Request, settings: SettingsDep) -> Response:
    address = (request.client.host if request.client else "unknown")
    if not _same_origin(request):
        raise FormRefused("this form was posted from another site")
    api = settings.api
    if api.wrong_keys_per_minute and await sign_in_failures(address, add=False) >= api.wrong_keys_per_minute:
        return _login_page(request, settings, status=429,
                           error="Too many wrong keys from this address: wait a minute and try again.")
    form = await request.form()
    cookie_token, form_token = request.cookies.get(sessions.LOGIN_CSRF_COOKIE), _text(form, "login_csrf")
    if not cookie_token or not form_token or not hmac.compare_digest(cookie_token, form_token):
        raise FormRefused("the sign-in form's security token is missing or stale: reload the page and try again")
    key = (_text(form, "api_key") or "").strip()
    key_hash = hash_key(key)
    try:
        await run_in_threadpool(_tenant_and_scopes, key_hash) if key.startswith(KEY_PREFIX) else _no_key()
    except (AuthenticationError, Forbidden) as exc:
        await sign_in_failures(address, add=True)
        message = "That API key does not work here." if isinstance(exc, AuthenticationError) else exc.message
        return _login_page(request, settings, status=401, error=message, next_path=_text(form, "next"))
    token = await sessions.create(settings, key_hash)
    response = RedirectResponse(_safe_next(_text(form, "next")), status_code=303)
    response.set_cookie(sessions.COOKIE, token, max_age=settings.console.session_ttl_s, path="/ui", httponly=True,
                        samesite="strict", secure=_cookie_secure(request, settings))
    response.delete_cookie(sessions.LOGIN_CSRF_COOKIE, path="/ui/login")
    return response


def _no_key() -> None:
    raise AuthenticationError("invalid API key")


@router.post("/logout")
async def logout(request: Request, user: CurrentUser, settings: SettingsDep) -> Response:
    await submitted_form(request, user, scope="read")
    await sessions.end(settings, user.session)
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(sessions.COOKIE, path="/ui")
    return response
