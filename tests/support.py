"""Helpers for tests with real processes: an API client that polls, and a process manager for the API and
Celery workers (start, SIGTERM, SIGKILL, wait until ready)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from common.broker import QUEUES
from common.devstack.servers import free_port  # noqa: F401 - the tests' free port, re-exported here

from common.cli.polling import wait_until  # noqa: F401 - the tests' wait loop, re-exported here

REPO = Path(__file__).resolve().parent.parent


@contextmanager
def scratch_database(services: dict, prefix: str, *, migrated: bool = True) -> Iterator[str]:
    """A fresh database on the suite's Postgres server (migrated unless told otherwise), dropped afterwards."""
    from sqlalchemy import create_engine, text

    from common.db import migrate

    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    server = services["database_url"].rsplit("/", 1)[0]
    admin = create_engine(server + "/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = f"{server}/{name}"
    try:
        if migrated:
            migrate(url)
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))  # a test's pool may still hold connections
        admin.dispose()


@contextmanager
def scratch_settings(services: dict, stack_env: dict, prefix: str, *, redis_db: int | None = None) -> Iterator:
    """This process (only) pointed at a fresh migrated database, and at Redis database `redis_db` when given;
    restored and dropped afterwards."""
    from common.db import get_engine
    from common.settings import settings_from_env, use_settings

    with scratch_database(services, prefix) as url:
        env = {**stack_env, "LETTERPRESS_DATABASE__URL": url}
        if redis_db is not None:
            env["LETTERPRESS_REDIS__URL"] = services["redis_url"].rsplit("/", 1)[0] + f"/{redis_db}"
        try:
            with use_settings(settings_from_env(env)) as settings:
                yield settings
        finally:
            get_engine(url).dispose()


def wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


@dataclass
class TenantKey:
    id: uuid.UUID
    name: str
    key: str


def make_tenant(name: str | None = None) -> TenantKey:
    from common.auth import create_api_key, get_or_create_tenant
    from common.db import session_scope

    name = name or f"tenant-{uuid.uuid4().hex[:8]}"
    with session_scope() as session:
        tenant = get_or_create_tenant(session, name)
        key = create_api_key(session, tenant=tenant, name=name)
        return TenantKey(id=tenant.id, name=name, key=key)


class ApiClient:
    def __init__(self, base_url: str, key: str | None):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.base_url = base_url
        self.http = httpx.Client(base_url=base_url, headers=headers, timeout=30)

    def submit(self, body: dict, **kw) -> httpx.Response:
        return self.http.post("/v1/jobs", json=body, **kw)

    def get(self, job_id: str) -> dict:
        resp = self.http.get(f"/v1/jobs/{job_id}")
        resp.raise_for_status()
        return resp.json()

    def wait(self, job_id: str, timeout: float = 120.0, statuses=("succeeded", "failed", "canceled")) -> dict:
        return wait_until(lambda: (j := self.get(job_id))["status"] in statuses and j, timeout,
                          what=f"job {job_id} in {statuses}")


# About 3,900 tokens: within what the test stack's API admits (4,096), past the tiny model's 2,048-token context,
# so the pipeline itself raises for this prompt (Processes.start_api)
BEYOND_THE_MODEL = "a " * 3900


class Processes:
    """Real subprocesses of the stack, sharing one environment."""

    def __init__(self, env: dict[str, str], log_dir: Path):
        self.env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen] = {}
        self.metrics_ports: dict[str, int] = {}  # worker name -> its Prometheus port

    def _spawn(self, name: str, cmd: list[str], extra_env: dict | None = None) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "ab")
        proc = subprocess.Popen(cmd, cwd=REPO, env={**self.env, **(extra_env or {})}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start_api(self, name: str = "api", extra_env: dict | None = None) -> str:
        """The API process. It admits prompts of up to 4,096 tokens while the workers' model takes 2,048, so a
        test can submit a job the model rejects at generation (`BEYOND_THE_MODEL`); the API's own check at the
        model's limit is tested in-process (tests/api/test_front_door.py)."""
        port = free_port()
        self._spawn(name, [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port",
                           str(port), "--log-level", "warning"],
                    {"LETTERPRESS_MODEL__MAX_SEQUENCE_LENGTH": "4096", **(extra_env or {})})
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/healthz")
        return url

    def start_worker(self, name: str, extra_env: dict | None = None, wait: bool = True) -> subprocess.Popen:
        offset = len(self.log(name))
        cmd = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--pool", "solo",
               "--concurrency", "1", "-Q", ",".join(QUEUES), "-n", f"{name}@%h", "--loglevel", "INFO",
               "--without-gossip", "--without-mingle"]
        self.metrics_ports[name] = free_port()
        proc = self._spawn(name, cmd, {"LETTERPRESS_WORKER__METRICS_PORT": str(self.metrics_ports[name]),
                                       **(extra_env or {})})
        if wait:
            wait_until(lambda: "ready." in self.log(name)[offset:] or proc.poll() is not None, 120,
                       what=f"worker {name} ready")
            if proc.poll() is not None:
                raise RuntimeError(f"worker {name} died at start:\n{self.log(name)[-4000:]}")
        return proc

    def start_webhooks_worker(self, name: str = "webhooks", extra_env: dict | None = None) -> subprocess.Popen:
        """The delivery worker process, as `letterpress webhooks-worker` starts it, with its own metrics port."""
        from common.broker import webhooks_worker_argv

        offset = len(self.log(name))
        self.metrics_ports[name] = free_port()
        proc = self._spawn(name, webhooks_worker_argv(concurrency=8),
                           {"LETTERPRESS_WEBHOOKS__METRICS_PORT": str(self.metrics_ports[name]), **(extra_env or {})})
        wait_until(lambda: "ready." in self.log(name)[offset:] or proc.poll() is not None, 60,
                   what=f"{name} worker ready")
        if proc.poll() is not None:
            raise RuntimeError(f"{name} worker died at start:\n{self.log(name)[-4000:]}")
        return proc

    def signal(self, name: str, sig: int) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            os.killpg(proc.pid, sig)

    def wait_exit(self, name: str, timeout: float = 60) -> int:
        return self.procs[name].wait(timeout=timeout)

    def stop(self, name: str) -> None:
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            return
        self.signal(name, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.signal(name, signal.SIGKILL)
            proc.wait(timeout=10)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)
