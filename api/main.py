"""The FastAPI app. `uvicorn api.main:app` (or `letterpress api`)."""
from __future__ import annotations

import asyncio
import gc
import logging
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api import console, limits, metrics
from api.errors import install_error_handlers
from api.job_store import JobStore
from api.routers import adapters, admin, batches, health, jobs, uploads, usage, webhooks
from common.prompt_tokens import prompt_tokenizer
from common.settings import get_settings
from common.storage import shared_storage


@asynccontextmanager
async def _lifespan(app: FastAPI):
    # Load the prompt tokenizer now, off the event loop: its warning (if it cannot be loaded) shows at startup,
    # and the first request does not wait about a second for it (later ones never do: it is loaded once).
    threading.Thread(target=_load_tokenizer, args=(get_settings().model,), name="prompt-tokenizer",
                     daemon=True).start()
    await app.state.job_store.open()
    _freeze_startup_objects("app")
    lag = asyncio.create_task(metrics.watch_event_loop_lag(), name="event-loop-lag")
    try:
        yield
    finally:
        lag.cancel()
        await app.state.job_store.close()


_frozen: set[str] = set()


def _freeze_startup_objects(stage: str) -> None:
    """Move what startup made (modules, the app, its routes and schemas: about 165,000 objects) out of the
    garbage collector's sight. Each full collection walked all of them, about 85 ms on the 2-core machine, with
    the event loop stopped: the requests it held were the API's p99 under load (docs/PERFORMANCE.md, "Front door:
    the collector's pauses"). Frozen objects are never freed, so what is garbage is collected first, and each
    stage is frozen once per process (a test session starts many apps: only the first is kept)."""
    if stage in _frozen:
        return
    _frozen.add(stage)
    gc.collect()
    gc.freeze()


def _load_tokenizer(model) -> None:
    prompt_tokenizer(model)
    _freeze_startup_objects("tokenizer")  # its modules too (transformers: about 30,000 more objects)


def create_app() -> FastAPI:
    settings = get_settings()
    app = FastAPI(title="Letterpress", version="0.1.0", lifespan=_lifespan,
                  description="Queue-backed batch image generation for Ideogram 4")
    app.state.storage = shared_storage(settings.storage)
    # opened by the lifespan, on the server's event loop
    app.state.job_store = JobStore(settings.database, send_linger_s=settings.api.send_linger_ms / 1000)
    install_error_handlers(app)
    limits.install(app)
    metrics.install(app, settings)
    app.include_router(health.router)
    app.include_router(jobs.router)
    app.include_router(batches.router)
    app.include_router(webhooks.router)
    app.include_router(usage.router)
    app.include_router(adapters.router)
    app.include_router(admin.router)
    app.include_router(uploads.router)
    if settings.console.enabled:
        console.install(app)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return app


app = create_app()
