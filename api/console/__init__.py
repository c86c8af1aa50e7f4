"""The web console at /ui: server-rendered pages (Jinja2, api/console/templates) over the same domain code as
the REST API, one small script (static/console.js) for live progress and infinite scroll, no build step.

Sign-in, sessions and CSRF: auth.py and sessions.py; the headers every page carries: security.py; pages: jobs.py
(create, a job), gallery.py, batches.py, webhooks.py, operations.py (admin keys: the fleet)."""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from api.console import auth, batches, gallery, jobs, operations, webhooks
from api.console.rendering import STATIC
from api.console.security import ConsoleHeaders


def install(app: FastAPI) -> None:
    for module in (auth, jobs, gallery, batches, webhooks, operations):
        app.include_router(module.router)
    app.mount("/ui/static", StaticFiles(directory=STATIC), name="console-static")
    app.add_middleware(ConsoleHeaders)
