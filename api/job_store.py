"""Submit and poll, the two calls clients make most, in one SQL statement each on an async connection pool.

`POST /v1/jobs` (without an Idempotency-Key) and `GET /v1/jobs/{id}` do not go through the ORM session of the other
routes: each is one statement that checks the caller's key and reads or inserts the job together, run on psycopg's
`AsyncConnectionPool` in autocommit mode, on the event loop. Measured on the 2-core machine (docs/PERFORMANCE.md,
"Front door under load"), a sync route through the ORM spent most of its time in threadpool hops and ORM
machinery around five to fifteen round trips, and topped out near 130 submits and 200 polls a second; a minimal
sync route with one Core statement reached about 500 polls a second, SQLAlchemy's asyncio engine less, and psycopg's
async pool about 1,000.

The statements are SQLAlchemy Core built from the models and compiled once for psycopg, so the tables, columns and
the key rule (common.auth.usable_key) have one definition; rows come back as transient `Job`s, so responses are
built by the same common.representation as everywhere else. What is not here stays in the ORM: idempotent submits
(their replay and race rules live in common.job_states.create_job), cancels, lists and every other route.

One pool per app, opened and closed by its lifespan on the server's event loop (JobStore.connection), and with it
the send queue that sends submitted jobs to the broker off the request (api/send_queue.py). Queue places are kept
a second per job (api/recent_places.py).
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import lru_cache
from typing import Any, NoReturn

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from sqlalchemy import Integer, and_, bindparam, func, insert, literal_column, select, update
from sqlalchemy.dialects.postgresql import JSONB, aggregate_order_by
from sqlalchemy.dialects.postgresql.psycopg import dialect as psycopg_dialect
from sqlalchemy.engine import make_url
from sqlalchemy.orm import ColumnProperty

from api.recent_places import RecentPlaces, RecentRanks
from api.send_queue import SendQueue
from common import quotas
from common.auth import usable_key
from common.db import server_options
from common.errors import AuthenticationError, Forbidden, NotFound
from common.models import ApiKey, Job, JobImage, JobStatus, Tenant
from common.queue_position import (
    LANE_RANK_SQL,
    THROUGHPUT_PARAMS,
    THROUGHPUT_SQL,
    LaneRank,
    QueuePlace,
    cached_throughput,
    eta_s,
    lanes_before,
    position_query,
    remember_throughput,
)
from common.settings import DatabaseSettings, get_settings

log = logging.getLogger(__name__)
_JOBS = Job.__table__
_IMAGES = JobImage.__table__
# (attribute, column name) of every column of a job: rows are keyed by column name, `Job(...)` takes attributes
_JOB_ATTRS = [(prop.key, prop.columns[0].name) for prop in Job.__mapper__.attrs if isinstance(prop, ColumnProperty)]
_JSONB_ATTRS = {attr for attr, _ in _JOB_ATTRS if isinstance(_JOBS.c[dict(_JOB_ATTRS)[attr]].type, JSONB)}


@lru_cache(maxsize=32)
def _compile(statement) -> str:
    """psycopg's SQL text of a Core statement (`%(name)s` parameters), compiled once per statement."""
    return str(statement.compile(dialect=psycopg_dialect()))


def _key_tenant(scope: str):
    return select(ApiKey.tenant_id).where(usable_key(bindparam("key_hash"), scope)).subquery("caller_key")


def _read_statement() -> str:
    """The caller's tenant (no row: the key is not usable for reading) and its job of that id (NULL columns:
    none)."""
    key = _key_tenant("read")
    images = (select(func.coalesce(func.jsonb_agg(aggregate_order_by(func.to_jsonb(_IMAGES.table_valued()),
                                                                     _IMAGES.c.index)),
                                   literal_column("'[]'::jsonb")))
              .where(_IMAGES.c.job_id == _JOBS.c.id).scalar_subquery())
    return _compile(select(key.c.tenant_id.label("key_tenant_id"), _JOBS, images.label("images_json"))
                    .select_from(key.outerjoin(_JOBS, and_(_JOBS.c.id == bindparam("job_id"),
                                                           _JOBS.c.tenant_id == key.c.tenant_id))))


