"""A background pass run every period: the shape of the maintenance loop, the batch feeder and the webhook
due-events pass. A failing pass (Postgres or Redis down) is logged and the next one runs on time."""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class PeriodicThread(threading.Thread):
    """Calls `pass_fn()` every `period_s` seconds (the first after one period) until `stop()`; a daemon."""

    def __init__(self, name: str, period_s: float, pass_fn: Callable[[], object]):
        super().__init__(name=name, daemon=True)
        self.period_s, self.pass_fn = period_s, pass_fn
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.period_s):
            try:
                self.pass_fn()
            except Exception as exc:  # noqa: BLE001 - infrastructure down: try again next period
                log.warning("%s pass failed: %s", self.name, exc)

    def stop(self) -> None:
        self._halt.set()
