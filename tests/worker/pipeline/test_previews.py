"""Previews while rendering (worker/pipeline/previews.py) on the tiny model: the colour map fitted from the model's
own VAE, previews on the due steps only (never the last), one per image row, on both paths, byte-identical images
with and without them, and a failing preview that never stops the generation."""
from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from tests.worker.pipeline.tiny_pipeline import image_bytes, load_tiny, make_spec
from worker.pipeline import previews, remix
from worker.pipeline.fast_path import generate_batch
from worker.pipeline.generation import generate
from worker.pipeline.previews import PreviewRequest


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_tiny(tmp_path_factory.mktemp("preview-model"))


def test_a_preview_is_the_fitted_map_applied_to_the_denormalised_unpatched_latents(loaded):
    """A flat latent field (one colour's VAE latent everywhere), packed and normalised as the denoiser sees it,
    previews as the map's colour for that latent on every pixel: the unpatching, the batch-norm and the map agree
    with the pipeline's own layout (a transposed map, a missed denormalisation or a wrong patch order does not)."""
    pipe = loaded.pipe
    weight, bias = previews.projection_of(pipe)
    assert previews.projection_of(pipe)[0] is weight  # fitted once per pipeline
    z = pipe.vae.encode(torch.full((1, 3, 64, 64), 0.6)).latent_dist.mode().float()  # a light grey's latent
    flat = z.mean(dim=(2, 3), keepdim=True).expand(1, z.shape[1], 8, 12).contiguous()  # 8x12 latent pixels
    mean, std = remix._bn_stats(pipe.vae, flat.device, torch.float32)
    packed = (remix.pack_latents(flat, pipe.patch_size) - mean) / std
    (sketch,) = previews.preview_images(pipe, packed, 8 // pipe.patch_size, 12 // pipe.patch_size)
    expected = ((weight @ flat[0, :, 0, 0] + bias).clamp(-1, 1) + 1) * 127.5
    pixels = torch.tensor(list(sketch.get_flattened_data()), dtype=torch.float32)
    assert sketch.size == (12, 8) and torch.allclose(pixels, expected.expand_as(pixels), atol=1.0), (pixels[:2],
                                                                                                      expected)


def test_the_map_fits_the_calibration_colours_better_than_their_mean(loaded):
    """Least squares with a bias can only beat the constant guess; the tiny model's random 4-channel VAE is not
    linear in colour, so this is the bar here (a trained VAE's latents are close to linear in colour)."""
    pipe = loaded.pipe
    weight, bias = previews.projection_of(pipe)
    colours = previews._calibration_colours()
    pixels = colours.view(-1, 3, 1, 1).expand(-1, 3, 64, 64)
    features = pipe.vae.encode(pixels).latent_dist.mode().float().mean(dim=(2, 3))
    error = ((features @ weight.T + bias - colours) ** 2).mean()
    assert error < 0.5 * ((colours - colours.mean(dim=0)) ** 2).mean()


def collect():
    got: list[tuple[int, list[bytes]]] = []
    return got, PreviewRequest(every=2, deliver=lambda step, jpegs: got.append((step, jpegs)))


@pytest.mark.parametrize("fast", [True, False])
def test_previews_come_on_the_due_steps_one_per_image_and_change_nothing(loaded, fast):
    spec = make_spec(seeds=(1, 2))  # 2 images, 32x48
    plain = generate(loaded, spec, fast=fast)
    got, request = collect()
    shown = generate(loaded, spec, fast=fast, previews=request)
    assert image_bytes(shown) == image_bytes(plain)  # previews read the latents, never change them
    assert [step for step, _ in got] == list(range(2, spec.steps, 2))  # every 2 steps, never the last
    for _, jpegs in got:
        assert len(jpegs) == 2
        for data in jpegs:
            with Image.open(io.BytesIO(data)) as image:
                assert image.format == "JPEG" and max(image.size) <= previews.LONGEST_SIDE
                assert image.size[1] > image.size[0]  # the image's own aspect (32x48)


def test_a_batch_of_specs_gets_a_preview_row_per_image(loaded):
    specs = [make_spec("a red poster", seeds=(1,)), make_spec("a blue poster", seeds=(5, 6))]
    got, request = collect()
    generate_batch(loaded, specs, previews=request)
    assert got and all(len(jpegs) == 3 for _, jpegs in got)


def test_a_failing_preview_is_skipped_and_the_generation_goes_on(loaded, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no sketch today")

    monkeypatch.setattr(previews, "preview_images", broken)
    got, request = collect()
    images = generate(loaded, make_spec(seeds=(1,)), previews=request)
    assert len(images) == 1 and got == []
    assert "preview at step 2 skipped: no sketch today" in caplog.text
