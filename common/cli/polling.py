"""Poll a predicate until it gives something truthy or a deadline passes: the one wait loop for code (the e2e
bench) and tests that watch real processes."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, interval: float = 0.2, what: str = "condition") -> T:
    """The first truthy value of `predicate()`, called every `interval` seconds; TimeoutError naming `what`
    once `timeout` seconds have passed without one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached within {timeout:g}s")
