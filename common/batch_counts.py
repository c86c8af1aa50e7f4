"""How many of a batch's items are in each status: the `request_counts` of the batch object (the API's responses
and the batch.* webhook payloads), one GROUP BY over the (batch_id, status) index."""
from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from common.models import Job


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
