import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from common.settings import WebhookSettings
from common.webhooks.client import DeliveryResult
from common.webhooks.schedule import (
    MAX_RETRY_AFTER_S,
    classify,
    next_attempt_delay,
    parse_retry_after,
)

SCHEDULE = WebhookSettings().retry_schedule_s


def test_default_schedule_without_jitter():
    delays = [next_attempt_delay(n, SCHEDULE, 0) for n in range(1, 10)]
    assert delays == [0, 5, 300, 1800, 7200, 18000, 36000, 36000, None]


def test_attempt_numbers_start_at_one():
    with pytest.raises(ValueError):
        next_attempt_delay(0, SCHEDULE, 0)


def test_jitter_stays_within_bounds_and_varies():
    rng = random.Random(7)
    delays = [next_attempt_delay(3, SCHEDULE, 0.1, rng) for _ in range(200)]
    assert all(270 <= d <= 330 for d in delays)
    assert len(set(delays)) > 100
    assert next_attempt_delay(1, SCHEDULE, 0.1, rng) == 0  # "at once" stays at once


def test_retry_after_raises_the_delay_but_never_lowers_it_and_is_capped():
    assert next_attempt_delay(2, SCHEDULE, 0, retry_after_s=120) == 120
    assert next_attempt_delay(3, SCHEDULE, 0, retry_after_s=10) == 300
    assert next_attempt_delay(2, SCHEDULE, 0, retry_after_s=10**9) == MAX_RETRY_AFTER_S
    assert next_attempt_delay(9, SCHEDULE, 0, retry_after_s=60) is None  # no extra attempts


def test_parse_retry_after():
    now = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
    assert parse_retry_after("120") == 120
    assert parse_retry_after(" 30 ") == 30
    assert parse_retry_after(format_datetime(now + timedelta(seconds=90), usegmt=True), now=now) == 90
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=now) == 0
    for bad in (None, "", "soon", "-5", "1.5", "Wed, 99 Foo 2015"):
        assert parse_retry_after(bad, now=now) is None


def result(status=None, refused=False):
    return DeliveryResult(status_code=status, error=None, duration_ms=1, refused=refused)


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
def test_2xx_is_success(status):
    assert classify(result(status)) == "success"


def test_410_disables():
    assert classify(result(410)) == "disable"


@pytest.mark.parametrize("status", [None, 301, 302, 400, 401, 404, 429, 500, 502, 503])
def test_everything_else_retries(status):
    assert classify(result(status)) == "retry"


def test_refused_by_the_guard_stops():
    assert classify(result(None, refused=True)) == "refused"
