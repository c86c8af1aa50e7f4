"""What a generation is, for every path: the spec that determines a job's pixels, its limits, which specs may share
one denoising pass, per-image seed generators, and cooperative progress/stop at step boundaries."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from common.presets import remix_steps
from common.settings import ModelSettings
from worker.pipeline.adapters import LoraUse

# The stock call pads every prompt to this many tokens; it is also the longest prompt either path accepts. The
# default of `settings.model.max_sequence_length`, which a loaded pipeline carries (`LoadedPipeline`).
MAX_SEQUENCE_LENGTH = ModelSettings.model_fields["max_sequence_length"].default
# VAE factor 8 x patch 2: image sides must be multiples of this.
SIDE_MULTIPLE = 16

StepCallback = Callable[[int, int], None]
StopCheck = Callable[[], bool]


@dataclass(frozen=True)
class InitImage:
    """A remix's input image: its sha256 and strength decide the pixels (and compare specs); `data` is the stored
    file's bytes, verified against the sha256 by whoever read it (empty in specs that only serve to compare)."""

    sha256: str
    strength: float  # 0 < strength <= 1: the share of the schedule run from the noised image
    data: bytes = field(default=b"", compare=False, repr=False)


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
    loras: tuple[LoraUse, ...] = ()  # adapters applied, in order (worker.pipeline.adapters)
    init_image: InitImage | None = None  # a remix: start from this image, noised (worker.pipeline.remix)

    def __post_init__(self) -> None:
        # Accept lists from JSON params but keep the spec hashable and immutable.
        object.__setattr__(self, "guidance_schedule", tuple(float(g) for g in self.guidance_schedule))
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        object.__setattr__(self, "loras", tuple(self.loras))
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if len(self.guidance_schedule) != self.steps:
            raise ValueError(f"guidance_schedule has {len(self.guidance_schedule)} entries for {self.steps} steps")
        if not self.seeds:
            raise ValueError("a spec needs at least one seed")
        for name, side in (("width", self.width), ("height", self.height)):
            if side <= 0 or side % SIDE_MULTIPLE:
                raise ValueError(f"{name} must be a positive multiple of {SIDE_MULTIPLE}, got {side}")
        if self.init_image is not None and self.steps_run < 1:
            raise ValueError(f"strength {self.init_image.strength} of {self.steps} steps runs no step")

    @property
    def steps_run(self) -> int:
        """The denoising steps this spec runs: all of them, or a remix's last ones (common.presets.remix_steps)."""
        return self.steps if self.init_image is None else remix_steps(self.steps, self.init_image.strength)


class UnsupportedRequest(ValueError):
    """The loaded model cannot run this request (a guided preset on a distilled checkpoint); the job fails with
    this message, the worker keeps serving."""


class GenerationInterrupted(Exception):
    """`should_stop()` returned True at a step boundary; no images were produced."""

    def __init__(self, steps_done: int, steps_total: int):
        super().__init__(f"generation stopped after {steps_done} of {steps_total} steps")
        self.steps_done = steps_done
        self.steps_total = steps_total


class StepControl:
    """Progress reporting and cooperative stopping at step boundaries, shared by both paths."""

    def __init__(self, total: int, on_step: StepCallback | None = None, should_stop: StopCheck | None = None,
                 preview: Callable[[int, int, torch.Tensor], None] | None = None):
        self.total = total
        self._on_step = on_step
        self._should_stop = should_stop
        self._preview = preview  # worker.pipeline.previews.StepPreviews, when previews were asked for

    def check(self, done: int) -> None:
        """Raise `GenerationInterrupted` if the caller wants the generation stopped."""
        if self._should_stop is not None and self._should_stop():
            raise GenerationInterrupted(done, self.total)

    def step_done(self, done: int, latents: torch.Tensor | None = None) -> None:
        """Step `done` (1-based) finished with these latents: report it (and a preview, when due), then honour a
        stop request."""
        if self._on_step is not None:
            self._on_step(done, self.total)
        if self._preview is not None and latents is not None:
            self._preview(done, self.total, latents)
        self.check(done)


def seed_generators(device: str, seeds: tuple[int, ...]) -> list[torch.Generator]:
    """One generator per image, so each image's noise depends only on its own seed, never on its batch."""
    return [torch.Generator(device).manual_seed(seed) for seed in seeds]


def co_batch_key(spec: GenerationSpec) -> tuple:
    """Specs with equal keys may run as one denoising pass (same size, schedule, guidance, adapters and remix
    input; prompts and seeds differ): the worker's co-batching (worker.co_batching) and the fast path's batches
    both group by it."""
    return (spec.width, spec.height, spec.steps, spec.mu, spec.std, tuple(spec.guidance_schedule),
            tuple(lora.identity for lora in spec.loras), spec.init_image)
