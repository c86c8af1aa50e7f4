"""The maintenance loop: expired leases -> requeue (or dead letter), lost enqueues -> re-enqueue, due webhook
events -> the delivery queue.

Postgres is the truth and Redis only delivers, so anything Redis lost is found here. Every worker runs this loop
in a thread (and `letterpress maintenance` runs it alone); a Postgres advisory lock lets one pass run at a time.
"""
from __future__ import annotations

import logging
import time

from sqlalchemy import func, select

from common import job_states
from common.broker import QUEUES, queue_empty
from common.db import session_scope
from common.dispatch import dispatch
from common.settings import Settings, get_settings
from common.webhooks import outbox
from worker import metrics
from worker.feeder import start_feeder
from worker.periodic import PeriodicThread

log = logging.getLogger(__name__)
ADVISORY_LOCK_ID = 0x4C50_4D41  # "LPMA"


def maintenance_pass(settings: Settings) -> dict[str, int]:
    """One pass. Returns counts for logs and tests."""
    counts = {"requeued": 0, "dead": 0, "reenqueued": 0}
    # Jobs enqueued long ago count as lost only when the broker queue is empty: a deep queue of a big batch is
    # waiting, not lost. Asked before the locked transaction, so Redis round trips never hold the lock.
    empty = {queue: queue_empty(settings.redis.url, queue) for queue in QUEUES}
    with session_scope() as session:
        if not session.scalar(select(func.pg_try_advisory_xact_lock(ADVISORY_LOCK_ID))):
            return counts
        requeued, dead = job_states.recover_expired_leases(session)
        counts["requeued"], counts["dead"] = len(requeued), len(dead)
        to_enqueue: list[tuple] = []
        for queue in QUEUES:
            stale = settings.worker.requeue_after_s if empty[queue] else None
            to_enqueue += [(jid, queue) for jid in job_states.lost_enqueues(session, queue=queue,
                                                                            stale_after_s=stale)]
    counts["reenqueued"] = len(dispatch(to_enqueue))  # Redis still down: the rest wait for the next pass
    counts["webhooks"] = outbox.enqueue_due(settings)  # due webhook retries and lost sends (common/webhooks/outbox.py)
    metrics.LEASES_EXPIRED.inc(counts["requeued"] + counts["dead"])
    metrics.ATTEMPTS_EXHAUSTED.inc(counts["dead"])
    metrics.REENQUEUED.inc(counts["reenqueued"])
    if any(counts.values()):
        log.info("maintenance: %s", counts)
    return counts


def start_maintenance(settings: Settings) -> PeriodicThread:
    """This process's maintenance loop, and beside it the batch feeder (which tops up the broker at its own
    period)."""
    start_feeder(settings)
    thread = PeriodicThread("maintenance", settings.worker.maintenance_period_s, lambda: maintenance_pass(settings))
    thread.start()
    return thread


def main() -> None:
    """`letterpress maintenance`: the loop alone, for deployments that want it outside the workers."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    metrics.serve(settings.worker.metrics_port)
    start_feeder(settings)
    while True:
        try:
            maintenance_pass(settings)
        except Exception as exc:  # noqa: BLE001
            log.warning("maintenance pass failed: %s", exc)
        time.sleep(settings.worker.maintenance_period_s)


if __name__ == "__main__":
    main()
