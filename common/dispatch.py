"""Dispatch: hand committed queued jobs to the broker, then record them as enqueued. The one place that does
"send, then mark": the API at submit, the batch feeder, a worker giving a job back, and maintenance re-enqueueing
what Redis lost.

Postgres is the truth: a job is committed `queued` before its message is sent, so a send that fails (Redis down)
loses nothing: the job keeps `enqueued_at IS NULL` and maintenance sends it later. A message sent twice is
harmless (the claim makes the second delivery a no-op).
"""
from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable

from sqlalchemy import text
from sqlalchemy.orm import Session

from common import job_states
from common.broker import enqueue_generate
from common.db import session_scope

log = logging.getLogger(__name__)

Send = Callable[[uuid.UUID, str], None]


def dispatch(jobs: Iterable[tuple[uuid.UUID, str]], *, session: Session | None = None,
             send: Send = enqueue_generate) -> list[uuid.UUID]:
    """Send each (job id, queue), in order, then mark the sent ones enqueued: in `session` when given (the
    caller commits), else in a transaction of its own. Stops at the first failed send (the broker is down: the
    rest would fail too) and never raises for it. Returns the ids sent."""
    sent = send_in_order(jobs, send=send)
    if sent:
        if session is not None:
            _mark_sent(session, sent)
        else:
            with session_scope() as own:
                _mark_sent(own, sent)
    return sent


def send_in_order(jobs: Iterable[tuple[uuid.UUID, str]], *, send: Send = enqueue_generate) -> list[uuid.UUID]:
    """The sending half of `dispatch`, for a caller that marks the sent jobs itself (the API's async submit,
    api/job_store.py, marks with the same advisory, no-WAL-wait commit as `_mark_sent`)."""
    sent: list[uuid.UUID] = []
    for job_id, queue in jobs:
        try:
            send(job_id, queue)
        except Exception as exc:  # noqa: BLE001 - any broker failure: Postgres keeps the job, maintenance resends
            log.warning("enqueue of job %s failed (%s); maintenance will send it", job_id, exc)
            break
        sent.append(job_id)
    return sent


def _mark_sent(session: Session, job_ids: list[uuid.UUID]) -> None:
    # `enqueued_at` is advisory (it tells maintenance which jobs may have lost their message): a mark lost in a
    # Postgres crash only makes maintenance send a job again, and a duplicate delivery is a no-op at claim. So
    # this transaction does not wait for its WAL flush (one fsync less per submit: measured in PERFORMANCE.md).
    session.execute(text("SET LOCAL synchronous_commit TO OFF"))
    job_states.mark_enqueued(session, job_ids)
