"""Draining on preemption. SIGTERM (Celery's warm shutdown) or a spot notice stops the worker taking jobs; the
running job may finish within the grace period, after which it is interrupted at the next step boundary and
returned to `queued` (a preemption costs no attempt)."""
from __future__ import annotations

import logging
import os
import signal
import threading
import time

import httpx

log = logging.getLogger(__name__)


class Drain:
    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self._deadline: float | None = None
        self._lock = threading.Lock()

    def start(self, reason: str) -> None:
        with self._lock:
            if self._deadline is None:
                self._deadline = time.monotonic() + self.grace_s
                log.warning("draining (%s): the running job has %.0fs to finish", reason, self.grace_s)

    @property
    def draining(self) -> bool:
        return self._deadline is not None

    def expired(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline


class SpotNoticeWatcher(threading.Thread):
    """Polls a preemption-notice URL: AWS `http://169.254.169.254/latest/meta-data/spot/instance-action` answers
    404 until a stop is scheduled, then 200; GCP's `.../computeMetadata/v1/instance/preempted` answers "TRUE".
    On a notice it starts the drain and sends this process SIGTERM so Celery stops consuming."""

    def __init__(self, url: str, drain: Drain, period_s: float = 5.0):
        super().__init__(name="spot-notice", daemon=True)
        self.url, self.drain, self.period_s = url, drain, period_s

    def notice_seen(self) -> bool:
        try:
            resp = httpx.get(self.url, timeout=2.0, headers={"Metadata-Flavor": "Google", **self._imds_token()})
        except httpx.HTTPError:
            return False
        return resp.status_code == 200 and resp.text.strip().upper() not in ("", "FALSE")

    def _imds_token(self) -> dict[str, str]:
        """AWS instances that require IMDSv2 answer 401 to a GET without a session token: ask the metadata
        service for one first (`PUT /latest/api/token`). Elsewhere (GCP, IMDSv1, a test server) the PUT fails
        or is refused and the GET goes without it."""
        parsed = httpx.URL(self.url)
        if "/latest/meta-data/" not in parsed.path:
            return {}
        try:
            resp = httpx.put(parsed.copy_with(path="/latest/api/token", query=None), timeout=2.0,
                             headers={"X-aws-ec2-metadata-token-ttl-seconds": "300"})
        except httpx.HTTPError:
            return {}
        return {"X-aws-ec2-metadata-token": resp.text.strip()} if resp.status_code == 200 else {}

    def run(self) -> None:
        while not self.drain.draining:
            if self.notice_seen():
                self.drain.start("spot preemption notice")
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(self.period_s)
