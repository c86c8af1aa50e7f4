"""A private stack for fault tests: its own Postgres and Redis (so tests may kill and restart them), the shared S3
server, an API process, and workers the test starts and kills itself."""
from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass, field

import pytest
from sqlalchemy import create_engine

from tests.support import ApiClient, Processes


@dataclass
class OwnStack:
    env: dict[str, str]
    procs: Processes
    pg: object
    redis: object
    api_url: str
    engine: object
    workers: list[str] = field(default_factory=list)
    names: itertools.count = field(default_factory=itertools.count)

    def client(self) -> ApiClient:
        from sqlalchemy.orm import Session

        from common.auth import create_api_key, get_or_create_tenant

        with Session(self.engine) as session:
            tenant = get_or_create_tenant(session, f"fault-{uuid.uuid4().hex[:6]}")
            key = create_api_key(session, tenant=tenant, name="fault")
            session.commit()
        return ApiClient(self.api_url, key)

    def start_worker(self, extra_env: dict | None = None, wait: bool = True):
        name = f"fw{next(self.names)}"  # never reused: each worker has its own log
        self.workers.append(name)
        return name, self.procs.start_worker(name, extra_env, wait=wait)

    def stop_workers(self) -> None:
        for name in self.workers:
            self.procs.stop(name)


def make_own_stack(services, stack_env, tmp_path_factory, bucket: str, **overrides) -> OwnStack:
    from common.db import migrate
    from common.devstack.servers import PostgresServer, RedisServer

    root = tmp_path_factory.mktemp("own")
    pg = PostgresServer(root / "pg", fsync=False)
    pg.start()
    redis = RedisServer(root / "redis")
    redis.start()
    services["s3"].create_bucket(bucket)
    db_url = pg.create_database("letterpress")
    migrate(db_url)
    env = {**stack_env, "LETTERPRESS_DATABASE__URL": db_url, "LETTERPRESS_REDIS__URL": redis.url(0),
           "LETTERPRESS_STORAGE__URL": f"s3://{bucket}/images", **overrides}
    procs = Processes(env, tmp_path_factory.mktemp("own-logs"))
    api_url = procs.start_api()
    return OwnStack(env=env, procs=procs, pg=pg, redis=redis, api_url=api_url, engine=create_engine(db_url, pool_pre_ping=True))


@pytest.fixture(scope="module")
def own_stack(services, stack_env, tmp_path_factory):
    stack = make_own_stack(services, stack_env, tmp_path_factory, bucket=f"fault-{uuid.uuid4().hex[:6]}")
    yield stack
    stack.procs.stop_all()
    stack.engine.dispose()
    stack.redis.stop()
    stack.pg.stop()


@pytest.fixture
def fresh_workers(own_stack):
    """Workers a test starts are stopped when it ends."""
    yield own_stack
    own_stack.stop_workers()
    own_stack.workers.clear()
