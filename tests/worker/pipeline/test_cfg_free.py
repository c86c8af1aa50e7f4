"""CFG-free steps and distilled checkpoints (worker/pipeline/fast_path.py point 7, common/presets.py), float32 on
CPU, tiny model: a step at guidance 1.0 runs one transformer pass and gives exactly the two-pass blend's bytes;
a checkpoint saved without its unconditional transformer loads and runs the CFG-free presets, and refuses the
rest with a clear error."""
from __future__ import annotations

import numpy as np
import torch

import dataclasses
import json

import pytest

from common.devstack.tiny_model import build_tiny_model
from common.presets import PRESETS, needs_unconditional
from common.settings import ModelSettings
from tests.worker.pipeline.tiny_pipeline import image_bytes, load_tiny, make_spec
from worker.pipeline import fast_path
from worker.pipeline.fast_path import generate_batch, prepare_compiled
from worker.pipeline.generation import generate
from worker.pipeline.loading import load_pipeline
from worker.pipeline.spec import UnsupportedRequest


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_tiny(tmp_path_factory.mktemp("cfg-free-model"))


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    path = build_tiny_model(tmp_path_factory.mktemp("distilled") / "tiny", distilled=True)
    assert "unconditional_transformer" not in json.loads((path / "model_index.json").read_text())
    assert not (path / "unconditional_transformer").exists()
    return load_pipeline(ModelSettings(id=str(path)), device="cpu")


def count_passes(transformer, calls: list) -> object:
    """Count a transformer's passes: the fast path runs its blocks directly, each pass through `input_proj` once."""
    return transformer.input_proj.register_forward_pre_hook(lambda *_: calls.append(1))


def preset_spec(name: str, seeds=(3,)):
    preset = PRESETS[name]
    return dataclasses.replace(make_spec(seeds=seeds, steps=preset.steps), mu=preset.mu, std=preset.std,
                               guidance_schedule=preset.guidance_schedule())


def test_the_cfg_free_presets_are_unguided_and_the_others_are_not():
    assert PRESETS["V4_FAST_20"].guidance_schedule() == (1.0,) * 20
    assert PRESETS["V4_INSTANT_8"].guidance_schedule() == (1.0,) * 8
    assert PRESETS["V4_FAST_20"].guidance_schedule(steps=10) == (1.0,) * 10
    assert PRESETS["V4_FAST_20"].guidance_schedule(guidance_scale=2.0) == (2.0,) * 20  # an override still wins
    assert not needs_unconditional(PRESETS["V4_INSTANT_8"].guidance_schedule())
    assert all(needs_unconditional(p.guidance_schedule()) for p in PRESETS.values() if p.guidance is None)


@pytest.mark.parametrize("schedule, unconditional_passes", [
    ((1.0, 1.0, 1.0, 1.0), 0),
    ((7.0, 7.0, 1.0, 1.0), 2),  # only the guided steps pay for the second pass
])
def test_unguided_steps_skip_the_unconditional_pass_with_the_same_bytes(loaded, monkeypatch, schedule,
                                                                       unconditional_passes):
    spec = dataclasses.replace(make_spec(seeds=(5, 6)), guidance_schedule=schedule)
    cond, uncond = [], []
    hooks = [count_passes(loaded.pipe.transformer, cond), count_passes(loaded.pipe.unconditional_transformer, uncond)]
    try:
        skipped = generate_batch(loaded, [spec])[0]
        assert (len(cond), len(uncond)) == (4, unconditional_passes)
        monkeypatch.setattr(fast_path, "SKIP_UNGUIDED_PASS", False)  # the two-pass blend at every step
        both = generate_batch(loaded, [spec])[0]
        assert len(uncond) == unconditional_passes + 4
    finally:
        for hook in hooks:
            hook.remove()
    assert image_bytes(skipped) == image_bytes(both)


def test_a_distilled_checkpoint_runs_the_cfg_free_presets(distilled):
    calls = []
    hook = count_passes(distilled.pipe.transformer, calls)
    try:
        for name in ("V4_INSTANT_8", "V4_FAST_20"):
            calls.clear()
            images = generate(distilled, preset_spec(name, seeds=(1, 2)))
            assert len(images) == 2 and images[0].size == (32, 48)
            assert len(calls) == PRESETS[name].steps  # one pass a step
            assert image_bytes(images) == image_bytes(generate(distilled, preset_spec(name, seeds=(1, 2))))
    finally:
        hook.remove()


def test_a_distilled_checkpoint_refuses_guidance_clearly(distilled):
    with pytest.raises(UnsupportedRequest, match="distilled.*V4_FAST_20"):
        generate(distilled, preset_spec("V4_TURBO_12"))
    with pytest.raises(UnsupportedRequest, match="fast path"):
        generate(distilled, preset_spec("V4_INSTANT_8"), fast=False)  # the stock call needs both transformers


def test_a_distilled_checkpoint_compiles_its_one_transformer(distilled):
    [before] = generate(distilled, preset_spec("V4_INSTANT_8"))
    torch._dynamo.reset()  # other tests in this process compiled the same block code: no stale cache entries
    prepare_compiled(distilled, warmup_sizes=[(32, 48)], warmup_steps=1)
    try:
        [after] = generate(distilled, preset_spec("V4_INSTANT_8"))
    finally:
        from worker.bench.models import uncompile

        uncompile(distilled.pipe)
    # compiled kernels may round differently from eager on CPU (as in tests/worker/pipeline/test_adapters.py)
    diff = np.abs(np.asarray(after, dtype=np.int16) - np.asarray(before, dtype=np.int16))
    assert diff.max() <= 2, int(diff.max())
