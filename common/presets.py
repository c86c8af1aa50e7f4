"""Ideogram 4 sampling presets (DESIGN.md): steps, logit-normal (mu, std), and the guidance schedule
(7.0 for the main steps, 3.0 for the final "polish" steps).

The CFG-free presets (`guidance=1.0`: V4_FAST_20, V4_INSTANT_8) are for distilled checkpoints, trained to sample
without classifier-free guidance. At guidance 1.0 the blend `g * cond + (1 - g) * uncond` is the conditional
velocity exactly, so the worker skips the unconditional transformer's pass at such steps (worker.pipeline.fast_path)
and a checkpoint may ship without that transformer at all."""
from __future__ import annotations

from dataclasses import dataclass

MAIN_GUIDANCE = 7.0
POLISH_GUIDANCE = 3.0


@dataclass(frozen=True)
class Preset:
    name: str
    steps: int
    mu: float
    std: float
    polish_steps: int
    guidance: float | None = None  # one guidance for every step (CFG-free presets); None: main, then polish

    def guidance_schedule(self, steps: int | None = None, guidance_scale: float | None = None) -> tuple[float, ...]:
        """Per-step guidance. A constant `guidance_scale` override replaces the schedule; a `steps` override keeps
        the preset's number of polish steps at the end."""
        n = steps or self.steps
        if guidance_scale is not None or self.guidance is not None:
            return (float(guidance_scale if guidance_scale is not None else self.guidance),) * n
        polish = min(self.polish_steps, max(n - 1, 0))
        return (MAIN_GUIDANCE,) * (n - polish) + (POLISH_GUIDANCE,) * polish


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("V4_QUALITY_48", 48, 0.0, 1.5, 3),
        Preset("V4_HIGH_34", 34, 0.0, 1.6875, 2),
        Preset("V4_DEFAULT_20", 20, 0.0, 1.75, 2),
        Preset("V4_FAST_16", 16, 0.25, 1.8375, 1),
        Preset("V4_TURBO_12", 12, 0.5, 1.75, 1),
        # CFG-free, for distilled checkpoints (module docstring); their mu follows the guided presets of the
        # same speed (DEFAULT's 0.0 at 20 steps, TURBO's 0.5 for the fewest steps)
        Preset("V4_FAST_20", 20, 0.0, 1.75, 0, guidance=1.0),
        Preset("V4_INSTANT_8", 8, 0.5, 1.75, 0, guidance=1.0),
    )
}

UNGUIDED = 1.0  # a step at this guidance needs no unconditional pass


def needs_unconditional(guidance_schedule: tuple[float, ...] | list[float]) -> bool:
    """Whether any step blends in the unconditional transformer (a distilled checkpoint without one cannot)."""
    return any(g != UNGUIDED for g in guidance_schedule)

# Ideogram API `rendering_speed` values mapped onto presets.
RENDERING_SPEED = {"QUALITY": "V4_QUALITY_48", "DEFAULT": "V4_DEFAULT_20", "TURBO": "V4_TURBO_12"}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; one of {', '.join(PRESETS)}") from None


def remix_steps(steps: int, strength: float) -> int:
    """How many of a schedule's steps a remix runs: the last `strength` of them (diffusers' img2img rule): the input
    image is noised to the sigma where they begin. 0 means too few steps for this strength."""
    return min(int(steps * strength), steps)


def steps_run(params: dict) -> int:
    """The denoising steps a job's stored params run: all of them, or a remix's last ones."""
    if params.get("image"):
        return remix_steps(params["steps"], params["strength"])
    return params["steps"]
