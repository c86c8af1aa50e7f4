"""When to try a webhook delivery again, and what an attempt's result means.

Delivery is at-least-once on a fixed schedule (WebhookSettings.retry_schedule_s: at once, 5 s, 5 min, 30 min,
2 h, 5 h, 10 h, 10 h). Jitter spreads the retries of many events that failed together (a receiver outage) so
they do not all return at the same second. A receiver's `Retry-After` can push an attempt later, never earlier,
and never more than a day: a hostile or broken header must not park an event forever.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Literal, Protocol

MAX_RETRY_AFTER_S = 24 * 3600.0

Outcome = Literal["success", "retry", "disable", "refused"]


class AttemptResult(Protocol):
    """What `classify` reads of an attempt's result (common.webhooks.client.DeliveryResult)."""

    refused: bool
    status_code: int | None


def next_attempt_delay(
    attempt_number: int,
    schedule: Sequence[float],
    jitter: float,
    rng: random.Random | None = None,
    *,
    retry_after_s: float | None = None,
) -> float | None:
    """Seconds to wait before attempt `attempt_number` (1-based), or None when the schedule is exhausted.

    Attempt 1 waits schedule[0] (0: at once) from the event; attempt n waits schedule[n-1] after attempt n-1
    failed. With `jitter` j the delay is scaled by a uniform factor in [1-j, 1+j]. `retry_after_s` from the
    previous response raises the delay to at least that (capped at MAX_RETRY_AFTER_S); it never adds attempts.
    """
    if attempt_number < 1:
        raise ValueError("attempt numbers start at 1")
    if attempt_number > len(schedule):
        return None
    delay = float(schedule[attempt_number - 1])
    if jitter:
        delay *= 1 + (rng or random).uniform(-jitter, jitter)
    if retry_after_s is not None:
        delay = max(delay, min(retry_after_s, MAX_RETRY_AFTER_S))
    return max(delay, 0.0)


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """A `Retry-After` header in seconds from now: delta-seconds ("120") or an HTTP-date; None if absent or
    unparseable. A date in the past means "now" (0)."""
    if not value or not (value := value.strip()):
        return None
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" dates parse naive; HTTP-dates are GMT
        when = when.replace(tzinfo=UTC)
    return max((when - (now or datetime.now(UTC))).total_seconds(), 0.0)


def classify(result: AttemptResult) -> Outcome:
    """What to do after an attempt.

    - "success": a 2xx answer.
    - "disable": 410 Gone, the receiver's way of saying "stop sending here"; disable the endpoint.
    - "refused": the SSRF guard refused the target at delivery time (it now resolves to a forbidden address);
      no connection was made and retrying will not make the URL safe: stop, record the reason.
    - "retry": everything else (network errors, timeouts, 3xx since redirects are not followed, 4xx, 5xx),
      until next_attempt_delay says the schedule is exhausted.
    """
    if result.refused:
        return "refused"
    if result.status_code is not None and 200 <= result.status_code < 300:
        return "success"
    if result.status_code == 410:
        return "disable"
    return "retry"
