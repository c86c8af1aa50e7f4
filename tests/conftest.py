"""Real parts for the whole suite, started once per session unless given by URL:

- Postgres: LETTERPRESS_TEST_DATABASE_URL (a server we may create databases on), else a throwaway server
- Redis: LETTERPRESS_TEST_REDIS_URL, else a throwaway redis-server
- S3: a moto S3 API server (ThreadedMotoServer, in this process, over HTTP)
- the tiny random-weight Ideogram 4, built locally once
- the API (uvicorn) and a Celery worker process running the tiny model on the CPU, both real subprocesses

Tests isolate by tenant: each test gets its own tenant and API key, so tests never see each other's jobs.
"""
from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.db import migrate, reset_engines
from common.settings import settings_from_env, use_settings
from tests.support import ApiClient, Processes, make_tenant

# Tests that use these fixtures run real API or worker processes: the `slow` tier (make test-fast skips them).
SYSTEM_FIXTURES = {"processes", "api_url", "worker", "own_stack", "fresh_workers", "chaos_stack"}


def pytest_collection_modifyitems(items):
    for item in items:
        if SYSTEM_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)

TEST_DB = "letterpress_test"


@pytest.fixture(scope="session")
def services(tmp_path_factory):
    from common.devstack.servers import PostgresServer, RedisServer, S3Server

    root = tmp_path_factory.mktemp("services")
    started = []
    db_url = os.environ.get("LETTERPRESS_TEST_DATABASE_URL")
    if db_url:
        pg = None
    else:
        pg = PostgresServer(root / "pg", fsync=False)
        pg.start()
        started.append(pg)
    redis_url = os.environ.get("LETTERPRESS_TEST_REDIS_URL")
    redis = None
    if not redis_url:
        redis = RedisServer(root / "redis")
        redis.start()
        started.append(redis)
        redis_url = redis.url()
    s3 = S3Server(root / "s3")
    s3.start()
    started.append(s3)
    s3.create_bucket("letterpress-test")
    if pg is not None:
        pg.create_database(TEST_DB)
        db_url = pg.url(TEST_DB)
    else:
        db_url = _fresh_database(db_url)
    yield {"pg": pg, "redis": redis, "s3": s3, "database_url": db_url, "redis_url": redis_url, "root": root}
    for server in reversed(started):
        server.stop()


def _fresh_database(server_url: str) -> str:
    from sqlalchemy import create_engine, text

    name = f"letterpress_test_{uuid.uuid4().hex[:8]}"
    engine = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return server_url.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from common.devstack.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def stack_env(services, tiny_model, tmp_path_factory) -> Iterator[dict[str, str]]:
    """The environment every process of the test stack is started with. This process uses the same settings
    through `use_settings` (the process environment is never written)."""

    env = {
        "LETTERPRESS_ENV": "test",
        "LETTERPRESS_HOME": str(tmp_path_factory.mktemp("home")),
        "LETTERPRESS_DATABASE__URL": services["database_url"],
        "LETTERPRESS_REDIS__URL": services["redis_url"],
        "LETTERPRESS_STORAGE__URL": "s3://letterpress-test/images",
        "LETTERPRESS_STORAGE__ENDPOINT_URL": services["s3"].endpoint_url,
        "LETTERPRESS_STORAGE__ACCESS_KEY_ID": "test",
        "LETTERPRESS_STORAGE__SECRET_ACCESS_KEY": "test",
        "LETTERPRESS_MODEL__ID": str(tiny_model),
        "LETTERPRESS_WORKER__LEASE_TTL_S": "6",
        "LETTERPRESS_WORKER__HEARTBEAT_S": "1",
        "LETTERPRESS_WORKER__PROGRESS_MIN_INTERVAL_S": "0.2",
        "LETTERPRESS_WORKER__MAINTENANCE_PERIOD_S": "1",
        "LETTERPRESS_WORKER__REQUEUE_AFTER_S": "5",
        # previews on (off by default): every test job's generation makes them, so they are exercised everywhere
        "LETTERPRESS_WORKER__PREVIEW_EVERY_STEPS": "2",
        # several CPU workers share this machine's cores (unshared, two ran each job 10x slower)
        "LETTERPRESS_WORKER__CPU_THREADS": "1",
        # no fixed scrape ports (several workers share this host): Processes.start_worker gives each a free one
        "LETTERPRESS_WORKER__METRICS_PORT": "0",
        "LETTERPRESS_WEBHOOKS__METRICS_PORT": "0",
        # a frozen (SIGSTOPped) process's open transaction is ended soon, as in production after 60 s
        "LETTERPRESS_DATABASE__IDLE_IN_TRANSACTION_TIMEOUT_S": "10",
        "LETTERPRESS_WEBHOOKS__ALLOW_LOOPBACK": "true",
        # the tiny model's random enhancer head rarely ends its answer: keep its samples short
        "LETTERPRESS_MAGIC_PROMPT__MAX_NEW_TOKENS": "16",
        # every test's client is 127.0.0.1 and most tenants are new, like good clients behind one NAT with a guesser:
        # the wrong-key guard is tested with its own limit (tests/api/test_wrong_keys.py), not the suite's traffic
        "LETTERPRESS_API__WRONG_KEYS_PER_MINUTE": "10000",
        # event streams (api/event_streams.py) end within seconds here: walkers and the fuzzer call every route, and a
        # queued job's stream would otherwise last until the job ends
        "LETTERPRESS_API__EVENTS_MAX_S": "2",
        "LETTERPRESS_API__EVENTS_POLL_S": "0.1",
        # the same for per-key request rates: tested with their own limit (tests/api/test_rate_limits.py)
        "LETTERPRESS_LIMITS__REQUESTS_PER_KEY": "100000/second",
        # usage is priced (tests/worker/test_batches_e2e.py checks the cost of a batch against this)
        "LETTERPRESS_PRICING__ON_DEMAND_PER_GPU_HOUR": '{"cpu": 3.6}',
    }
    with use_settings(settings_from_env(env)):
        migrate()
        yield env
    reset_engines()


@pytest.fixture(scope="session")
def processes(stack_env, tmp_path_factory):
    procs = Processes(stack_env, tmp_path_factory.mktemp("logs"))
    yield procs
    procs.stop_all()


@pytest.fixture(scope="session")
def api_url(processes) -> str:
    return processes.start_api()


@pytest.fixture(scope="session")
def worker(processes, api_url):
    """One real Celery worker process with the tiny model, warm before the first test uses it."""
    return processes.start_worker("w1")


@pytest.fixture
def tenant(stack_env):
    return make_tenant()


@pytest.fixture
def client(api_url, tenant) -> ApiClient:
    return ApiClient(api_url, tenant.key)
