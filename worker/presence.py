"""The worker's entry in the fleet's registry (common.fleet): every few seconds, what this worker is (host, GPU,
variant, capacity) and what it is doing (warming, ready or draining; the job it is generating). `letterpress
status` reads it. A thread, so a long generation step never delays it; it never raises (Redis down: the entry
expires and the worker looks gone until Redis answers again, while jobs go on)."""
from __future__ import annotations

import logging
import os
import socket
import threading
from datetime import datetime, timezone

import redis as redis_lib

from common.fleet import announce, withdraw

log = logging.getLogger(__name__)
TTL_PERIODS = 3  # an entry outlives three missed announcements


class Presence(threading.Thread):
    def __init__(self, ctx, redis_url: str, period_s: float):
        super().__init__(name="presence", daemon=True)
        self.ctx, self.period_s = ctx, period_s
        self.client = redis_lib.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=2)
        self.started_at = datetime.now(timezone.utc).isoformat()
        self.ready = False  # set once the pipeline is warm
        self._halt = threading.Event()

    def info(self) -> dict:
        ctx = self.ctx
        state = "draining" if ctx.drain.draining else "ready" if self.ready else "warming"
        current = ctx.current_job
        return {"host": socket.gethostname(), "pid": os.getpid(), "state": state,
                "gpu_kind": getattr(ctx.runner, "gpu_kind", ""), "variant": getattr(ctx.runner, "variant", ""),
                "model": getattr(ctx.runner, "model_id", ""), "capacity": ctx.settings.worker.capacity,
                # the scope of this worker's result-cache keys: the API answers cache hits at submit with it
                # (common/cache_answers.py); empty while warming, so nothing is answered for a config not running
                "revision": getattr(ctx.runner, "revision", None),
                "cache_scope": getattr(ctx.runner, "config", "") if self.ready else "",
                "current_job": str(current) if current else None, "started_at": self.started_at,
                "seen_at": datetime.now(timezone.utc).isoformat()}

    def beat(self) -> None:
        try:
            announce(self.client, self.ctx.worker_id, self.info(), ttl_s=self.period_s * TTL_PERIODS)
        except redis_lib.RedisError as exc:
            log.warning("presence: could not announce this worker (%s); will retry", exc)

    def run(self) -> None:
        while True:
            self.beat()
            if self._halt.wait(self.period_s):
                return

    def stop(self) -> None:
        """Leave the registry now (a clean shutdown), instead of after the TTL."""
        self._halt.set()
        try:
            withdraw(self.client, self.ctx.worker_id)
        except redis_lib.RedisError:
            pass  # the entry expires by itself
