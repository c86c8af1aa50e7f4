"""The batch feeder: keeps the broker's "batch" queue topped up from Postgres to a bounded depth, and finalizes
batches that have nothing left to run.

Why a feeder: a million-item batch enqueued at submit would put a million messages in Redis (memory grows with the
batch) and Redis would decide the order of work. Instead the items wait in Postgres (`enqueued_at` NULL) and
every `feed_period_s` one feeder (a Postgres advisory lock elects it among the worker processes) sends at most
`feed_depth - LLEN(batch)` of them, by weighted fair share across tenants and batches (priority lanes:
common.fair_share, common.batches.feed_candidates). So:
- Redis holds at most `feed_depth` batch messages whatever the batch size;
- concurrent batches and tenants share the GPUs by their priorities' weights, since each top-up interleaves them
  and a shallow queue lets a new high-priority batch overtake within `feed_depth` items;
- interactive jobs (sent to their lane's list at submit) never wait behind a batch message: workers serve the
  lists strictly in order (common.broker.QUEUES), and while any interactive message waits the feeder adds no batch
  work (`interactive_first`), so the batch list stays short and reflects the fair share of the moment.

Lost messages: maintenance's lost-enqueue recovery skips batch items (common.job_states.lost_enqueues); the feeder
owns them. Items fed long ago and still queued while the broker's batch list is empty lost their message (Redis
restarted or flushed): they are marked unfed and fed again. A duplicate delivery is a no-op at claim.

It runs as its own thread beside the maintenance loop (worker/maintenance.py starts it) rather than inside the
maintenance pass, because it needs a period of a fraction of a second to keep GPUs busy with a shallow queue,
while maintenance runs every few seconds.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

from sqlalchemy import func, select

from common import batches
from common.broker import BATCH_QUEUE, enqueue_generate, interactive_depth, queue_depth
from common.db import session_scope
from common.dispatch import dispatch
from common.settings import BatchSettings, Settings
from common.storage import Storage, shared_storage
from worker.periodic import PeriodicThread

log = logging.getLogger(__name__)
ADVISORY_LOCK_ID = 0x4C50_4644  # "LPFD"


@dataclass
class FeedResult:
    depth: int | None = None          # LLEN of the batch queue before the top-up (None: Redis unreachable)
    fed: int = 0
    stale_reset: int = 0
    finalized: list[tuple[uuid.UUID, str]] = field(default_factory=list)


class Feeder:
    def __init__(self, settings: Settings, batch_settings: BatchSettings | None = None, *,
                 storage: Storage | None = None, send: Callable[[uuid.UUID, str], None] = enqueue_generate):
        self.settings = settings
        self.cfg = batch_settings or settings.batches
        self.storage = storage or shared_storage(settings.storage)
        self.send = send
        self._last_stale_check = float("-inf")

    def depth(self, queue: str) -> int | None:
        return queue_depth(self.settings.redis.url, queue)

    def run_once(self) -> FeedResult:
        result = self.feed()
        result.finalized = self.finalize()
        return result

    def feed(self) -> FeedResult:
        """One top-up of the batch queue to `feed_depth`. The depth is read while holding the feeders' lock: read
        before it, two workers' feeders could each see the same shallow queue and both fill it (overshooting
        `feed_depth` by up to twice)."""
        early = self.depth(BATCH_QUEUE)
        if early is not None and early >= self.cfg.feed_depth:
            return FeedResult(depth=early)  # full: no need for the lock (the usual case between top-ups)
        result = FeedResult()
        with session_scope() as session:
            if not session.scalar(select(func.pg_try_advisory_xact_lock(ADVISORY_LOCK_ID))):
                return result  # another worker's feeder is in its pass
            result.depth = self.depth(BATCH_QUEUE)
            if result.depth is None:
                return result  # Redis down: nothing can be sent; Postgres keeps the items
            room = self.cfg.feed_depth - result.depth
            if self.cfg.interactive_first and (interactive_depth(self.settings.redis.url) or 0) > 0:
                room = 0
            stale_after = self.settings.worker.requeue_after_s
            if result.depth == 0 and time.monotonic() - self._last_stale_check >= stale_after / 2:
                self._last_stale_check = time.monotonic()
                result.stale_reset = batches.reset_stale_fed(session, older_than_s=stale_after)
            # Feeding stamps batch rows; after a reset this transaction holds job locks, and a batch row locked
            # after job locks would break the one lock order (common.batches.lock_batch): feed at the next pass.
            if room > 0 and not result.stale_reset:
                candidates = [(job_id, BATCH_QUEUE) for job_id, _batch_id in batches.feed_candidates(
                    session, room=room, group_by_adapter=self.cfg.group_by_adapter,
                    weights=self.cfg.priority_weights)]
                result.fed = len(dispatch(candidates, session=session, send=self.send))
        if result.fed or result.stale_reset:
            log.info("feeder: depth %s, fed %d, stale reset %d", result.depth, result.fed, result.stale_reset)
        return result

    def finalize(self) -> list[tuple[uuid.UUID, str]]:
        """Batches with nothing queued or running: write the manifest, then the final status. Safe to run in
        every worker at once: `begin_finalizing` is a compare-and-set and the manifest write is idempotent."""
        retry_s = self.cfg.finalize_retry_s
        with session_scope() as session:
            due = batches.due_for_finalizing(session, retry_after_s=retry_s)
        done = []
        for batch_id in due:
            with session_scope() as session:
                batch = batches.begin_finalizing(session, batch_id=batch_id, retry_after_s=retry_s)
            if batch is None:
                continue
            try:
                with session_scope() as session:
                    data = batches.manifest_bytes(session, batch_id=batch_id)
                self.storage.put(batch.manifest_key, data, content_type="application/x-ndjson")
                with session_scope() as session:
                    status = batches.finish_finalizing(session, batch=batch)
            except Exception as exc:  # noqa: BLE001 - storage/DB trouble: retried after finalize_retry_s
                log.warning("feeder: finalizing batch %s failed (%s); will retry", batch_id, exc)
                continue
            if status is not None:
                log.info("batch %s %s (%d bytes of manifest at %s)", batch_id, status, len(data), batch.manifest_key)
                done.append((batch_id, status))
        return done


def _feed_pass(settings: Settings, cfg: BatchSettings) -> Callable[[], object]:
    """One feeder pass, the Feeder made on the first (in the feeder's thread, retried if it cannot be made)."""
    feeder: Feeder | None = None

    def feed_once() -> FeedResult:
        nonlocal feeder
        feeder = feeder or Feeder(settings, cfg)
        return feeder.run_once()
    return feed_once


_thread: PeriodicThread | None = None
_thread_lock = threading.Lock()


def start_feeder(settings: Settings) -> PeriodicThread:
    """Start this process's feeder thread once (idempotent)."""
    global _thread
    with _thread_lock:
        if _thread is None or not _thread.is_alive():
            _thread = PeriodicThread("batch-feeder", settings.batches.feed_period_s,
                                     _feed_pass(settings, settings.batches))
            _thread.start()
        return _thread
