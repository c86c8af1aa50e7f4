"""Dynamic batching rules: which waiting jobs may run as one `generate_batch` call, and when.

A pure scheduler (no clock, no threads, no GPU): the caller adds jobs as they arrive and asks which batches are
due at a time it passes in, so every rule is unit-tested without timing (tests/worker/test_batching.py).

Rules:

- Jobs batch only with jobs of the same weight variant, size, steps, schedule (mu, std) and guidance schedule,
  i.e. `worker.fast_path.batch_key` plus the variant; prompts and seeds may differ.
- A batch holds at most `max_batch` images (a job of `num_images` counts that many); a job that alone fills it
  runs alone, at once.
- Only images of at most `max_pixels` batch: larger ones are compute-bound at batch 1 and run alone, at once.
- A group is released when it is full, or when its oldest job has waited `window_s`; due batches come out oldest
  job first, and within a batch jobs keep their arrival order.

Defaults come from `letterpress bench` on an H200 (docs/PERFORMANCE.md, "Dynamic batching"): with the compiled
bf16 path, batches of 2 and 4 different prompts gave +1% and +3.5% images per minute at 512², and -7% / -6% at
1024² (prompts of different lengths need the padded, masked attention path). So batching is off by default, and
when switched on it only touches images up to 512². The Celery worker takes one message at a time (prefetch 1)
and does not use this scheduler yet.
"""
from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Protocol


class SpecLike(Protocol):
    width: int
    height: int
    steps: int
    mu: float
    std: float
    guidance_schedule: tuple[float, ...]
    seeds: tuple[int, ...]


@dataclass(frozen=True)
class BatchingPolicy:
    enabled: bool = False
    max_batch: int = 4  # images per batch
    window_s: float = 0.05  # how long the oldest job of a group may wait for company
    max_pixels: int = 512 * 512  # larger images run alone

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if self.window_s < 0:
            raise ValueError("window_s must not be negative")


def group_key(spec: SpecLike, variant: str) -> tuple:
    """Jobs with equal keys may share a batch: `fast_path.batch_key(spec)` with the variant in front."""
    return (variant, spec.width, spec.height, spec.steps, spec.mu, spec.std, tuple(spec.guidance_schedule))


@dataclass(frozen=True)
class Pending:
    job_id: Hashable
    spec: SpecLike
    variant: str
    arrived: float  # the caller's clock, seconds

    @property
    def images(self) -> int:
        return len(self.spec.seeds)


@dataclass
class BatchScheduler:
    policy: BatchingPolicy = field(default_factory=BatchingPolicy)
    _groups: dict[tuple, list[Pending]] = field(default_factory=dict)
    _alone: list[Pending] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self._alone) + sum(len(g) for g in self._groups.values())

    def batchable(self, item: Pending) -> bool:
        p = self.policy
        return (p.enabled and item.spec.width * item.spec.height <= p.max_pixels and item.images < p.max_batch)

    def add(self, item: Pending) -> None:
        if self.batchable(item):
            self._groups.setdefault(group_key(item.spec, item.variant), []).append(item)
        else:
            self._alone.append(item)

    def ready(self, now: float) -> list[list[Pending]]:
        """The batches due at `now` (removed from the scheduler), oldest job first."""
        due: list[list[Pending]] = [[item] for item in self._alone]
        self._alone = []
        for key in list(self._groups):
            group = self._groups[key]
            while group:
                batch = self._take(group)
                full = sum(i.images for i in batch) >= self.policy.max_batch
                expired = now - batch[0].arrived >= self.policy.window_s
                # A batch that cannot grow (the next job of the group does not fit) is as good as full.
                blocked = len(batch) < len(group)
                if not (full or expired or blocked):
                    break
                due.append(batch)
                del group[:len(batch)]
            if not group:
                del self._groups[key]
        due.sort(key=lambda batch: batch[0].arrived)
        return due

    def next_deadline(self) -> float | None:
        """When the oldest waiting group's window closes (None when nothing waits; `ready` now if jobs are
        waiting to run alone)."""
        if self._alone:
            return min(i.arrived for i in self._alone)
        starts = [g[0].arrived for g in self._groups.values() if g]
        return min(starts) + self.policy.window_s if starts else None

    def drain(self) -> list[list[Pending]]:
        """Everything still waiting, batched by the same rules (for shutdown): nothing waits for its window."""
        return self.ready(float("inf"))

    def _take(self, group: list[Pending]) -> list[Pending]:
        """The longest prefix of `group` (arrival order) within `max_batch` images."""
        batch: list[Pending] = []
        images = 0
        for item in group:
            if images + item.images > self.policy.max_batch:
                break
            batch.append(item)
            images += item.images
        return batch

