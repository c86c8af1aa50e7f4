"""Memory plans: which weight variant and text-encoder placement fit a GPU, from measured peaks, not guesses.

Why a table: the model's memory is weights plus activations, and the activations (two 9.3B transformers over
4,096 or 16,384 image tokens, the VAE decoding 1 or 4 megapixels) and the quantized variants' real footprints are
not worth predicting from parameter counts when they can be measured. `letterpress bench memory-plans`
(worker/bench/memory_plans.py) measures every plan on one large GPU; this module keeps those numbers and chooses
from them. Pure (no torch), so the choice is tested on CPU.

A plan is a weight variant and where the Qwen3-VL text encoder lives:

- `resident`: on the GPU for the worker's life (the encoder runs once a job, then sits idle through the whole
  denoising loop);
- `offload`: its repeated blocks in CPU memory, copied onto the GPU one block at a time while a prompt is encoded
  (worker.pipeline.loading.TextEncoderOffload); a cached prompt costs nothing, a new one pays the copy.

`choose` picks the fastest exact variant (`variants_for`: fp8 and int8 are approximate, so `auto` never picks them;
they stay explicit choices, issue 15) whose measured need (the smallest memory cap it ran under, plus
`HEADROOM_BYTES`) fits the device at the largest image the worker may be sent, resident before offloaded.
`placement_for` answers the same for one variant (an explicit `LETTERPRESS_MODEL__VARIANT`). Why the caps and not
the peaks: see `Peak`. int8 has no measured plans yet (`MEASURED_VARIANTS`): the loader loads it resident, unchecked.
"""
from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30
# What a card needs beyond the smallest memory cap a plan ran under: the CUDA context and loaded kernel modules,
# which torch's allocator (and so the cap) does not count (0.60 GiB measured on the H200), and a little spare.
HEADROOM_BYTES = 1 * GIB
# Fastest first (docs/PERFORMANCE.md, H200 at 1024²: compiled fp8 0.182 s a step, bf16 0.271, nf4-dequant 0.271;
# nf4 0.434 eager, the bench does not compile it); bf16 and nf4-dequant run at one speed, bf16 keeps the
# checkpoint's exact numbers.
# int8 (sm_80+, for Ampere, which has no fp8) is measured on the H200 only: 0.261 s against bf16's 0.276 in one
# process (docs/PERFORMANCE.md, "The int8 variant on the H200"); where it stands on an A100 is not measured.
SPEED_ORDER = ("fp8", "int8", "bf16", "nf4-dequant", "nf4")
APPROXIMATE = frozenset({"fp8", "int8"})  # change the checkpoint's numbers: only when asked for by name
PLACEMENTS = ("resident", "offload")  # preferred first: offload pays a copy for each new prompt
FP8_MIN_CAPABILITY = (8, 9)
INT8_MIN_CAPABILITY = (8, 0)  # int8 tensor cores: Ampere and newer


@dataclass(frozen=True)
class Peak:
    """One plan at one size, GiB, over the measured prompts (201 and 1,866 tokens) and batches (1; and 2 at 1024²,
    which the compile warm-up and `num_images: 2` run).

    `runs_under` decides: the smallest `set_per_process_memory_fraction` cap the worst case ran under. The uncapped
    peaks are bigger and only informative: with memory to spare the allocator caches freed blocks (`reserved`) and
    cuDNN picks convolution algorithms with larger workspaces, both of which give way under a cap as on a smaller
    card.
    """

    allocated: float  # torch.cuda.max_memory_allocated, uncapped
    reserved: float  # torch.cuda.max_memory_reserved, uncapped
    runs_under: float  # the smallest cap tried that the worst case ran under
    load: float = 0.0  # peak allocated while loading, where measured (fp8 quantizes on the GPU)

    @property
    def need_bytes(self) -> int:
        return int(max(self.runs_under, self.load) * GIB) + HEADROOM_BYTES


