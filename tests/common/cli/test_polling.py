"""common.cli.polling.wait_until: returns the first truthy value, times out naming what it waited for."""
from __future__ import annotations

import pytest

from common.cli.polling import wait_until


def test_returns_the_first_truthy_value():
    calls = iter([None, 0, "", "ready", "later"])
    assert wait_until(lambda: next(calls), timeout=5, interval=0.001) == "ready"


def test_times_out_naming_what():
    with pytest.raises(TimeoutError, match=r"the moon not reached within 0.05s"):
        wait_until(lambda: False, timeout=0.05, interval=0.01, what="the moon")


def test_tests_support_re_exports_it():
    from tests import support

    assert support.wait_until is wait_until
