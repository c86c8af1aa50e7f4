"""The stock `Ideogram4Pipeline.__call__`, exactly as diffusers ships it: the reference every faster path is
measured and tested against."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from worker.pipeline.spec import GenerationSpec, StepControl, seed_generators

if TYPE_CHECKING:
    from PIL import Image

    from worker.pipeline.loading import LoadedPipeline


def stock_call_kwargs(loaded: LoadedPipeline, spec: GenerationSpec) -> dict[str, Any]:
    """The arguments of the stock `pipe(...)` call for `spec` (also what benchmarks time as "stock")."""
    return {
        "prompt": spec.prompt_text,
        "height": spec.height,
        "width": spec.width,
        "num_inference_steps": spec.steps,
        "guidance_scale": None,
        "guidance_schedule": list(spec.guidance_schedule),
        "mu": spec.mu,
        "std": spec.std,
        "max_sequence_length": loaded.max_sequence_length,
        "num_images_per_prompt": len(spec.seeds),
        "generator": seed_generators(loaded.device, spec.seeds),
        "output_type": "pil",
    }


def generate_stock(loaded: LoadedPipeline, spec: GenerationSpec, control: StepControl) -> list[Image.Image]:
    def on_step_end(pipe, step_index, timestep, callback_kwargs):
        # Raising here leaves the stock loop at once: the pipeline has no cheaper way to stop early.
        control.step_done(step_index + 1, callback_kwargs.get("latents"))
        return callback_kwargs

    with torch.no_grad():
        output = loaded.pipe(**stock_call_kwargs(loaded, spec), callback_on_step_end=on_step_end)
    return list(output.images)
