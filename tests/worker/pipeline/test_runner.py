"""worker.pipeline.runner.PipelineRunner on the tiny random-weight model, on the CPU: loaded once (warm) and reused
for every run, one PIL image per seed, the same seed giving the same pixels, batches, progress and stop."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import worker.pipeline.runner as runner_module
from common.settings import ModelSettings, Settings
from tests.worker.pipeline.tiny_pipeline import image_bytes, make_spec
from worker.pipeline.loading import ModelConfigError
from worker.pipeline.runner import PipelineRunner
from worker.pipeline.spec import GenerationInterrupted


@pytest.fixture(scope="module")
def loads():
    """Every load_pipeline call the runner makes (the real loader runs; this only counts)."""
    calls = []
    real = runner_module.load_pipeline

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(runner_module, "load_pipeline", counting)
    yield calls
    mp.undo()


@pytest.fixture(scope="module")
def runner(tiny_model, loads):
    return PipelineRunner(Settings(model=ModelSettings(id=str(tiny_model), compile=False)))


def spec(seeds=(3, 4), prompt="a red fox"):
    return make_spec(prompt, seeds, width=64, height=64, steps=2)


def test_before_load_the_runner_names_no_model():
    r = PipelineRunner(Settings(model=ModelSettings(id="/nonexistent", compile=False)))
    assert r.loaded is None and r.model_id == "" and r.revision is None and r.load_s == 0.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the default model is the Hub's")
def test_no_model_id_and_no_tiny_model_at_home_is_a_clear_error(tmp_path):
    r = PipelineRunner(Settings(home=tmp_path, model=ModelSettings(id="", compile=False)))
    with pytest.raises(ModelConfigError) as caught:
        r.load()
    assert "LETTERPRESS_MODEL__ID" in str(caught.value) and str(tmp_path) in str(caught.value)
    assert r.loaded is None


def test_first_run_loads_the_model_and_returns_one_image_per_seed(runner, loads, tiny_model):
    images = runner.run(spec(seeds=(3, 4)))
    assert len(loads) == 1  # loaded on first use, and only ever once in this module
    assert runner.loaded is not None and runner.load_s > 0
    assert runner.model_id == str(tiny_model)
    assert runner.loaded.device == "cpu"
    assert len(images) == 2
    assert all(isinstance(im, Image.Image) and im.size == (64, 64) and im.mode == "RGB" for im in images)
    assert images[0].tobytes() != images[1].tobytes()  # each seed its own image
    assert np.asarray(images[0]).std() > 0  # not a blank image


def test_same_seed_same_pixels_and_the_model_stays_loaded(runner, loads):
    if runner.loaded is None:
        runner.load()
    loaded, before = runner.loaded, len(loads)
    first, again = runner.run(spec(seeds=(3, 4))), runner.run(spec(seeds=(3, 4)))
    assert image_bytes(first) == image_bytes(again)
    alone = runner.run(spec(seeds=(4,)))
    # an image depends on its seed, not its position: equal up to float rounding between a batch of two and of
    # one (with diffusers 0.42.1 / torch 2.13 CPU: 1 level in 2 of 12,288 values; docs/PERFORMANCE.md, co-batching)
    lone, second = np.asarray(alone[0]).astype(int), np.asarray(first[1]).astype(int)
    assert np.abs(lone - second).max() <= 1 and (lone != second).mean() < 0.001
    other_prompt = runner.run(spec(seeds=(3,), prompt="a lighthouse at dusk"))
    assert other_prompt[0].tobytes() != first[0].tobytes()
    assert len(loads) == before and runner.loaded is loaded  # never reloaded


def test_on_step_reports_progress(runner):
    steps = []
    runner.run(spec(seeds=(1,)), on_step=lambda done, total: steps.append((done, total)))
    assert steps == [(1, 2), (2, 2)]


def test_should_stop_interrupts_and_produces_nothing(runner):
    with pytest.raises(GenerationInterrupted) as stopped:
        runner.run(spec(seeds=(1,)), should_stop=lambda: True)
    assert stopped.value.steps_done == 0 and stopped.value.steps_total == 2


def test_run_batch_returns_one_list_per_spec(runner, loads):
    before = len(loads)
    a, b = spec(seeds=(3,), prompt="a red fox"), spec(seeds=(7, 8), prompt="a sign that says OPEN")
    steps = []
    out = runner.run_batch([a, b], on_step=lambda done, total: steps.append(done))
    assert [len(images) for images in out] == [1, 2]
    assert all(im.size == (64, 64) for images in out for im in images)
    assert steps == [1, 2]
    # batched images match the job run alone, up to float rounding
    alone = runner.run(a)[0]
    diff = np.abs(np.asarray(out[0][0], dtype=np.int16) - np.asarray(alone, dtype=np.int16))
    assert diff.max() <= 2
    assert len(loads) == before


def test_run_batch_refuses_specs_that_cannot_share_a_pass(runner):
    with pytest.raises(ValueError):
        runner.run_batch([spec(), make_spec("x", (1,), width=64, height=128, steps=2)])


def test_a_cpu_worker_runs_with_its_configured_thread_count(tiny_model):
    """Several CPU workers on one host share the cores through `worker.cpu_threads` (oversubscribed they ran
    10x slower); unset, torch keeps its default."""
    before = torch.get_num_threads()
    try:
        settings = Settings(model=ModelSettings(id=str(tiny_model), compile=False))
        PipelineRunner(settings).load()
        assert torch.get_num_threads() == before
        settings.worker.cpu_threads = before + 1
        PipelineRunner(settings).load()
        assert torch.get_num_threads() == before + 1
    finally:
        torch.set_num_threads(before)
