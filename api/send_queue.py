"""The broker sends of `POST /v1/jobs`, off the request: a submit commits its job and answers; one task per API
process sends the messages of the jobs submitted meanwhile, in submit order, over one pooled producer, then marks
them all enqueued in one statement (JobStore.mark_enqueued).

Why: the send and the mark were a threadpool hop, a producer taken from the pool and a statement per submit, about
a third of a submit's CPU in the API (docs/PERFORMANCE.md, "Front door: the hot calls"). Under load the sends
group by themselves (while one run is being sent the next gathers), so their cost per job falls as the rate
rises. Each run also waits `linger_s` (the setting `api.send_linger_ms`, 20 ms by default) after the first job
of a run arrives, so the submits of those milliseconds share its thread hop, Redis pipeline and mark: at 200
submits a second into one process, runs were of one or two jobs. Over HTTP at 400 submits a second that saved
about 0.2–0.3 ms of API CPU a submit (docs/PERFORMANCE.md, "sends that wait for company"). A job leaves at most
that much later, which a queue of seconds-long generations does not notice.

Nothing is lost by answering first: Postgres is the truth (common.dispatch). A job whose message is not sent (the
process died before its turn, Redis was down) keeps `enqueued_at IS NULL`, and maintenance sends it
(common.job_states.lost_enqueues); a message sent twice is harmless (the claim makes the second a no-op).
The lifespan drains the queue at shutdown.

A caller on another event loop than the one the queue was started on (Starlette's TestClient outside `with`, which
runs each request on a loop of its own) has its job sent at once instead: a task on that loop would not outlive
the request.
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable

from starlette.concurrency import run_in_threadpool

from common.broker import generate_sender
from common.dispatch import send_in_order

log = logging.getLogger(__name__)
MAX_RUN = 500  # messages sent over one producer and marked by one statement at most

Job = tuple[uuid.UUID, str]  # (job id, broker queue)
Mark = Callable[[list[uuid.UUID]], Awaitable[None]]


def send_run(jobs: list[Job]) -> list[uuid.UUID]:
    """Send the run in order over one producer, in one Redis pipeline (common.broker.generate_sender); the ids
    sent: none when the pipeline failed, so nothing unsent is marked (maintenance sends the run again)."""
    try:
        with generate_sender() as send:
            return send_in_order(jobs, send=send)
    except Exception as exc:  # noqa: BLE001 - no producer (Redis down): Postgres keeps the jobs, maintenance sends
        log.warning("could not send %d jobs (%s); maintenance will send them", len(jobs), exc)
        return []


class SendQueue:
    def __init__(self, mark: Mark, linger_s: float = 0.0):
        self._mark = mark
        self._linger_s = linger_s
        self._pending: list[Job] = []
        self._wake = asyncio.Event()  # made again by `start`, on the loop that sends
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._closing = False

    def start(self) -> None:
        """Start sending on the running loop (the server's, from the app's lifespan)."""
        self._loop, self._closing = asyncio.get_running_loop(), False
        self._wake = asyncio.Event()
        self._task = self._loop.create_task(self._run(), name="send-queue")

    async def close(self) -> None:
        """Send what is pending, then stop."""
        task = self._task
        if task is None:
            return
        self._closing = True
        self._wake.set()
        await task
        self._task = self._loop = None

    async def send(self, job_id: uuid.UUID, queue: str) -> None:
        """Have the job's message sent: after this returns on the server's loop, at once on any other."""
        if self._task is None or self._loop is not asyncio.get_running_loop():
            return await self._deliver([(job_id, queue)])
        self._pending.append((job_id, queue))
        self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def _run(self) -> None:
        while not self._closing or self._pending:
            await self._wake.wait()
            if self._linger_s > 0 and not self._closing:
                await asyncio.sleep(self._linger_s)  # the submits of the next few milliseconds join this run
            self._wake.clear()
            while self._pending:
                await self._send_next()

    async def _send_next(self) -> None:
        run, self._pending = self._pending[:MAX_RUN], self._pending[MAX_RUN:]
        await self._deliver(run)

    async def _deliver(self, run: list[Job]) -> None:
        """Send the run and mark what was sent; any failure is logged (maintenance sends what stays unmarked)."""
        try:
            sent = await run_in_threadpool(send_run, run)
            if sent:
                await self._mark(sent)
        except Exception:  # noqa: BLE001 - the queue must outlive any one run; maintenance sends what is unmarked
            log.exception("sending %d jobs failed; maintenance will send them", len(run))
