"""Previews while an image renders: every few steps, the current latents as a small JPEG, without the VAE decoder.

A linear map from the VAE's latent channels to RGB (plus a bias) turns the (denormalised, unpatched) latents at
1/8 of the image's size into a colour sketch of it: one small matmul a preview. The map is not shipped: it is fitted
once per loaded pipeline from the model's own VAE, by encoding a set of flat colours and solving least squares
from their latents to their colours, so it suits whatever VAE the checkpoint carries (the tiny model's random one
included). It shows where colour and composition are heading, not the final detail.

`StepPreviews` is called by StepControl (worker/pipeline/spec.py) after each step with the latents; every
`every` steps (never the last: the image itself follows) it hands one JPEG per image row to the caller's
`deliver(step, jpegs)`. A preview that fails is logged and skipped: it never stops the generation.
"""
from __future__ import annotations

import io
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from worker.pipeline.remix import unpacked_latents

log = logging.getLogger(__name__)
LONGEST_SIDE = 160  # px of a preview's longer side
JPEG_QUALITY = 70
_CALIBRATION_SIDE = 64  # px of each flat-colour calibration image
_projections: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # pipe -> (weight (3, C), bias (3,))

PreviewCallback = Callable[[int, list[bytes]], None]


@dataclass(frozen=True)
class PreviewRequest:
    """What a caller of a generation asks for: a preview every `every` steps, handed to `deliver`."""
    every: int
    deliver: PreviewCallback


def _calibration_colours() -> torch.Tensor:
    """(N, 3) colours in [-1, 1]: a grid over the RGB cube, enough to fit a 3 x C map with its bias."""
    levels = torch.tensor([-1.0, -0.35, 0.35, 1.0])
    return torch.cartesian_prod(levels, levels, levels)


@torch.no_grad()
def fit_projection(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares from the VAE's latents of flat colours to those colours: (weight (3, C), bias (3,)), float32
    on the pipeline's device."""
    vae = pipe.vae
    device = pipe._execution_device
    colours = _calibration_colours()
    pixels = colours.view(-1, 3, 1, 1).expand(-1, 3, _CALIBRATION_SIDE, _CALIBRATION_SIDE)
    z = vae.encode(pixels.to(device=device, dtype=vae.dtype)).latent_dist.mode().float()  # (N, C, h, w)
    features = z.mean(dim=(2, 3))  # a flat colour's latent is flat too, up to the border
    design = torch.cat([features, torch.ones(len(features), 1, device=features.device)], dim=1)
    solution = torch.linalg.lstsq(design.cpu(), colours.to(torch.float32)).solution  # (C + 1, 3)
    weight, bias = solution[:-1].T.contiguous(), solution[-1].contiguous()
    return weight.to(device), bias.to(device)


def projection_of(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    found = _projections.get(pipe)
    if found is None:
        found = _projections[pipe] = fit_projection(pipe)
    return found


@torch.no_grad()
def preview_images(pipe, latents: torch.Tensor, grid_h: int, grid_w: int) -> list[Image.Image]:
    """One small RGB sketch per row of the packed, normalised `latents`."""
    weight, bias = projection_of(pipe)
    z = unpacked_latents(pipe, latents.float(), grid_h, grid_w)  # (B, C, h, w)
    rgb = torch.einsum("oc,bchw->bohw", weight, z) + bias.view(1, 3, 1, 1)
    pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    images = []
    for array in pixels:
        image = Image.fromarray(array, "RGB")
        image.thumbnail((LONGEST_SIDE, LONGEST_SIDE), Image.Resampling.BILINEAR)
        images.append(image)
    return images


def jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


class StepPreviews:
    """Every `request.every` steps of a generation of width x height, a JPEG per image row to `request.deliver`."""

    def __init__(self, pipe, request: PreviewRequest, *, width: int, height: int):
        scale = pipe.vae_scale_factor * pipe.patch_size
        self.pipe, self.every, self.deliver = pipe, request.every, request.deliver
        self.grid = (height // scale, width // scale)

    def __call__(self, done: int, total: int, latents: torch.Tensor) -> None:
        if self.every <= 0 or done % self.every or done >= total:
            return
        try:
            jpegs = [jpeg(image) for image in preview_images(self.pipe, latents, *self.grid)]
        except Exception as exc:  # noqa: BLE001 - a preview is a courtesy: the generation goes on without it
            log.warning("preview at step %d skipped: %s", done, exc)
            return
        self.deliver(done, jpegs)
