"""Shared helpers for the generation tests (imported explicitly, not a conftest): the tiny model loaded through the
real loader, spec construction and pixel comparison."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from common.devstack.tiny_model import build_tiny_model
from common.settings import ModelSettings
from worker.pipeline.loading import LoadedPipeline, load_pipeline
from worker.pipeline.spec import GenerationSpec

SHORT_PROMPT = "A photo of a cat"
LONG_CAPTION = (
    '{"high_level_description": "a vintage travel poster", "compositional_deconstruction": {"background": '
    '"a blue sky", "elements": [{"type": "text", "text": "VISIT THE ALPS", "desc": "large yellow title"}]}}'
)


def load_tiny(directory: Path) -> LoadedPipeline:
    """Build the tiny model in `directory` (once) and load it on the CPU through `load_pipeline`."""
    path = directory / "tiny"
    if not (path / "model_index.json").is_file():
        build_tiny_model(path, seed=0)
    return load_pipeline(ModelSettings(id=str(path)), device="cpu")


def make_spec(prompt: str = SHORT_PROMPT, seeds: tuple[int, ...] = (1, 2), *, width: int = 32, height: int = 48,
              steps: int = 4) -> GenerationSpec:
    """A small spec with the presets' shape of guidance: 7.0, then 3.0 for the last step."""
    return GenerationSpec(prompt_text=prompt, width=width, height=height, steps=steps, mu=0.0, std=1.75,
                          guidance_schedule=(7.0,) * (steps - 1) + (3.0,), seeds=seeds)


def pixel_diff(a: list, b: list) -> tuple[int, float]:
    """(largest per-channel difference in uint8 levels, fraction of channel values that differ at all)."""
    assert len(a) == len(b)
    diffs = [np.abs(np.asarray(x, dtype=np.int16) - np.asarray(y, dtype=np.int16)) for x, y in zip(a, b)]
    largest = max(int(d.max()) for d in diffs)
    fraction = sum(int((d > 0).sum()) for d in diffs) / sum(d.size for d in diffs)
    return largest, fraction


def image_bytes(images: list) -> list[bytes]:
    return [image.tobytes() for image in images]
