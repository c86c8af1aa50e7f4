"""common.fair_share on its own: weighted shares, no starvation, the floor for newcomers and returning clients, and
`turns_before` (the formula common.queue_position's SQL spells) against the scheduler it describes."""
from __future__ import annotations

import pytest

from common.fair_share import Stride, effective_passes, slack, turns_before

WEIGHTS = {"high": 4.0, "normal": 2.0, "low": 1.0}


def run(stride: Stride, turns: int) -> list:
    order = []
    for _ in range(turns):
        key = stride.peek()
        stride.advance(key)
        order.append(key)
    return order


def test_turns_follow_the_weights_and_nothing_starves():
    order = run(Stride({"h": ((0,), 4.0, 0.0), "n": ((1,), 2.0, 0.0), "l": ((2,), 1.0, 0.0)}), 700)
    assert [order.count(k) for k in "hnl"] == [400, 200, 100]
    # the low client is never kept waiting longer than one round of the others
    gaps = [b - a for a, b in zip([i for i, k in enumerate(order) if k == "l"][:-1],
                                  [i for i, k in enumerate(order) if k == "l"][1:])]
    assert max(gaps) == 7


def test_equal_weights_are_round_robin_in_tie_order():
    assert run(Stride({"b": ((1,), 2.0, 0.0), "a": ((0,), 2.0, 0.0), "c": ((2,), 2.0, 0.0)}), 6) == list("abcabc")


def test_a_newcomer_starts_at_the_front_with_a_bounded_head_start():
    passes = effective_passes({"old": 50.0, "older": 49.5, "new": None}, slack(WEIGHTS))
    assert passes == {"old": 50.0, "older": 49.5, "new": 49.0}


def test_a_returning_client_cannot_claim_the_turns_it_missed():
    passes = effective_passes({"present": 50.0, "back": 3.0}, slack(WEIGHTS))
    assert passes == {"present": 50.0, "back": 49.0}
    order = run(Stride({k: ((i,), 2.0, p) for i, (k, p) in enumerate(passes.items())}), 6)
    assert order == ["back", "back", "present", "back", "present", "back"]


def test_no_known_pass_starts_everyone_at_zero():
    assert effective_passes({"a": None, "b": None}, 1.0) == {"a": 0.0, "b": 0.0}


@pytest.mark.parametrize("mine,other", [((4.0, 0.0), (1.0, 0.0)), ((1.0, 0.25), (4.0, 0.0)),
                                        ((2.0, 0.5), (2.0, 0.5)), ((2.0, 0.0), (4.0, 1.75))])
@pytest.mark.parametrize("i_win_ties", [True, False])
def test_turns_before_counts_the_other_clients_turns_before_my_kth(mine, other, i_win_ties):
    me, them = ((0,), *mine), ((1,), *other)
    if not i_win_ties:
        me, them = ((1,), *mine), ((0,), *other)
    order = run(Stride({"me": me, "them": them}), 60)
    my_turns = [i for i, k in enumerate(order) if k == "me"]
    for k in range(5):
        at = mine[1] + k / mine[0]  # my (k+1)-th turn, in virtual time
        assert turns_before(other[1], other[0], at, wins_tie=not i_win_ties) == my_turns[k] - k
