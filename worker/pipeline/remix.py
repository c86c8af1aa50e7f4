"""Remix: start the denoising from an input image instead of pure noise (img2img on the fast path).

The image is resized to the job's size (scaled to cover it, then center-cropped, so its aspect is kept), encoded
with the VAE (the mode of its latent distribution: no sampling, so the same input always gives the same latents),
packed exactly as the transformer's latents are (the inverse of `fast_path.decode_latents`: VAE batch-norm
normalisation, 2x2 patches), and mixed with each image's seeded noise at the sigma where the remix's steps begin:
`sigma * noise + (1 - sigma) * image`, the flow-matching forward process (the scheduler's own `scale_noise`). The
loop then runs the schedule's last `remix_steps(steps, strength)` steps. So strength 1.0 runs every step from
almost pure noise, a low strength only the last few, staying close to the input; the same image, strength, prompt
and seed give the same bytes.
"""
from __future__ import annotations

import io
from typing import TYPE_CHECKING

import torch
from PIL import Image

if TYPE_CHECKING:
    from diffusers import Ideogram4Pipeline


def input_pixels(data: bytes) -> Image.Image:
    """The stored input as RGB; transparency is flattened onto white (what a viewer shows)."""
    image = Image.open(io.BytesIO(data))
    image.load()
    if image.mode in ("RGBA", "LA", "P"):
        image = image.convert("RGBA")
        flat = Image.new("RGBA", image.size, (255, 255, 255, 255))
        flat.alpha_composite(image)
        image = flat
    return image.convert("RGB")


def pack_latents(z: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) VAE latents to the transformer's (B, H/p * W/p, p * p * C) tokens: the inverse of
    `unpacked_latents`."""
    b, c, h, w = z.shape
    z = z.view(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 3, 5, 1)
    return z.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def _bn_stats(vae, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE batch-norm's per-channel mean and std over the packed channels, shaped (1, 1, C)."""
    mean = vae.bn.running_mean.view(1, 1, -1).to(device=device, dtype=dtype)
    std = torch.sqrt(vae.bn.running_var + vae.config.batch_norm_eps).view(1, 1, -1).to(device=device, dtype=dtype)
    return mean, std


def unpacked_latents(pipe: Ideogram4Pipeline, latents: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """Packed, normalised latents to the VAE's (B, C, H/8, W/8): the stock call's step 9 up to the decode (VAE
    batch-norm denormalisation, unpatch)."""
    bn_mean, bn_std = _bn_stats(pipe.vae, latents.device, latents.dtype)
    z = latents * bn_std + bn_mean
    patch = pipe.patch_size
    channels = z.shape[-1] // (patch * patch)
    z = z.view(z.shape[0], grid_h, grid_w, patch, patch, channels).permute(0, 5, 1, 3, 2, 4).contiguous()
    return z.view(z.shape[0], channels, grid_h * patch, grid_w * patch)


@torch.no_grad()
def encode_image(pipe: Ideogram4Pipeline, image: Image.Image, width: int, height: int) -> torch.Tensor:
    """The packed, normalised latents of `image` at width x height, shape (1, tokens, channels), float32."""
    vae = pipe.vae
    device = pipe._execution_device
    pixels = pipe.image_processor.preprocess(image, height=height, width=width, resize_mode="crop")
    z = vae.encode(pixels.to(device=device, dtype=vae.dtype)).latent_dist.mode().float()
    latents = pack_latents(z, pipe.patch_size)
    bn_mean, bn_std = _bn_stats(vae, device, torch.float32)
    return (latents - bn_mean) / bn_std


def noised(image_latents: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The flow-matching forward process at `sigma` (FlowMatchEulerDiscreteScheduler.scale_noise)."""
    return sigma * noise + (1.0 - sigma) * image_latents