_INSERTED = [name for attr, name in _JOB_ATTRS
             if attr in ("id", "queue", "status", "params", "request_hash", "idempotency_key", "metadata_",
                         "webhook_url", "attempts", "max_attempts", "preemptions", "cancel_requested",
                         "progress_step", "progress_total")]


# the default limits, as parameters of the statements compiled once (common.quotas)
_DEFAULTS = quotas.Defaults(bindparam("max_active_default", type_=Integer),
                            bindparam("max_images_default", type_=Integer))


def _limit_binds() -> dict[str, int]:
    limits = get_settings().limits
    return {"max_active_default": limits.max_active_jobs, "max_images_default": limits.max_images_per_day}


def _insert_statement() -> str:
    """A new job of the key's tenant; no row when the key is not usable for submitting, or when the tenant's limits
    (active jobs, images a day: common.quotas) do not let it start `num_images` more images."""
    key = _key_tenant("submit")
    values = [bindparam(name, type_=_JOBS.c[name].type) for name in _INSERTED]
    within = quotas.within_limits(key.c.tenant_id, Tenant.limits, _DEFAULTS, bindparam("num_images", type_=Integer))
    source = (select(key.c.tenant_id, *values).select_from(key.join(Tenant, Tenant.id == key.c.tenant_id))
              .where(within))
    return _compile(insert(_JOBS).from_select(["tenant_id", *_INSERTED], source).returning(_JOBS))


READ_JOB = _read_statement()
# the tenant's own request rate (tenants.limits.requests_per_key) of a usable key; no row: the key is not usable
KEY_RATE = _compile(select(Tenant.limits.op("->>")(literal_column("'requests_per_key'")).label("rate"))
                    .join(ApiKey, ApiKey.tenant_id == Tenant.id).where(usable_key(bindparam("key_hash"))))
KEY_SCOPES = _compile(
    select(ApiKey.scopes, *quotas.usage_row(Tenant.id, Tenant.limits, _DEFAULTS))
    .join(Tenant, Tenant.id == ApiKey.tenant_id).where(usable_key(bindparam("key_hash"))))
INSERT_JOB = _insert_statement()
LANE_RANK = _compile(LANE_RANK_SQL)
# One statement that also turns synchronous_commit off for its own (implicit) transaction: the set_config runs in
# a FROM subquery, so the commit does not wait for the WAL flush, without a pipeline of SET LOCAL and the update
# (which cost about 0.5 ms of this process's CPU a submit).
_NO_SYNC = select(func.set_config(literal_column("'synchronous_commit'"), literal_column("'off'"),
                                  literal_column("true")).label("setting")).subquery("no_sync")
MARK_ENQUEUED = _compile(update(_JOBS).where(_JOBS.c.id == func.any(bindparam("job_ids")),
                                             _NO_SYNC.c.setting == literal_column("'off'"))
                         .values(enqueued_at=func.now()).returning(_JOBS.c.id))


def _job(row: dict[str, Any], images: list[dict] | None = None) -> Job:
    """A transient Job of a row (not attached to any session: read it, never change it). Built the way the ORM
    loads a row, by filling the instance's dict: the constructor's instrumented setters cost about 0.2 ms a job
    (a read through this store took 0.4 ms of CPU with them, 0.28 without; docs/PERFORMANCE.md, "Front door: what
    a request costs")."""
    job = _loaded(Job, {attr: row[name] for attr, name in _JOB_ATTRS})
    job.__dict__["images"] = [_loaded(JobImage, image) for image in images or []]
    return job


def _loaded(cls, values: dict[str, Any]):
    instance = cls.__mapper__.class_manager.new_instance()
    instance.__dict__.update(values)
    return instance


