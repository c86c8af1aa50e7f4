"""The FastAPI app. `uvicorn api.main:app` (or `letterpress api`)."""
from __future__ import annotations

import logging

from fastapi import FastAPI

from api import limits
from api.errors import install_error_handlers
from api.routers import batches, health, jobs, webhooks
from common.settings import get_settings
from common.storage import shared_storage


def create_app() -> FastAPI:
    settings = get_settings()
    app = FastAPI(title="Letterpress", version="0.1.0",
                  description="Queue-backed batch image generation for Ideogram 4")
    app.state.storage = shared_storage(settings.storage)
    install_error_handlers(app)
    limits.install(app)
    app.include_router(health.router)
    app.include_router(jobs.router)
    app.include_router(batches.router)
    app.include_router(webhooks.router)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return app


app = create_app()
