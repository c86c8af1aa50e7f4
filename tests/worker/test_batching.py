"""The dynamic batching scheduler's grouping rules (pure: the clock is an argument)."""
from __future__ import annotations

import pytest

from worker.batching import BatchingPolicy, BatchScheduler, Pending, group_key
from worker.generation import GenerationSpec

ON = BatchingPolicy(enabled=True, max_batch=4, window_s=0.05, max_pixels=512 * 512)


def spec(size: int = 512, steps: int = 12, seeds: tuple[int, ...] = (1,), mu: float = 0.5, prompt: str = "a cat",
         polish: float = 3.0) -> GenerationSpec:
    return GenerationSpec(prompt_text=prompt, width=size, height=size, steps=steps, mu=mu, std=1.75,
                          guidance_schedule=(7.0,) * (steps - 1) + (polish,), seeds=seeds)


def job(name: str, at: float, variant: str = "bf16", **kw) -> Pending:
    return Pending(job_id=name, spec=spec(**kw), variant=variant, arrived=at)


def ids(batches) -> list[list[str]]:
    return [[p.job_id for p in batch] for batch in batches]


def test_group_key_is_fast_paths_batch_key_with_the_variant():
    from worker.fast_path import batch_key

    s = spec(prompt="anything", seeds=(3, 4))
    assert group_key(s, "fp8") == ("fp8", *batch_key(s))


def test_off_by_default_every_job_runs_alone_at_once():
    sched = BatchScheduler()
    assert not sched.policy.enabled
    for i in range(3):
        sched.add(job(f"j{i}", at=0.0))
    assert ids(sched.ready(now=0.0)) == [["j0"], ["j1"], ["j2"]]
    assert len(sched) == 0


def test_same_key_jobs_within_the_window_run_together_in_arrival_order():
    sched = BatchScheduler(ON)
    sched.add(job("a", at=0.00, prompt="short"))
    sched.add(job("b", at=0.01, prompt="a much longer prompt, different length"))
    assert sched.ready(now=0.02) == []  # still waiting for company
    assert sched.next_deadline() == pytest.approx(0.05)
    assert ids(sched.ready(now=0.05)) == [["a", "b"]]
    assert sched.next_deadline() is None


@pytest.mark.parametrize("other", [
    dict(size=256), dict(steps=20), dict(mu=0.0), dict(polish=7.0), dict(variant="fp8"),
])
def test_different_size_schedule_guidance_or_variant_never_share_a_batch(other):
    sched = BatchScheduler(ON)
    sched.add(job("a", at=0.0))
    sched.add(job("b", at=0.0, **other))
    assert sorted(ids(sched.ready(now=1.0))) == [["a"], ["b"]]


def test_a_full_batch_is_released_at_once_and_counts_images_not_jobs():
    sched = BatchScheduler(ON)
    sched.add(job("two", at=0.0, seeds=(1, 2)))
    sched.add(job("one", at=0.01))
    assert sched.ready(now=0.01) == []
    sched.add(job("one-more", at=0.02))
    assert ids(sched.ready(now=0.02)) == [["two", "one", "one-more"]]  # 4 images: full


def test_a_job_that_does_not_fit_closes_the_batch_and_waits_for_the_next():
    sched = BatchScheduler(ON)
    sched.add(job("a", at=0.0, seeds=(1, 2, 3)))
    sched.add(job("b", at=0.01, seeds=(1, 2)))  # 3 + 2 > 4
    assert ids(sched.ready(now=0.01)) == [["a"]]
    assert ids(sched.ready(now=0.02)) == []
    assert ids(sched.ready(now=0.07)) == [["b"]]  # its own window: waited since 0.01


def test_large_images_and_jobs_that_fill_a_batch_alone_skip_the_window():
    sched = BatchScheduler(ON)
    sched.add(job("big", at=0.0, size=1024))
    sched.add(job("four", at=0.0, seeds=(1, 2, 3, 4)))
    sched.add(job("small", at=0.0))
    assert ids(sched.ready(now=0.0)) == [["big"], ["four"]]
    assert ids(sched.ready(now=0.05)) == [["small"]]


def test_more_jobs_than_a_batch_split_in_arrival_order_oldest_batch_first():
    sched = BatchScheduler(ON)
    for i in range(6):
        sched.add(job(f"j{i}", at=i * 0.001))
    sched.add(job("other", at=0.0005, size=256))
    assert ids(sched.ready(now=0.006)) == [["j0", "j1", "j2", "j3"]]
    assert ids(sched.ready(now=1.0)) == [["other"], ["j4", "j5"]]


def test_drain_releases_everything_batched():
    sched = BatchScheduler(ON)
    for i in range(3):
        sched.add(job(f"j{i}", at=0.0))
    sched.add(job("x", at=0.0, steps=20))
    assert sorted(ids(sched.drain())) == [["j0", "j1", "j2"], ["x"]]
    assert len(sched) == 0


def test_policy_refuses_nonsense():
    with pytest.raises(ValueError):
        BatchingPolicy(max_batch=0)
    with pytest.raises(ValueError):
        BatchingPolicy(window_s=-1)
