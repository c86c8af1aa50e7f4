"""`worker.pipeline.generation.generate` on the tiny model: determinism, progress, cooperative stop, spec validation."""
from __future__ import annotations

import pytest

from tests.worker.pipeline.tiny_pipeline import (
    image_bytes,
    load_tiny,
    make_spec,
    pixel_diff,
)
from worker.pipeline.fast_path import text_cache
from worker.pipeline.generation import generate
from worker.pipeline.spec import GenerationInterrupted, GenerationSpec

PATHS = [pytest.param(True, id="fast"), pytest.param(False, id="stock")]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_tiny(tmp_path_factory.mktemp("generation-model"))


@pytest.mark.parametrize("fast", PATHS)
def test_same_spec_twice_gives_identical_bytes(loaded, fast):
    spec = make_spec(seeds=(11, 12), steps=2)
    first, second = generate(loaded, spec, fast=fast), generate(loaded, spec, fast=fast)
    assert image_bytes(first) == image_bytes(second)
    assert [image.size for image in first] == [(spec.width, spec.height)] * 2
    assert first[0].tobytes() != first[1].tobytes()  # one image per seed, each its own


@pytest.mark.parametrize("fast", PATHS)
def test_on_step_reports_every_step_in_order(loaded, fast):
    calls = []
    generate(loaded, make_spec(steps=4, seeds=(1,)), fast=fast, on_step=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]


@pytest.mark.parametrize("fast", PATHS)
def test_should_stop_interrupts_at_a_step_boundary(loaded, fast):
    calls = []
    with pytest.raises(GenerationInterrupted) as stopped:
        generate(loaded, make_spec(steps=4, seeds=(1,)), fast=fast, on_step=lambda done, total: calls.append(done),
                 should_stop=lambda: len(calls) >= 2)
    assert calls == [1, 2]
    assert (stopped.value.steps_done, stopped.value.steps_total) == (2, 4)


@pytest.mark.parametrize("fast", PATHS)
def test_stop_requested_before_start_does_no_work(loaded, fast):
    text_cache(loaded).clear()
    with pytest.raises(GenerationInterrupted) as stopped:
        generate(loaded, make_spec(prompt="never encoded"), fast=fast, should_stop=lambda: True)
    assert stopped.value.steps_done == 0
    assert text_cache(loaded).encodes == 0


def test_an_image_depends_on_its_seed_not_its_position(loaded):
    together = generate(loaded, make_spec(seeds=(21, 22)))
    alone = generate(loaded, make_spec(seeds=(22,)))
    largest, _ = pixel_diff(together[1:], alone)
    assert largest <= 1  # same noise; a batch of 2 vs 1 may round a value differently, never more


def test_spec_validation():
    with pytest.raises(ValueError, match="guidance_schedule"):
        GenerationSpec(prompt_text="x", width=32, height=32, steps=4, mu=0.0, std=1.5, guidance_schedule=(7.0,) * 3,
                       seeds=(1,))
    with pytest.raises(ValueError, match="multiple of 16"):
        make_spec(width=40)
    with pytest.raises(ValueError, match="seed"):
        make_spec(seeds=())
    spec = GenerationSpec(prompt_text="x", width=32, height=32, steps=2, mu=0.0, std=1.5,
                          guidance_schedule=[7, 3], seeds=[5])  # JSON params arrive as lists
    assert spec.guidance_schedule == (7.0, 3.0) and spec.seeds == (5,)
    hash(spec)
