"""How many of a batch's items are in each status: the `request_counts` of the batch object (the API's responses
and the batch.* webhook payloads), one GROUP BY over the (batch_id, status) index; and how fast they finish now
(`completion_rate`: the rate and ETA of the batch's event stream, api/event_streams.py)."""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import DateTime, Uuid, bindparam, func, select, text
from sqlalchemy.orm import Session

from common.models import Job, JobStatus


@dataclass
class RequestCounts:
    total: int = 0
    queued: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0
    canceled: int = 0

    @property
    def open(self) -> int:
        return self.queued + self.running


def request_counts(session: Session, batch_ids: list[uuid.UUID]) -> dict[uuid.UUID, RequestCounts]:
    """Counts by status for each batch: one GROUP BY over the (batch_id, status) index."""
    counts: dict[uuid.UUID, RequestCounts] = {bid: RequestCounts() for bid in batch_ids}
    if not batch_ids:
        return counts
    for bid, status, n in session.execute(select(Job.batch_id, Job.status, func.count())
                                          .where(Job.batch_id.in_(batch_ids)).group_by(Job.batch_id, Job.status)):
        setattr(counts[bid], status, n)
        counts[bid].total += n
    return counts


# --------------------------------------------------------------------------------- rate and ETA (batch event streams)

RATE_WINDOW_S = 300.0  # "recent": items finished in the last five minutes
RATE_SAMPLE = 200      # at most this many finishes are read; a fast batch's rate comes from their span

# The batch's latest finishes (succeeded or failed: canceled items took no time) in the window, newest first, on the
# partial index ix_jobs_batch_finished (migration 0015): at most RATE_SAMPLE index entries, however large the batch.
# The statuses are literals so that the index's predicate is provably implied under any plan.
FINISHES_SQL = text(f"""
SELECT count(*) AS n, extract(epoch FROM now() - min(finished_at)) AS span_s,
       extract(epoch FROM now() - :since) AS elapsed_s
FROM (SELECT finished_at FROM jobs
      WHERE batch_id = :batch_id AND status IN ('{JobStatus.SUCCEEDED}', '{JobStatus.FAILED}')
        AND finished_at > now() - make_interval(secs => :window)
      ORDER BY finished_at DESC LIMIT :sample) recent
""").bindparams(bindparam("since", type_=DateTime(timezone=True)), bindparam("batch_id", type_=Uuid()))


@dataclass(frozen=True)
class CompletionRate:
    per_min: float | None  # items finished a minute, recently; None: none finished in the window
    eta_s: float | None    # seconds until the open items are finished at that rate; None when unknown


def completion_rate(session: Session, *, batch_id: uuid.UUID, since: datetime, remaining: int) -> CompletionRate:
    """How fast the batch's items finish now, and when its `remaining` (queued and running) ones will have: the
    last RATE_SAMPLE finishes within RATE_WINDOW_S over the time they span when there are that many (a fast
    batch: its latest, exact rate), else the finishes in the window over the window, or over the time since
    `since` (the batch's start) when that is shorter (a young batch). One statement (FINISHES_SQL)."""
    row = session.execute(FINISHES_SQL, {"batch_id": batch_id, "since": since, "window": RATE_WINDOW_S,
                                         "sample": RATE_SAMPLE}).one()
    if not row.n:
        return CompletionRate(None, 0.0 if remaining == 0 else None)
    if row.n >= RATE_SAMPLE and row.span_s and row.span_s > 0:
        per_s = row.n / float(row.span_s)
    else:
        per_s = row.n / max(min(RATE_WINDOW_S, float(row.elapsed_s)), 1.0)
    return CompletionRate(round(per_s * 60, 2), round(remaining / per_s, 1))