# MEASURED with `python3 -m worker.bench memory-plans --steps 1` on one NVIDIA H200 (139.8 GiB; torch 2.11.0+cu130,
# diffusers 0.42.1, transformers 5.17.0, torchao 0.18.0, bitsandbytes 0.50.2), 2026-12-02: real-size random bf16
# weights (worker.bench.models.build_random_real), fast path eager, prompt encode, one guided step (both
# transformers) and the VAE decode. Caps were tried at the worst case's peak + 1.5, 3 and 5 GiB, and at 24, 40 and
# 48 GB for some plans (docs/PERFORMANCE.md, "Memory plans"). Keyed by (variant, text encoder, square side).
MEASURED: dict[tuple[str, str, int], Peak] = {
    ("fp8", "resident", 1024): Peak(allocated=36.82, reserved=43.78, runs_under=38.32),
    ("fp8", "resident", 2048): Peak(allocated=39.34, reserved=50.72, runs_under=42.34),  # failed under 40.84
    ("fp8", "offload", 1024): Peak(allocated=23.39, reserved=30.10, runs_under=24.89, load=20.13),
    ("fp8", "offload", 2048): Peak(allocated=26.40, reserved=37.01, runs_under=27.90, load=20.13),
    ("bf16", "resident", 1024): Peak(allocated=54.04, reserved=59.45, runs_under=55.54),
    ("bf16", "resident", 2048): Peak(allocated=59.56, reserved=69.31, runs_under=61.06),
    ("bf16", "offload", 1024): Peak(allocated=40.10, reserved=45.71, runs_under=41.60),  # failed under 37.25
    ("bf16", "offload", 2048): Peak(allocated=44.12, reserved=53.58, runs_under=44.70),
    ("nf4-dequant", "resident", 1024): Peak(allocated=43.77, reserved=48.68, runs_under=45.27),
    ("nf4-dequant", "resident", 2048): Peak(allocated=46.79, reserved=55.05, runs_under=48.29),
    ("nf4-dequant", "offload", 1024): Peak(allocated=39.53, reserved=45.21, runs_under=41.03),  # failed under 37.25
    ("nf4-dequant", "offload", 2048): Peak(allocated=42.55, reserved=51.58, runs_under=45.55),  # failed under 44.05
    ("nf4", "resident", 1024): Peak(allocated=19.05, reserved=23.67, runs_under=20.55),
    ("nf4", "resident", 2048): Peak(allocated=22.07, reserved=28.08, runs_under=23.57),  # failed under 22.35
    ("nf4", "offload", 1024): Peak(allocated=14.77, reserved=21.53, runs_under=17.77),  # failed under 16.27
    ("nf4", "offload", 2048): Peak(allocated=17.79, reserved=27.12, runs_under=22.35),  # failed under 20.79
}
MEASURED_SIDES = (1024, 2048)
MEASURED_VARIANTS = frozenset(variant for variant, _, _ in MEASURED)  # not int8: its plans are not measured yet
MAX_MEASURED_PIXELS = MEASURED_SIDES[-1] ** 2


@dataclass(frozen=True)
class MemoryPlan:
    variant: str
    text_encoder: str  # "resident" | "offload"
    side: int = 0  # the measured square size the plan was checked at (0: not checked, e.g. on CPU)
    need_bytes: int = 0  # measured peak + headroom at that size

    def describe(self) -> str:
        where = ("the text encoder resident on the GPU" if self.text_encoder == "resident"
                 else "the text encoder offloaded to CPU memory between jobs")
        need = f", needs {self.need_bytes / 1e9:.1f} GB at up to {self.side}x{self.side}" if self.need_bytes else ""
        return f"variant {self.variant} with {where}{need}"


def measured_side(max_pixels: int) -> int | None:
    """The smallest measured square size holding `max_pixels` pixels; None beyond the table."""
    return next((side for side in MEASURED_SIDES if max_pixels <= side * side), None)


def plan_for(variant: str, text_encoder: str, max_pixels: int) -> MemoryPlan | None:
    """The measured plan for a variant and placement at images up to `max_pixels`; None if not measured."""
    side = measured_side(max_pixels)
    peak = MEASURED.get((variant, text_encoder, side)) if side else None
    if peak is None:
        return None
    return MemoryPlan(variant=variant, text_encoder=text_encoder, side=side, need_bytes=peak.need_bytes)


def placement_for(variant: str, total_memory: int, max_pixels: int) -> MemoryPlan | None:
    """`variant` with the text encoder resident if that fits `total_memory` bytes, else offloaded if that fits;
    None if neither does (or the size is beyond the table)."""
    for text_encoder in PLACEMENTS:
        plan = plan_for(variant, text_encoder, max_pixels)
        if plan is not None and plan.need_bytes <= total_memory:
            return plan
    return None


_MIN_CAPABILITY = {"fp8": FP8_MIN_CAPABILITY, "int8": INT8_MIN_CAPABILITY}


def variants_for(capability: tuple[int, int] | None, *, approximate: bool = False) -> tuple[str, ...]:
    """The variants a GPU of this compute capability runs, fastest first: the exact ones (what `auto` may pick),
    and with `approximate` also fp8 and int8 where the GPU has their tensor cores (never for `auto`)."""
    def runs(variant: str) -> bool:
        need = _MIN_CAPABILITY.get(variant)
        return need is None or (capability is not None and tuple(capability) >= need)

    return tuple(v for v in SPEED_ORDER if runs(v) and (approximate or v not in APPROXIMATE))


def choose(total_memory: int, capability: tuple[int, int] | None, max_pixels: int) -> MemoryPlan | None:
    """The fastest plan that fits a GPU of `total_memory` bytes at images up to `max_pixels`; None if none does."""
    for variant in variants_for(capability):
        plan = placement_for(variant, total_memory, max_pixels)
        if plan is not None:
            return plan
    return None


def smallest(max_pixels: int) -> MemoryPlan | None:
    """The measured plan that needs the least memory at `max_pixels` (what a refusal names when nothing fits)."""
    plans = [plan_for(v, te, max_pixels) for v in SPEED_ORDER for te in PLACEMENTS]
    plans = [p for p in plans if p is not None]
    return min(plans, key=lambda p: p.need_bytes) if plans else None
