"""The GPU runner: `load()` once at worker start (warm), then `run(spec)` for every job of the worker's life
(`run_batch(specs)` for a dynamic batch, worker.co_batching)."""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Callable

import torch
from PIL import Image

from common.settings import Settings
from worker import metrics
from worker.pipeline.adapters import LoadedAdapters, adapters_of
from worker.pipeline.fast_path import generate_batch, prepare_compiled
from worker.pipeline.generation import generate
from worker.pipeline.loading import LoadedPipeline, default_model_id, load_pipeline
from worker.pipeline.previews import PreviewRequest

log = logging.getLogger(__name__)


class PipelineRunner:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.loaded: LoadedPipeline | None = None
        self.load_s = 0.0

    @property
    def model_id(self) -> str:
        return self.loaded.model_id if self.loaded else ""

    @property
    def variant(self) -> str:
        """fast | stock (worker.pipeline.loading), "" before `load`."""
        return self.loaded.variant if self.loaded else ""

    @property
    def config(self) -> str:
        """What decides this worker's pixels beyond the model: variant, path and compile (the result cache keys on
        it: differently configured workers round differently)."""
        compiled = bool(self.loaded and getattr(self.loaded.pipe, "_letterpress_compiled", False))
        return f"{self.variant}/fast_path={self.settings.model.fast_path}/compiled={compiled}"

    @property
    def revision(self) -> str | None:
        return self.loaded.revision if self.loaded else None

    @property
    def gpu_kind(self) -> str:
        """The device's name as usage records and `letterpress status` show it ("NVIDIA H200"), or "cpu"."""
        if self.loaded is None:
            return ""
        device = torch.device(self.loaded.device)
        return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type

    def load(self) -> None:
        model = self.settings.model
        if not model.id:
            model = model.model_copy(update={"id": default_model_id(self.settings)})
        t0 = time.perf_counter()
        self.loaded = load_pipeline(model)
        threads = self.settings.worker.cpu_threads
        if threads and str(self.loaded.device) == "cpu":
            torch.set_num_threads(threads)
        adapters = adapters_of(self.loaded)
        adapters.resident = self.settings.adapters.resident
        if model.compile or (model.compile is None and str(self.loaded.device).startswith("cuda")):
            self._prepare_slots(adapters)
            prepare_compiled(self.loaded)
        self.load_s = time.perf_counter() - t0
        log.info("pipeline %s (%s, %s) warm in %.1fs", self.loaded.model_id, self.loaded.variant,
                 self.loaded.device, self.load_s)

    def _prepare_slots(self, adapters: LoadedAdapters) -> None:
        """Hot-swap slots before the compile (adapters then switch without recompiling); a worker that cannot
        hold them serves jobs without adapters and fails those with, saying why."""
        settings = self.settings.adapters
        slots = settings.max_per_job if settings.compiled_slots is None else settings.compiled_slots
        if not slots:
            adapters.unavailable = "this worker serves no adapters (LETTERPRESS_ADAPTERS__COMPILED_SLOTS=0)"
            return
        try:
            adapters.prepare_slots(slots=slots, rank=settings.max_rank)
        except Exception as exc:  # noqa: BLE001 - e.g. a quantized variant peft cannot wrap
            adapters.unavailable = f"this worker cannot hold adapters ({self.loaded.variant}): {exc}"
            log.error("%s; serving jobs without adapters only", adapters.unavailable)

    def run(self, spec, *, on_step: Callable[[int, int], None] | None = None,
            should_stop: Callable[[], bool] | None = None,
            previews: PreviewRequest | None = None) -> list[Image.Image]:
        if self.loaded is None:
            self.load()
        with _adapter_metrics(adapters_of(self.loaded)):
            return generate(self.loaded, spec, fast=self.settings.model.fast_path, on_step=on_step,
                            should_stop=should_stop, previews=previews)

    def run_batch(self, specs, *, on_step: Callable[[int, int], None] | None = None,
                  should_stop: Callable[[], bool] | None = None,
                  previews: PreviewRequest | None = None) -> list[list[Image.Image]]:
        """Several jobs' specs (one `co_batch_key`) as one fast-path call; one list of images per spec."""
        if self.loaded is None:
            self.load()
        with _adapter_metrics(adapters_of(self.loaded)):
            return generate_batch(self.loaded, specs, on_step=on_step, should_stop=should_stop, previews=previews)


@contextmanager
def _adapter_metrics(adapters: LoadedAdapters):
    """What this generation's adapter switching cost, into the worker's counters (also when it failed)."""
    before = (adapters.switches, adapters.loads, adapters.switch_s)
    try:
        yield
    finally:
        metrics.ADAPTER_SWITCHES.inc(adapters.switches - before[0])
        metrics.ADAPTER_LOADS.inc(adapters.loads - before[1])
        metrics.ADAPTER_SWITCH_SECONDS.inc(adapters.switch_s - before[2])
