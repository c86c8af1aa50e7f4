"""The one entry point the worker generates through: a spec in, PIL images out, one per seed.

Two paths give the same images for the same spec and seeds:

- the stock `Ideogram4Pipeline.__call__` (`fast=False`): the reference, exactly as diffusers ships it;
- the worker's fast path (`fast=True`, `worker.pipeline.fast_path`): tight text padding, no attention mask when
  nothing is padded, the text projection once a job, cached text encodings, optional regional compile.

Both report progress after every denoising step (with a preview every few steps when asked:
worker.pipeline.previews) and stop at a step boundary when asked (lease lost, job canceled,
worker draining) by raising `GenerationInterrupted`, so no partial images ever leave this module.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from worker.pipeline.adapters import adapters_of
from worker.pipeline.fast_path import generate_batch
from worker.pipeline.previews import PreviewRequest, StepPreviews
from worker.pipeline.spec import GenerationSpec, StepCallback, StepControl, StopCheck, UnsupportedRequest
from worker.pipeline.stock import generate_stock

if TYPE_CHECKING:
    from PIL import Image

    from worker.pipeline.loading import LoadedPipeline


def generate(
    loaded: LoadedPipeline,
    spec: GenerationSpec,
    *,
    fast: bool = True,
    on_step: StepCallback | None = None,
    should_stop: StopCheck | None = None,
    previews: PreviewRequest | None = None,
) -> list[Image.Image]:
    """Generate one image per seed of `spec`, in seed order. Same spec, seeds and model: same pixels."""
    if fast:
        return generate_batch(loaded, [spec], on_step=on_step, should_stop=should_stop, previews=previews)[0]
    if spec.init_image is not None:
        raise UnsupportedRequest("a remix (`image`) runs on the fast path only (LETTERPRESS_MODEL__FAST_PATH=true)")
    if loaded.pipe.unconditional_transformer is None:
        raise UnsupportedRequest("the stock diffusers call needs an unconditional_transformer, which this distilled "
                                 "checkpoint has not: run it on the fast path (LETTERPRESS_MODEL__FAST_PATH=true)")
    preview = StepPreviews(loaded.pipe, previews, width=spec.width, height=spec.height) if previews else None
    control = StepControl(spec.steps, on_step, should_stop, preview)
    control.check(0)
    adapters_of(loaded).activate(spec.loras)
    return generate_stock(loaded, spec, control)
