"""The one entry point the worker generates through: a spec in, PIL images out, one per seed.

Two paths give the same images for the same spec and seeds:

- the stock `Ideogram4Pipeline.__call__` (`fast=False`): the reference, exactly as diffusers ships it;
- the worker's fast path (`fast=True`, `worker.fast_path`): tight text padding, no attention mask when nothing is
  padded, the text projection once a job, cached text encodings, optional regional compile.

Both report progress after every denoising step and stop at a step boundary when asked (lease lost, job canceled,
worker draining) by raising `GenerationInterrupted`, so no partial images ever leave this module.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from PIL import Image

    from common.pipeline_loader import LoadedPipeline

# The stock call pads every prompt to this many tokens; it is also the longest prompt either path accepts.
MAX_SEQUENCE_LENGTH = 2048
# VAE factor 8 x patch 2: image sides must be multiples of this.
SIDE_MULTIPLE = 16

StepCallback = Callable[[int, int], None]
StopCheck = Callable[[], bool]


@dataclass(frozen=True)
class GenerationSpec:
    """Everything that determines a job's pixels (with the model and its revision)."""

    prompt_text: str  # plain prompt, or a caption already serialized to JSON
    width: int
    height: int
    steps: int
    mu: float
    std: float
    guidance_schedule: tuple[float, ...]  # length == steps
    seeds: tuple[int, ...]  # one image per seed, in order

    def __post_init__(self) -> None:
        # Accept lists from JSON params but keep the spec hashable and immutable.
        object.__setattr__(self, "guidance_schedule", tuple(float(g) for g in self.guidance_schedule))
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if len(self.guidance_schedule) != self.steps:
            raise ValueError(f"guidance_schedule has {len(self.guidance_schedule)} entries for {self.steps} steps")
        if not self.seeds:
            raise ValueError("a spec needs at least one seed")
        for name, side in (("width", self.width), ("height", self.height)):
            if side <= 0 or side % SIDE_MULTIPLE:
                raise ValueError(f"{name} must be a positive multiple of {SIDE_MULTIPLE}, got {side}")


class GenerationInterrupted(Exception):
    """`should_stop()` returned True at a step boundary; no images were produced."""

    def __init__(self, steps_done: int, steps_total: int):
        super().__init__(f"generation stopped after {steps_done} of {steps_total} steps")
        self.steps_done = steps_done
        self.steps_total = steps_total


class StepControl:
    """Progress reporting and cooperative stopping at step boundaries, shared by both paths."""

    def __init__(self, total: int, on_step: StepCallback | None = None, should_stop: StopCheck | None = None):
        self.total = total
        self._on_step = on_step
        self._should_stop = should_stop

    def check(self, done: int) -> None:
        """Raise `GenerationInterrupted` if the caller wants the generation stopped."""
        if self._should_stop is not None and self._should_stop():
            raise GenerationInterrupted(done, self.total)

    def step_done(self, done: int) -> None:
        """Step `done` (1-based) finished: report it, then honour a stop request."""
        if self._on_step is not None:
            self._on_step(done, self.total)
        self.check(done)


def generate(
    loaded: LoadedPipeline,
    spec: GenerationSpec,
    *,
    fast: bool = True,
    on_step: StepCallback | None = None,
    should_stop: StopCheck | None = None,
) -> list[Image.Image]:
    """Generate one image per seed of `spec`, in seed order. Same spec, seeds and model: same pixels."""
    if fast:
        # Imported here: fast_path builds on this module's types.
        from worker.fast_path import generate_batch

        return generate_batch(loaded, [spec], on_step=on_step, should_stop=should_stop)[0]
    control = StepControl(spec.steps, on_step, should_stop)
    control.check(0)
    return _generate_stock(loaded, spec, control)


def seed_generators(device: str, seeds: tuple[int, ...]) -> list[torch.Generator]:
    """One generator per image, so each image's noise depends only on its own seed, never on its batch."""
    return [torch.Generator(device).manual_seed(seed) for seed in seeds]


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
        "max_sequence_length": MAX_SEQUENCE_LENGTH,
        "num_images_per_prompt": len(spec.seeds),
        "generator": seed_generators(loaded.device, spec.seeds),
        "output_type": "pil",
    }


def _generate_stock(loaded: LoadedPipeline, spec: GenerationSpec, control: StepControl) -> list[Image.Image]:
    def on_step_end(pipe, step_index, timestep, callback_kwargs):
        # Raising here leaves the stock loop at once: the pipeline has no cheaper way to stop early.
        control.step_done(step_index + 1)
        return callback_kwargs

    with torch.no_grad():
        output = loaded.pipe(**stock_call_kwargs(loaded, spec), callback_on_step_end=on_step_end)
    return list(output.images)
