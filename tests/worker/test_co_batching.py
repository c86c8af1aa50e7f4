"""Dynamic batching's rules (pure): which queued jobs a claimed job takes along."""
from __future__ import annotations

import pytest

from common.settings import BatchingSettings
from worker.co_batching import CoBatchingPolicy, companions
from worker.pipeline.spec import GenerationSpec, co_batch_key

ON = CoBatchingPolicy(enabled=True, max_batch=4, max_pixels=512 * 512)


def spec(size: int = 512, steps: int = 12, seeds: tuple[int, ...] = (1,), mu: float = 0.5, prompt: str = "a cat",
         polish: float = 3.0) -> GenerationSpec:
    return GenerationSpec(prompt_text=prompt, width=size, height=size, steps=steps, mu=mu, std=1.75,
                          guidance_schedule=(7.0,) * (steps - 1) + (polish,), seeds=seeds)


def test_off_by_default_and_from_settings():
    assert CoBatchingPolicy.from_settings(BatchingSettings()) == CoBatchingPolicy()
    assert not CoBatchingPolicy().enabled
    assert companions(spec(), [("a", spec())], CoBatchingPolicy()) == []
    on = CoBatchingPolicy.from_settings(BatchingSettings(enabled=True, max_batch=3, window_s=0.2, max_pixels=64))
    assert on == CoBatchingPolicy(enabled=True, max_batch=3, window_s=0.2, max_pixels=64)


def test_same_key_joins_prompts_and_seeds_may_differ():
    candidates = [("a", spec(prompt="a dog", seeds=(9,))), ("b", spec(prompt="a much longer prompt"))]
    assert companions(spec(), candidates, ON) == ["a", "b"]
    assert co_batch_key(spec(prompt="x", seeds=(1, 2))) == co_batch_key(spec(prompt="y", seeds=(3,)))


@pytest.mark.parametrize("other", [
    spec(size=256), spec(steps=16), spec(mu=0.0), spec(polish=5.0),
], ids=["size", "steps", "mu", "guidance"])
def test_any_difference_in_the_key_keeps_a_job_out(other):
    assert companions(spec(), [("x", other)], ON) == []


def test_at_most_max_batch_images_in_queue_order_passing_over_what_does_not_fit():
    candidates = [("a", spec()), ("big", spec(seeds=(1, 2, 3))), ("b", spec()), ("c", spec()), ("d", spec())]
    assert companions(spec(), candidates, ON) == ["a", "b", "c"]  # 1 + 1 + 1 + 1 = 4; "big" would make 5
    assert companions(spec(seeds=(1, 2)), candidates, ON) == ["a", "b"]
    assert companions(spec(), candidates, ON, already=2) == ["a"]


def test_large_images_and_full_jobs_run_alone():
    assert companions(spec(size=1024), [("a", spec(size=1024))], ON) == []
    assert companions(spec(seeds=(1, 2, 3, 4)), [("a", spec())], ON) == []
    assert ON.batchable(spec(size=512)) and not ON.batchable(spec(size=1024))


def test_policy_refuses_nonsense():
    with pytest.raises(ValueError):
        CoBatchingPolicy(max_batch=0)
    with pytest.raises(ValueError):
        CoBatchingPolicy(window_s=-1)
