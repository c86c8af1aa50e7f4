"""Dynamic batching: which waiting jobs a worker takes along into one `generate_batch` call.

How it runs (`worker.attempt`): Celery hands a worker one job at a time (prefetch 1). When the job it claims is
batchable, the worker reads the oldest claimable jobs of the same queue that are already on the broker
(`common.job_states.queued_candidates`), picks the compatible ones by the rules below and claims each through the normal
claim, so every job of the batch has its own lease, fencing token, heartbeat and attempt count. Their own
deliveries later find them claimed: a duplicate delivery, a no-op. If the batch is not full and `window_s` > 0,
the worker looks once more after that many seconds. The batch runs as one call; then each job is stored and
completed, canceled or released on its own. Postgres decides who holds a job, as for any claim, so a worker that
dies with a batch loses nothing: each lease expires and each job runs again.

Rules (pure, tested in tests/worker/test_co_batching.py):

- Only images of at most `max_pixels` batch (larger ones are compute-bound at batch 1), and only jobs of the same
  size, steps, schedule (mu, std) and guidance schedule (`co_batch_key`); prompts and seeds may differ. All jobs of
  a worker share its weight variant.
- A batch holds at most `max_batch` images (a job of `num_images` counts that many); a candidate that does not fit
  is passed over (a smaller one after it may fit); candidates keep their queue order.

Defaults come from `letterpress bench` on an H200 (docs/PERFORMANCE.md, "Dynamic batching"): with the compiled
bf16 path, batches of 2 and 4 different prompts gave +1% and +3.5% images per minute at 512², and -7% / -6% at
1024² (prompts of different lengths need the padded, masked attention path). And a batched image is the same as
the job alone only up to float rounding (other prompts change the padding and the kernels' blocking), so a job
re-run alone after a preemption may differ from its batched first attempt by a level or so. Both argue for
**off** by default; switch it on (`LETTERPRESS_WORKER__BATCHING__ENABLED=true`) for many small images where
throughput matters more than byte-identical re-runs. `window_s` defaults to 0: take along only what is already
waiting, never hold the GPU idle for company (a busy queue fills batches by itself).
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Protocol

from worker.pipeline.spec import co_batch_key

# How many of the oldest queued jobs a claim looks at for company.
CANDIDATE_SCAN = 32


class SpecLike(Protocol):
    width: int
    height: int
    steps: int
    mu: float
    std: float
    guidance_schedule: tuple[float, ...]
    seeds: tuple[int, ...]


@dataclass(frozen=True)
class CoBatchingPolicy:
    enabled: bool = False
    max_batch: int = 4  # images per batch
    window_s: float = 0.0  # how long a claimed job waits for company (0: only what is waiting now)
    max_pixels: int = 512 * 512  # larger images run alone

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if self.window_s < 0:
            raise ValueError("window_s must not be negative")

    @classmethod
    def from_settings(cls, settings) -> "CoBatchingPolicy":
        """From `Settings.worker.batching` (common.settings.BatchingSettings)."""
        return cls(enabled=settings.enabled, max_batch=settings.max_batch, window_s=settings.window_s,
                   max_pixels=settings.max_pixels)

    def batchable(self, spec: SpecLike) -> bool:
        """Whether a job may look for company at all."""
        return self.enabled and spec.width * spec.height <= self.max_pixels and len(spec.seeds) < self.max_batch


def companions(lead: SpecLike, candidates: Sequence[tuple[Hashable, SpecLike]], policy: CoBatchingPolicy,
               already: int = 0) -> list[Hashable]:
    """Ids of the `candidates` (oldest first) that may join `lead`'s batch, in order.

    `already` counts images of companions taken before (a second look after the window).
    """
    if not policy.batchable(lead):
        return []
    key = co_batch_key(lead)
    images = len(lead.seeds) + already
    chosen: list[Hashable] = []
    for job_id, spec in candidates:
        if images >= policy.max_batch:
            break
        if co_batch_key(spec) == key and images + len(spec.seeds) <= policy.max_batch:
            chosen.append(job_id)
            images += len(spec.seeds)
    return chosen
