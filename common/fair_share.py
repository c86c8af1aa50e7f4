"""Priority lanes in the batch lane: weighted fair share by stride scheduling, on two levels.

Who gets the feeder's next slot (common.batches.feed_candidates):
1. among tenants with a batch that has items left to send, the one with the lowest *pass*;
2. inside that tenant, among those batches, the one with the lowest pass;
3. that batch gives its next item, and both passes advance by 1/weight.

A batch's weight is its priority's (`batches.priority_weights`: high 4, normal 2, low 1 by default); a tenant's is
that of its highest-priority batch with items left. So over time a tenant with a high batch gets four turns for
every one of a tenant whose batches are low, and inside a tenant a high batch gets four turns to a low one's one:
the high batch overtakes, the low one never starves. With equal weights this is plain round robin, tenant by
tenant, then batch by batch, so a tenant's share does not grow with its number of batches.

Passes are virtual time, kept in Postgres (`tenants.feed_pass`, `batches.feed_pass`) so that every worker's feeder
continues where the last pass left off. A client that is new (NULL) or comes back after a pause starts at the
floor, `max(pass of the clients present) - slack`, slack being one turn of the lowest weight: at the front, so it
starts at once, with a bounded head start. Clients present all along are within that of each other (a client
only advances when it holds the lowest pass, by at most one turn of its own weight), so the floor changes nothing
for them; it only stops a returning client from claiming the turns it missed. Ties go to the lower static key
(creation time, then id, of the tenant or of the batch), so the order is exact and common.queue_position can
compute it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Generic, Hashable, Literal, TypeVar

Priority = Literal["high", "normal", "low"]
PRIORITIES: tuple[str, ...] = Priority.__args__  # highest first
DEFAULT_PRIORITY = "normal"

K = TypeVar("K", bound=Hashable)


def slack(weights: dict[str, float]) -> float:
    """How far behind the front a newcomer starts: one turn of the lowest weight."""
    return 1.0 / min(weights.values())


def effective_passes(passes: dict[K, float | None], slack_turns: float) -> dict[K, float]:
    """Each client's pass as the scheduler uses it (module doc): no lower than the floor, max - slack; a new client
    (NULL) at the floor; 0 when no pass is known."""
    known = [p for p in passes.values() if p is not None]
    floor = max(known) - slack_turns if known else 0.0
    return {k: floor if p is None else max(p, floor) for k, p in passes.items()}


def turns_before(pass_: float, weight: float, at: float, wins_tie: bool) -> int:
    """How many turns a client at `pass_` with `weight` takes before virtual time `at` (one more when it reaches
    `at` exactly and wins the tie). common.queue_position's SQL spells the same formula."""
    span = (at - pass_) * weight
    if span < 0:
        return 0
    return math.ceil(span) + (1 if span == math.floor(span) and wins_tie else 0)


@dataclass
class _Client(Generic[K]):
    tie: tuple
    weight: float
    pass_: float


class Stride(Generic[K]):
    """One level of the scheduler: clients with a weight and a pass; `peek` names the next, `advance` charges it
    one turn, `remove` drops a client that has nothing left."""

    def __init__(self, clients: dict[K, tuple[tuple, float, float]]):
        self._clients = {k: _Client(tie, w, p) for k, (tie, w, p) in clients.items()}

    def __bool__(self) -> bool:
        return bool(self._clients)

    def peek(self) -> K:
        return min(self._clients, key=lambda k: (self._clients[k].pass_, self._clients[k].tie))

    def advance(self, key: K) -> None:
        client = self._clients[key]
        client.pass_ += 1.0 / client.weight

    def remove(self, key: K) -> None:
        del self._clients[key]

    def pass_of(self, key: K) -> float:
        return self._clients[key].pass_