def conninfo(url: str) -> str:
    """libpq's connection string of a SQLAlchemy URL (`postgresql+psycopg://...`)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class JobStore:
    """The async pool and the statements. The pool belongs to the server's event loop: the lifespan opens it at
    start and closes it at shutdown. A caller on any other loop (Starlette's TestClient outside `with`, which
    runs each request on a new loop; Schemathesis) gets a plain connection per statement instead: a pool's
    background tasks must not outlive the loop they were started on."""

    def __init__(self, db: DatabaseSettings, send_linger_s: float = 0.0):
        self.db = db
        self._pool: AsyncConnectionPool | None = None
        self._pool_loop: asyncio.AbstractEventLoop | None = None
        self._reachable_at: tuple[float, bool] = (-1e9, True)  # (when asked, the answer): JobStore._reachable
        self._closing: set[asyncio.Task] = set()
        self._background: set[asyncio.Task] = set()  # queue places counted again off the request (queue_place)
        self.sends = SendQueue(self.mark_enqueued, linger_s=send_linger_s)
        self.places = RecentPlaces()
        self.ranks = RecentRanks(self._read_rank)

    def _connect_kwargs(self) -> dict[str, Any]:
        return {"autocommit": True, "row_factory": dict_row, "connect_timeout": 5, "options": server_options(self.db)}

    def _new_pool(self) -> AsyncConnectionPool:
        return AsyncConnectionPool(
            conninfo(self.db.url), min_size=self.db.pool_size, max_size=self.db.pool_size + self.db.max_overflow,
            timeout=self.db.pool_timeout_s, open=False, name="job-store", kwargs=self._connect_kwargs())

    async def open(self) -> None:
        pool = self._new_pool()
        await pool.open(wait=False)
        self._pool, self._pool_loop = pool, asyncio.get_running_loop()
        self.sends.start()

    async def close(self) -> None:
        await self.sends.close()  # what is pending is sent and marked on the pool, before it closes
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.ranks.close()
        pool, self._pool, self._pool_loop = self._pool, None, None
        if pool is not None:
            await pool.close()

    async def _reachable(self) -> bool:
        """Whether Postgres takes a new connection, asked at most once a second (a pool timeout under real
        overload must not add a connection storm)."""
        now = time.monotonic()
        if now - self._reachable_at[0] >= 1.0:
            try:
                async with await psycopg.AsyncConnection.connect(conninfo(self.db.url),
                                                                 **{**self._connect_kwargs(), "connect_timeout": 2}):
                    reachable = True
            except psycopg.OperationalError:
                reachable = False
            self._reachable_at = (now, reachable)
        return self._reachable_at[1]

    async def _checkout(self) -> tuple[AsyncConnectionPool, psycopg.AsyncConnection]:
        """A pooled connection, and the pool to return it to. A pool timeout means one of three things:
        every connection is in use (503 overloaded, PoolTimeout); Postgres is down (503 unavailable,
        OperationalError); or Postgres is back but the pool is still waiting out its reconnect backoff (up to
        tens of seconds after an outage): then a fresh pool replaces it, so recovery is immediate."""
        pool = self._pool
        try:
            return pool, await pool.getconn()
        except PoolTimeout:
            if not await self._reachable():
                raise psycopg.OperationalError("no connection to the database could be made") from None
            if pool.pop_stats().get("connections_errors", 0) == 0:
                raise  # connections are fine, all of them are busy
        if self._pool is pool:  # the first request to find it stale replaces it
            log.warning("database reachable again: replacing the connection pool still backing off from the outage")
            self._pool = self._new_pool()
            await self._pool.open(wait=False)
            closing = asyncio.get_running_loop().create_task(pool.close())
            self._closing.add(closing)  # referenced until done (the loop keeps only weak references)
            closing.add_done_callback(self._closing.discard)
        return self._pool, await self._pool.getconn()

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection]:
        if self._on_server_loop():
            pool, conn = await self._checkout()
            try:
                yield conn
            finally:
                await pool.putconn(conn)  # a broken connection is discarded, not returned
        else:
            async with await psycopg.AsyncConnection.connect(conninfo(self.db.url), **self._connect_kwargs()) as conn:
                yield conn

    async def _fetchone(self, sql: str, params: dict[str, Any]) -> dict | None:
        """One statement's first row. A connection Postgres dropped while it sat in the pool (a restart, an idle
        timeout) fails its first use; that is retried once on a fresh connection, the way the ORM's pre-ping
        does it, instead of answering the caller 503 for a database that is up. The pool's other idle connections
        were most likely dropped with it, so they are checked first (psycopg_pool's `check`: the broken ones are
        replaced). A retried insert could in theory run twice (a reply lost after the commit): the same risk as
        the client's own retry of a 503."""
        for may_retry in (True, False):
            async with self.connection() as conn:
                try:
                    return await (await conn.execute(sql, params)).fetchone()
                except psycopg.OperationalError:
                    if not (may_retry and conn.broken):
                        raise
            if self._on_server_loop():
                await self._pool.check()

    async def tenant_rate(self, key_hash: str) -> str | None:
        """The request rate the key's tenant has of its own (api/rate_limits.py), or None (the default applies,
        also for a key that is not usable: its calls end in a 401 anyway)."""
        row = await self._fetchone(KEY_RATE, {"key_hash": key_hash})
        return None if row is None else row["rate"]

    async def read(self, key_hash: str, job_id: str) -> Job:
        """The caller's job; AuthenticationError for an unusable key, NotFound for a malformed id, a missing job
        or another tenant's (one answer: no existence leak)."""
        try:
            job_uuid = uuid.UUID(job_id)
        except ValueError:
            job_uuid = None
        row = await self._fetchone(READ_JOB, {"key_hash": key_hash, "job_id": job_uuid})
        if row is None:
            await self._refuse(key_hash, "read")
        if job_uuid is None or row["id"] is None:
            raise NotFound(f"job {job_id} not found")
        return _job(row, row["images_json"])

    async def insert(self, key_hash: str, values: dict[str, Any]) -> Job:
        """Insert a job (common.job_states.new_job_values) for the key's tenant, committed when this returns."""
        binds = {name: values[attr] for attr, name in _JOB_ATTRS if name in _INSERTED and attr != "id"}
        binds["id"], binds["key_hash"] = uuid.uuid4(), key_hash
        binds.update(_limit_binds(), num_images=values["params"]["num_images"])
        for attr in _JSONB_ATTRS & values.keys():
            name = dict(_JOB_ATTRS)[attr]
            binds[name] = None if values[attr] is None else Jsonb(values[attr])
        row = await self._fetchone(INSERT_JOB, binds)
        if row is None:
            await self._refuse(key_hash, "submit", adding_images=binds["num_images"])
        return _job(row)

    async def _refuse(self, key_hash: str, scope: str, adding_images: int = 0) -> NoReturn:
        """The statement wrote or read nothing: 401 for a key that does not authenticate, 403 for a valid key
        without the scope (the rule of common.auth.authenticate_hash), else 429: the tenant is at its limit of
        active jobs or of images a day (common.quotas). Asked only on this failure."""
        row = await self._fetchone(KEY_SCOPES, {"key_hash": key_hash, **_limit_binds()})
        if row is None:
            raise AuthenticationError("invalid API key")
        if scope not in row["scopes"]:
            raise Forbidden(f"this API key lacks the `{scope}` scope (it has: {', '.join(row['scopes'])})",
                            field="Authorization")
        raise quotas.refusal(max_active=row["max_active"], active=row["active"], max_images=row["max_images"],
                             images=row["images"], adding=adding_images)

    async def mark_enqueued(self, job_ids: list[uuid.UUID]) -> None:
        """Record that the jobs' messages were sent, without waiting for the WAL flush: the mark is advisory
        (common.dispatch) and a lost one only means a second, harmless send. One statement (MARK_ENQUEUED).
        It runs after the jobs were answered and sent, so a database error here is logged, not raised."""
        try:
            await self._fetchone(MARK_ENQUEUED, {"job_ids": job_ids})
        except (psycopg.OperationalError, PoolTimeout) as exc:
            log.warning("%d jobs were sent but not marked enqueued (maintenance will send them again): %s",
                        len(job_ids), exc)

    async def queue_place(self, job: Job, *, new: bool = False) -> QueuePlace | None:
        """common.queue_position.queue_place on this pool: the same statements, the same throughput cache, the
        answer kept a second per job (api/recent_places.py); `new`: the job was just inserted, the newest of its
        queue. A place counted before is answered at once, and counted again in the background when its second is
        over; only a place never counted here is counted while the caller waits. None when the job is not queued,
        or when the database fails here: the job itself was read or committed already, and its answer without a
        position beats a 503 (which, after a submit, invites a duplicate)."""
        if job.status != JobStatus.QUEUED:
            return None
        if new:
            place, count = self.places.of_new(job.queue)
            known = place is not None
            if known:
                self.places.remember(job.id, place)  # its polls within the TTL are answered from it
        else:
            known, place, count = self.places.of(job.id)
        if not count:
            return place
        if known and self._on_server_loop():
            self._in_background(self._count_place(job, new=new))
            return place
        return await self._count_place(job, new=new)

    async def _count_place(self, job: Job, *, new: bool) -> QueuePlace | None:
        """Count the job's place (this caller was told to by self.places) and keep it."""
        try:
            place = await self._queue_place(job)
        except BaseException as exc:
            self.places.forget_count(job.queue if new else job.id)
            if not isinstance(exc, (psycopg.OperationalError, PoolTimeout)):
                raise
            log.warning("queue position of job %s not read: %s", job.id, exc)
            return None
        if new:
            self.places.remember_new(job.queue, place, cached_throughput(self.db.url)[1])
        self.places.remember(job.id, place)
        return place

    def _on_server_loop(self) -> bool:
        """Whether this runs on the loop the pool was opened on (the server's, where a task outlives the request)."""
        return self._pool is not None and self._pool_loop is asyncio.get_running_loop()

    def _in_background(self, work) -> None:
        """Run `work` as a task of its own: referenced until done (the loop keeps only weak references), its
        failure logged (nobody awaits it), cancelled at close."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("a background count failed", exc_info=task.exception())

    async def _queue_place(self, job: Job) -> QueuePlace | None:
        position = await self._position(job)
        if position is None:
            return None  # it left the queue since it was read
        hit, rate = cached_throughput(self.db.url)
        if not hit:
            sample = await self._fetchone(_compile(THROUGHPUT_SQL), THROUGHPUT_PARAMS)
            rate = remember_throughput(self.db.url, sample["n"], sample["span_s"])
        return QueuePlace(position=position, eta_s=eta_s(position, rate))

    async def _position(self, job: Job) -> int | None:
        """The job's position: from its lane's ranking (api/recent_places.RecentRanks) for a job of a broker list on
        the server's loop, else (or when the ranking cannot place it) its own count."""
        batch_item = job.batch_id is not None
        if not batch_item and self._on_server_loop():
            position = (await self.ranks.of(job.queue)).position(job.id, job.created_at)
            if position is not None:
                return position
        sql, params = position_query(job_id=job.id, queue=job.queue, batch_item=batch_item)
        row = await self._fetchone(_compile(sql), params)
        return None if row is None or row["position"] is None else int(row["position"])

    async def _read_rank(self, queue: str) -> LaneRank:
        return LaneRank.of_row(await self._fetchone(LANE_RANK, {"queue": queue, "higher": lanes_before(queue)}))
