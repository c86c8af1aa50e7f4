"""Heartbeat for one attempt: renews the lease, writes throttled progress, and notices cancel requests and a
lost lease. Runs in a thread so the generation loop never waits on Postgres."""
from __future__ import annotations

import logging
import threading
import time
import uuid

from common import job_states
from common.db import session_scope
from common.errors import LeaseLost
from worker import metrics

log = logging.getLogger(__name__)


class AttemptMonitor(threading.Thread):
    def __init__(self, *, job_id: uuid.UUID, token: uuid.UUID, ttl_s: float, heartbeat_s: float,
                 progress_interval_s: float):
        super().__init__(name=f"heartbeat-{job_id}", daemon=True)
        self.job_id, self.token, self.ttl_s = job_id, token, ttl_s
        self.heartbeat_s, self.progress_interval_s = heartbeat_s, progress_interval_s
        self.lease_lost = threading.Event()
        self.cancel_requested = threading.Event()
        self._halt = threading.Event()
        self._step = 0
        self._total: int | None = None
        self._written_step = -1

    def report(self, step: int, total: int) -> None:
        """Called from the generation loop at every step; cheap (no I/O)."""
        self._step, self._total = step, total

    def beat(self) -> None:
        step = self._step if self._step != self._written_step else None
        try:
            with session_scope() as session:
                cancel = job_states.heartbeat(session, job_id=self.job_id, token=self.token, ttl_s=self.ttl_s,
                                              progress_step=step, progress_total=self._total)
            metrics.LEASE_RENEWALS.inc()
            if step is not None:
                self._written_step = step
            if cancel:
                self.cancel_requested.set()
        except LeaseLost:
            log.warning("job %s: lease lost; stopping this attempt", self.job_id)
            metrics.LEASE_LOSSES.inc()
            self.lease_lost.set()
        except Exception as exc:  # noqa: BLE001 - Postgres blips: keep generating, try again next beat
            log.warning("job %s: heartbeat failed (%s); will retry", self.job_id, exc)

    def run(self) -> None:
        last_beat = time.monotonic()
        while not self._halt.wait(self.progress_interval_s):
            due = time.monotonic() - last_beat >= self.heartbeat_s
            if due or self._step != self._written_step:
                self.beat()
                last_beat = time.monotonic()
            if self.lease_lost.is_set():
                return

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=10)
