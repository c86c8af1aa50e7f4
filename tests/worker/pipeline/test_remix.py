"""Remix on the fast path (worker.pipeline.remix), tiny model on the CPU: the same input, strength, prompt and seed
give the same bytes; `strength` sets how many steps run (progress and transformer passes counted); the input image
decides the result; the packing is the exact inverse of the decoder's unpacking."""
from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image

from tests.worker.pipeline.tiny_pipeline import image_bytes, load_tiny, make_spec, pixel_diff
from worker.pipeline import fast_path, remix
from worker.pipeline.fast_path import generate_batch, text_cache
from worker.pipeline.generation import generate
from worker.pipeline.spec import InitImage, UnsupportedRequest


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_tiny(tmp_path_factory.mktemp("remix-model"))


@pytest.fixture(autouse=True)
def fresh_cache(loaded):
    text_cache(loaded).clear()


def png(color: tuple[int, int, int], size=(40, 56), mode="RGB") -> bytes:
    rng = np.random.default_rng(sum(color))
    pixels = np.clip(np.array(color) + rng.integers(-30, 30, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(out, format="PNG")
    return out.getvalue()


def remix_spec(data: bytes, strength: float, steps: int = 8, seeds=(1,)):
    return dataclasses.replace(make_spec(seeds=seeds, steps=steps),
                               init_image=InitImage(sha256=f"sha-{hash(data)}", strength=strength, data=data))


def run(loaded, spec):
    steps = []
    images = generate(loaded, spec, on_step=lambda done, total: steps.append((done, total)))
    return images, steps


def test_the_same_remix_gives_the_same_bytes_and_strength_sets_the_steps_run(loaded):
    data = png((200, 40, 40))
    first, steps = run(loaded, remix_spec(data, 0.5))
    again, _ = run(loaded, remix_spec(data, 0.5))
    assert image_bytes(first) == image_bytes(again)
    assert steps == [(i, 4) for i in range(1, 5)]  # 8 steps at strength 0.5: the last 4
    _, steps = run(loaded, remix_spec(data, 0.25))
    assert [total for _, total in steps] == [2, 2]
    _, steps = run(loaded, remix_spec(data, 1.0))
    assert len(steps) == 8


def test_each_step_is_one_guided_pair_of_transformer_passes(loaded, monkeypatch):
    calls = []
    real = fast_path._transformer_pass
    monkeypatch.setattr(fast_path, "_transformer_pass", lambda *a, **k: calls.append(1) or real(*a, **k))
    generate(loaded, remix_spec(png((10, 10, 200)), 0.375))
    assert len(calls) == 3 * 2  # 3 of 8 steps, conditional and unconditional pass each


def test_the_input_image_and_the_strength_decide_the_result(loaded):
    red, blue = png((220, 30, 30)), png((30, 30, 220))
    from_red, _ = run(loaded, remix_spec(red, 0.25))
    from_blue, _ = run(loaded, remix_spec(blue, 0.25))
    assert pixel_diff(from_red, from_blue)[0] > 0
    # a low strength ends closer to the input (its VAE round trip) than a high one: it starts at a lower sigma
    low, _ = run(loaded, remix_spec(red, 0.25))
    high, _ = run(loaded, remix_spec(red, 1.0))
    pipe = loaded.pipe
    latents = remix.encode_image(pipe, remix.input_pixels(red), 32, 48)
    with torch.no_grad():
        round_trip = fast_path.decode_latents(pipe, latents, 48 // 16, 32 // 16)[0]
    distance = [np.abs(np.asarray(i[0], dtype=float) - np.asarray(round_trip, dtype=float)).mean() for i in (low, high)]
    assert distance[0] < distance[1], distance
    text_only = generate(loaded, make_spec(seeds=(1,), steps=8))
    assert image_bytes(high) != image_bytes(text_only)  # strength 1.0 still starts from the image's latents


def test_a_transparent_input_is_flattened_onto_white():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    out = io.BytesIO()
    rgba.save(out, format="PNG")
    assert remix.input_pixels(out.getvalue()).getpixel((0, 0)) == (255, 255, 255)


def test_packing_is_the_inverse_of_the_decoders_unpacking():
    z = torch.randn(2, 4, 6, 8)
    packed = remix.pack_latents(z, 2)
    patch, channels, grid_h, grid_w = 2, 4, 3, 4
    back = packed.view(2, grid_h, grid_w, patch, patch, channels).permute(0, 5, 1, 3, 2, 4).reshape(2, 4, 6, 8)
    assert torch.equal(back, z)  # the view/permute of fast_path.decode_latents


def test_co_batched_remixes_match_their_runs_alone(loaded):
    data = png((90, 160, 60))
    one, two = remix_spec(data, 0.5, seeds=(1,)), remix_spec(data, 0.5, seeds=(2,))
    together = generate_batch(loaded, [one, two])
    alone = [generate(loaded, spec) for spec in (one, two)]
    assert pixel_diff(together[0] + together[1], alone[0] + alone[1])[0] <= 1


def test_the_stock_call_refuses_a_remix(loaded):
    with pytest.raises(UnsupportedRequest, match="fast path"):
        generate(loaded, remix_spec(png((1, 2, 3)), 0.5), fast=False)
