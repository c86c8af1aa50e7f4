"""`letterpress bench`: what one GPU does with Ideogram 4, every path side by side, in one run.

    python -m worker.bench                                  # real-size random weights on the GPU, everything
    python -m worker.bench --sizes 1024 --variants stock,fast,compile
    python -m worker.bench --model /models/ideogram-4       # a checkpoint, loaded once per weight variant
    python -m worker.bench --size tiny --device cpu         # the tiny model (the CI smoke test)
    python -m worker.bench --e2e                            # REST -> queue -> worker -> storage -> Postgres
    python -m worker.bench profile                          # where one step's GPU time goes (worker.bench.profile)

What it reports (JSON and a markdown table under `--out`):

- per row (a weight variant x a code path x a size x a batch): seconds per denoising step (median of the timed
  steps after the first), the fixed cost of a call (text encoding, latents, VAE decode, PIL), images per minute at
  each preset (`60 * batch / (fixed + steps * s_step)`: s/step does not depend on the preset, so each preset's rate
  follows from one timed run instead of running 48 steps every time), peak GPU memory, TFLOP/s (matmul FLOPs of
  what the path executes, and of the useful work, i.e. the trimmed formulation, for every path alike), and the
  pixel difference of its image against the stock call's image (same seed, same weights, same steps);
- batching rows (the batch path at several batch sizes, prompts of different lengths: what dynamic batching of
  different jobs would run) and an equivalence run at a full preset's steps;
- with `--e2e`: the platform's rate (jobs submitted over REST, Celery over Redis, a worker process, file storage,
  Postgres) against the bare in-process loop of the same worker process on the same GPU.

Paths: `stock` is the stock `Ideogram4Pipeline.__call__` (text left-padded to 2,048 tokens, dense segment mask);
`stock-tight` is the same call with `max_sequence_length` equal to the prompt's length (no padding, mask still
there); `fast` is `worker.pipeline.fast_path` (eager); `fast+compile` adds regional compile (`prepare_compiled`).
Weights: `bf16`; `nf4` (bitsandbytes NF4 in both transformers and the text encoder, as the published checkpoint
ships); `nf4-dequant` (the NF4 weights dequantized once to dense bf16 by the loader's `dequantize_linear4bit`);
`int8` and `fp8` (the loader's torchao int8 and float8 dynamic quantization of the repeated blocks). With random
weights the variants are made in place, one after another (bf16 -> nf4 -> nf4-dequant -> int8 | fp8) with the
loader's own conversion functions (int8 and fp8 both need dense weights: a run takes one of them); with `--model`
each is a fresh `load_pipeline` of that variant. A stage the GPU cannot run (fp8 below sm_89) is skipped, saying why.

Error against the first stage (bf16; fp32 on CPU), same inputs: one conditional transformer pass on fixed random
latents at mid-schedule (`rel_err = ||v - v_ref|| / ||v_ref||`, at each size), every timed row's image against
the first stage's image of the same path and size, and a full preset's image (`--error-steps`, fast path).

Random weights of the real sizes give the real model's speed and memory, not its images: the pixel differences
are those of a random network, which amplifies rounding differences more than a trained one is likely to.
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from common.presets import PRESETS
from worker.bench import e2e as bench_e2e
from worker.bench import matmuls
from worker.bench.models import (
    DEFAULT_PROMPT,
    build_random_real,
    make_spec,
    step_flops,
    uncompile,
)

PATHS = ("stock", "stock-tight", "fast", "compile", "compile-cudnn")
CUDNN_FIRST = ("CUDNN_ATTENTION",)
WEIGHT_STAGES = ("bf16", "nf4", "nf4-dequant", "int8", "fp8")
# Which code paths each weight stage runs, in order (eager first, compile last).
STAGE_PATHS = {
    "fp32": ("stock", "stock-tight", "fast", "compile"),
    "bf16": ("stock", "stock-tight", "fast", "compile", "compile-cudnn"),
    "nf4": ("stock", "fast"),
    "nf4-dequant": ("fast", "compile"),
    "int8": ("fast", "compile", "compile-cudnn"),
    "fp8": ("fast", "compile", "compile-cudnn"),
}
DEFAULT_PRESETS = ("V4_QUALITY_48", "V4_DEFAULT_20", "V4_TURBO_12")
_BATCH_SUFFIXES = ("", " A second line of text.", " Another, longer, line of text for the poster.",
                   " And a fourth line: menu board, chalk lettering, prices 1 2 3 4 5.")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------------------------
# The model under test


def to_nf4(module: torch.nn.Module, compute_dtype: torch.dtype = torch.bfloat16) -> int:
    """Swap every `nn.Linear` of `module` for a bitsandbytes NF4 `Linear4bit` (what the NF4 checkpoint runs).

    Bench-only: the product loads NF4 through `from_pretrained` with a quantization config; random weights have
    no checkpoint, so they are quantized in place, layer by layer (the bf16 copy of each is freed as it goes).
    """
    import bitsandbytes as bnb

    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.Linear):
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=False, quant_type="nf4",
                                  device="meta")
            weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=False,
                                       quant_type="nf4", module=q)
            q.weight = weight._quantize(child.weight.device)
            if child.bias is not None:
                q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(module, name, q)
            count += 1
        else:
            count += to_nf4(child, compute_dtype)
    return count


class Stages:
    """Yields (weights, LoadedPipeline) for each weight stage, in order.

    Random weights: one pipeline converted in place with the loader's functions. A checkpoint (`--model`, or the
    tiny model): `load_pipeline` once per variant, the previous one freed first.
    """

    def __init__(self, args, device: str, log: Callable[[str], None]):
        self.args, self.device, self.log = args, device, log
        self.build_s: dict[str, float] = {}

    def __iter__(self):
        if self.args.model or self.args.size == "tiny":
            yield from self._loaded_stages()
        else:
            yield from self._random_stages()

    def _stages(self) -> list[str]:
        from worker.pipeline.loading import ModelConfigError, check_gpu_capable, detect_device

        if not self.device.startswith("cuda"):
            return ["fp32"]
        stages = []
        for stage in (s for s in WEIGHT_STAGES if s in self.args.weights):
            try:
                if stage in ("fp8", "int8"):
                    check_gpu_capable(stage, detect_device(self.device))
                stages.append(stage)
            except ModelConfigError as exc:
                self.log(f"{stage}: skipped: {exc}")
        return stages

    def _random_stages(self):
        from worker.pipeline.loading import dequantize_linear4bit, quantize_pipeline

        t0 = time.perf_counter()
        loaded = build_random_real(self.device)
        _sync(self.device)
        self.build_s["bf16"] = time.perf_counter() - t0
        current = "bf16"
        for stage in self._stages():
            t0 = time.perf_counter()
            if stage == "nf4":
                uncompile(loaded.pipe)
                n = sum(to_nf4(m) for m in (loaded.pipe.transformer, loaded.pipe.unconditional_transformer,
                                            loaded.pipe.text_encoder.language_model))
                self.log(f"nf4: {n} linear layers quantized")
            elif stage == "nf4-dequant":
                if current != "nf4":
                    self.log("nf4-dequant needs the nf4 stage first: skipped")
                    continue
                uncompile(loaded.pipe)
                n = sum(dequantize_linear4bit(t) for t in (loaded.pipe.transformer,
                                                            loaded.pipe.unconditional_transformer))
                self.log(f"nf4-dequant: {n} layers dequantized (text encoder stays nf4, as in the loader)")
            elif stage in ("int8", "fp8"):
                if current in ("int8", "fp8"):
                    self.log(f"{stage} needs dense weights and {current} replaced them: skipped (run {stage} "
                             "in a bench of its own)")
                    continue
                uncompile(loaded.pipe)
                if current == "nf4":  # int8 and fp8 need dense weights
                    dequantize_linear4bit(loaded.pipe.transformer)
                    dequantize_linear4bit(loaded.pipe.unconditional_transformer)
                quantize_pipeline(loaded.pipe, stage)
            gc.collect()
            torch.cuda.empty_cache()
            _sync(self.device)
            if stage != "bf16":
                self.build_s[stage] = time.perf_counter() - t0
            current = stage
            loaded.variant = stage
            yield stage, loaded

    def _loaded_stages(self):
        from common.settings import ModelSettings
        from worker.pipeline.loading import load_pipeline

        path = self.args.model or str(self._tiny_path())
        for stage in self._stages():
            t0 = time.perf_counter()
            loaded = load_pipeline(ModelSettings(id=path, variant=stage), device=self.device)
            _sync(self.device)
            self.build_s[stage] = time.perf_counter() - t0
            yield stage, loaded
            del loaded
            gc.collect()
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()

    def _tiny_path(self) -> Path:
        from common.devstack.tiny_model import build_tiny_model

        return build_tiny_model(Path(tempfile.mkdtemp(prefix="letterpress-bench-")) / "tiny")


# --------------------------------------------------------------------------------------------------------------
# FLOPs


def gemm_peaks(device: str) -> dict[str, float]:
    """bf16 and fp8 8192^3 matmul rates on random data: the ceilings the TFLOP/s columns are read against."""
    if not device.startswith("cuda"):
        return {}
    out: dict[str, float] = {}
    n, reps = 8192, 20
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)

    def rate(fn) -> float:
        return matmuls.rate(fn, 2.0 * n**3, reps)

    out["bf16_tflops"] = rate(lambda: a @ b)
    try:
        a8, b8 = a.to(torch.float8_e4m3fn), b.t().contiguous().t().to(torch.float8_e4m3fn)
        one = torch.tensor(1.0, device=device)
        out["fp8_tflops"] = rate(lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one,
                                                           out_dtype=torch.bfloat16))
    except Exception as exc:  # noqa: BLE001 - no fp8 on this GPU: say so in the report
        out["fp8_error"] = f"{type(exc).__name__}: {exc}"[:200]
    torch.cuda.empty_cache()
    return out


# --------------------------------------------------------------------------------------------------------------
# Timed calls


def _timing(t0: float, t1: float, marks: list[float], steps: int) -> dict[str, float]:
    intervals = [b - a for a, b in zip([t0] + marks[:-1], marks)]
    # The first interval also holds the text encoding and setup; later ones are pure steps.
    s_step = statistics.median(intervals[1:]) if len(intervals) > 2 else intervals[-1]
    total = t1 - t0
    return {"s_step": s_step, "fixed_s": max(total - steps * s_step, 0.0), "total_s": total,
            "steps_timed": steps, "step_spread": (max(intervals[1:]) - min(intervals[1:])) if len(intervals) > 2
            else 0.0}


def run_stock(loaded, spec, *, tight: bool, text_tokens: int):
    from worker.pipeline.stock import stock_call_kwargs

    device = loaded.device
    kwargs = stock_call_kwargs(loaded, spec)
    if tight:
        kwargs["max_sequence_length"] = text_tokens
    marks: list[float] = []

    def on_step_end(pipe, i, t, callback_kwargs):
        _sync(device)
        marks.append(time.perf_counter())
        return callback_kwargs

    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        images = list(loaded.pipe(**kwargs, callback_on_step_end=on_step_end).images)
    _sync(device)
    return _timing(t0, time.perf_counter(), marks, spec.steps), images


def run_fast(loaded, specs):
    from worker.pipeline.fast_path import generate_batch, text_cache

    device = loaded.device
    text_cache(loaded).clear()  # every timed call encodes its prompts, as a new job would
    marks: list[float] = []

    def on_step(done: int, total: int) -> None:
        _sync(device)
        marks.append(time.perf_counter())

    _sync(device)
    t0 = time.perf_counter()
    images = [im for per_spec in generate_batch(loaded, specs, on_step=on_step) for im in per_spec]
    _sync(device)
    return _timing(t0, time.perf_counter(), marks, specs[0].steps), images


def token_count(loaded, prompt: str) -> int:
    from worker.pipeline.fast_path import _tokenize

    return int(_tokenize(loaded.pipe, prompt).shape[0])


def pixel_diff(a, b) -> dict[str, float] | None:
    """uint8 level differences of image `a` against `b`, and `rel`: ||a - b|| / ||b|| over all pixels."""
    import numpy as np

    if a is None or b is None or a.size != b.size:
        return None
    x = np.asarray(a, dtype=np.int16)
    y = np.asarray(b, dtype=np.int16)
    d = np.abs(x - y)
    rel = float(np.linalg.norm(d.astype(np.float64)) / max(np.linalg.norm(y.astype(np.float64)), 1e-12))
    return {"mean": float(d.mean()), "max": int(d.max()), "frac_differing": float((d > 0).mean()), "rel": rel}


@torch.no_grad()
def velocity_probe(loaded, prompt: str, size: int, seed: int) -> torch.Tensor:
    """One conditional transformer pass at mid-schedule (t = 0.5) on fixed random latents: the velocity (float32,
    on the CPU) whose error against the reference weights is a variant's one-step error, free of the sampler."""
    from worker.pipeline.fast_path import _attention_kernels, _prepare_conditioning, _transformer_pass, encode_text

    pipe = loaded.pipe
    device = torch.device(loaded.device)
    grid = size // (pipe.vae_scale_factor * pipe.patch_size)
    cond = _prepare_conditioning(pipe, [encode_text(loaded, prompt)], grid, grid, device, loaded.max_sequence_length)
    noise = torch.randn(1, grid * grid, pipe.transformer.config.in_channels,
                        generator=torch.Generator("cpu").manual_seed(seed))
    t_model = torch.full((1,), 0.5, device=device, dtype=pipe.transformer.dtype)
    with _attention_kernels(device):
        velocity = _transformer_pass(pipe.transformer, noise.to(device), t_model, cond.cond_rotary, cond.text_block,
                                     cond.attention_mask)
    return velocity.cpu()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm().clamp_min(1e-12))


# --------------------------------------------------------------------------------------------------------------
# The run


class Bench:
    def __init__(self, args):
        self.args = args
        self.device = args.device
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.presets = [p.strip() for p in args.presets.split(",") if p.strip()]
        self.result: dict[str, Any] = {"meta": self._meta(), "rows": [], "equivalence": [], "stages": {},
                                       "log": []}
        self.reference: dict[tuple[int, str], Any] = {}  # (size, kind) -> image of the stock (or stock-tight) row
        self.result["errors"] = []  # each stage against the first one (bf16; fp32 on CPU), same inputs
        self.error_ref: str | None = None  # that first stage
        self.error_refs: dict[tuple, Any] = {}  # its velocities and images, by what they are

    def log(self, message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        print(line, flush=True)
        self.result["log"].append(line)

    def _meta(self) -> dict[str, Any]:
        import diffusers
        import transformers

        meta = {"date": _now(), "command": " ".join([Path(sys.executable).name, "-m", "worker.bench",
                                                        *self.args.argv]),
                "python": platform.python_version(), "torch": torch.__version__,
                "diffusers": diffusers.__version__, "transformers": transformers.__version__,
                "device": "cpu", "size": "checkpoint" if self.args.model else self.args.size,
                "model": self.args.model or None}
        for name in ("bitsandbytes", "torchao"):
            try:
                meta[name] = __import__(name).__version__
            except Exception:  # noqa: BLE001 - optional
                meta[name] = None
        if self.device.startswith("cuda"):
            props = torch.cuda.get_device_properties(torch.device(self.device))
            meta.update(device=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                        capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
        price, currency = gpu_hour_price(self.args, meta["device"])
        meta.update(price_per_gpu_hour=price, currency=currency, capacity=self.args.capacity)
        return meta

    def save(self) -> None:
        (self.out / "bench.json").write_text(json.dumps(self.result, indent=1, default=str))
        (self.out / "bench.md").write_text(render_markdown(self.result))

    # ---- rows

    def _row(self, weights: str, path: str, size: int, batch: int, steps: int, fn, *, tokens: int,
             prompt_tokens: Sequence[int], stock_flops: bool, passes: int = 2) -> dict[str, Any]:
        pipe_holder = self._loaded
        row: dict[str, Any] = {"weights": weights, "path": path, "name": f"{weights} {_path_label(path)}",
                               "size": size, "batch": batch, "text_tokens": tokens,
                               "prompt_tokens": list(prompt_tokens)}
        cuda = self.device.startswith("cuda")
        try:
            t0 = time.perf_counter()
            fn(self.args.warm_steps)  # warm-up: kernels, handles, and for compiled paths this shape's graph
            row["warm_s"] = time.perf_counter() - t0
            if cuda:
                torch.cuda.reset_peak_memory_stats(self.device)
                row["resident_gb"] = torch.cuda.memory_allocated(self.device) / 2**30
            timing, images = fn(steps)
            row.update(timing)
            if cuda:
                row["peak_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            pipe = pipe_holder.pipe
            scale = pipe.vae_scale_factor * pipe.patch_size
            image_tokens = (size // scale) ** 2
            executed = step_flops(pipe, text_tokens=tokens, image_tokens=image_tokens, batch=batch,
                                  stock=stock_flops, passes=passes)
            useful = step_flops(pipe, text_tokens=max(prompt_tokens), image_tokens=image_tokens, batch=batch,
                                stock=False, passes=passes)
            row.update(tflop_step=executed / 1e12, tflops=executed / row["s_step"] / 1e12,
                       useful_tflops=useful / row["s_step"] / 1e12)
            row["img_per_min"] = {p: 60.0 * batch / (row["fixed_s"] + PRESETS[p].steps * row["s_step"])
                                  for p in self.presets}
            row.update(cost_columns(row["img_per_min"], self.result["meta"].get("price_per_gpu_hour")))
            row["image"] = images[0]
        except Exception as exc:  # noqa: BLE001 - a failing path is a result, not the end of the run
            row["error"] = f"{type(exc).__name__}: {exc}"[:600]
            row["traceback"] = traceback.format_exc()[-3000:]
            self.log(f"{row['name']} {size}² b{batch}: FAILED {row['error']}")
            if cuda:
                torch.cuda.empty_cache()
        return row

    def _error(self, weights: str, key: tuple, what: str, size: int, value: Any) -> None:
        """Keep `value` (a velocity or an image) as the reference for the first stage; later stages' errors."""
        if self.error_ref in (None, weights):
            self.error_ref = weights
            self.error_refs[key] = value
            return
        ref = self.error_refs.get(key)
        if ref is None:
            return
        entry: dict[str, Any] = {"weights": weights, "vs": self.error_ref, "size": size, "what": what}
        if isinstance(value, torch.Tensor):
            entry["rel"] = rel_err(value, ref)
        else:
            entry.update(pixel_diff(value, ref) or {})
        self.result["errors"].append(entry)
        self.log(f"error {weights} vs {self.error_ref} {size}² {what}: rel {entry.get('rel', float('nan')):.4f}")

    def _record(self, row: dict[str, Any]) -> None:
        image = row.pop("image", None)
        if row["batch"] == 1 and image is not None and row.get("kind") != "batching":
            self._error(row["weights"], ("row", row["size"], row["path"]), f"{_path_label(row['path'])} image, "
                        f"{row['steps_timed']} steps", row["size"], image)
        ref_key = (row["size"], "stock")
        if row["batch"] == 1 and image is not None:
            if row["path"] == "stock" and ref_key not in self.reference:
                self.reference[ref_key] = image
            if row["path"] == "stock-tight" and (row["size"], "stock-tight") not in self.reference:
                self.reference[(row["size"], "stock-tight")] = image
            row["diff_vs_stock"] = pixel_diff(image, self.reference.get(ref_key))
            row["diff_vs_stock_tight"] = pixel_diff(image, self.reference.get((row["size"], "stock-tight")))
        self.result["rows"].append(row)
        if "error" not in row:
            ipm = row["img_per_min"].get("V4_QUALITY_48")
            self.log(f"{row['name']:>26} {row['size']}² b{row['batch']}: {row['s_step']:.4f} s/step, fixed "
                     f"{row['fixed_s']:.2f} s, {ipm if ipm is None else round(ipm, 2)} img/min@48, peak "
                     f"{row.get('peak_gb', 0):.1f} GB, {row['tflops']:.0f} TFLOP/s")
        self.save()

    def run_stage(self, weights: str, loaded) -> None:
        self._loaded = loaded
        prompt = self.args.prompt
        ntok = token_count(loaded, prompt)
        self.result["meta"]["prompt_tokens"] = ntok
        paths = [p for p in STAGE_PATHS[weights] if p in self.args.paths]
        main = [p for p in paths if p != "compile-cudnn"]
        for size in self.args.sizes:  # eager, before any compile: the weights' own error
            try:
                velocity = velocity_probe(loaded, prompt, size, self.args.seed)
                self._error(weights, ("velocity", size), "one step's velocity (t = 0.5)", size, velocity)
            except Exception as exc:  # noqa: BLE001 - a failed probe is a result
                self.log(f"{weights}: velocity probe at {size}² failed: {type(exc).__name__}: {exc}"[:600])
        for path in main:
            if path == "compile":
                self._compile(weights, loaded)
            self._rows_at_sizes(weights, path, loaded, prompt, ntok)
        if weights == self.args.batch_weights and self.args.batch_sizes:
            self._batch_rows(weights, loaded, ntok)
        if weights in ("bf16", "fp32") and self.args.equiv_steps:
            self._equivalence(weights, loaded, ntok, paths)
        if self.args.error_steps:
            self._preset_error(weights, loaded)
        if "compile-cudnn" in paths:
            # The same compiled path with cuDNN attention first: graphs are traced under the kernel choice, so
            # they are dropped and compiled again; the product default is restored for the next stage.
            from worker.pipeline import fast_path

            default = fast_path.SDPA_PRIORITY
            self._reset_compiled(loaded)
            fast_path.SDPA_PRIORITY = CUDNN_FIRST
            try:
                self._compile(weights, loaded, label="compile-cudnn")
                self._rows_at_sizes(weights, "compile-cudnn", loaded, prompt, ntok)
            finally:
                fast_path.SDPA_PRIORITY = default
                self._reset_compiled(loaded)

    def _rows_at_sizes(self, weights, path, loaded, prompt, ntok) -> None:
        for size in self.args.sizes:
            steps = self.args.steps_for(size)
            self._record(self._single_row(weights, path, loaded, prompt, size, steps, ntok))
            if self.args.cfg_free and path not in ("stock", "stock-tight"):
                self._record(self._single_row(weights, path, loaded, prompt, size, steps, ntok, cfg_free=True))

    def _reset_compiled(self, loaded) -> None:
        import torch._dynamo

        uncompile(loaded.pipe)
        torch._dynamo.reset()

    def _single_row(self, weights, path, loaded, prompt, size, steps, ntok, cfg_free: bool = False):
        """One timed row; `cfg_free`: every step at guidance 1.0 (V4_FAST_20's schedule), one transformer a step."""
        seeds = (self.args.seed,)
        if path in ("stock", "stock-tight"):
            tight = path == "stock-tight"
            fn = lambda n: run_stock(loaded, make_spec(prompt, size, n, seeds), tight=tight,
                                     text_tokens=ntok)
            tokens = ntok if tight else 2048
            return self._row(weights, path, size, 1, steps, fn, tokens=tokens, prompt_tokens=[ntok],
                             stock_flops=True)
        preset = "V4_FAST_20" if cfg_free else "V4_QUALITY_48"
        fn = lambda n: run_fast(loaded, [make_spec(prompt, size, n, seeds, preset=preset)])
        return self._row(weights, f"{path}+cfg-free" if cfg_free else path, size, 1, steps, fn, tokens=ntok,
                         prompt_tokens=[ntok], stock_flops=False, passes=1 if cfg_free else 2)

    def _compile(self, weights: str, loaded, label: str = "compile") -> None:
        from worker.pipeline.fast_path import prepare_compiled

        t0 = time.perf_counter()
        try:
            prepare_compiled(loaded, warmup_sizes=[(s, s) for s in self.args.sizes], warmup_steps=2)
            self.result["stages"][f"{weights} {label}_warmup_s"] = time.perf_counter() - t0
            self.log(f"{weights}: {label} warmed up at {self.args.sizes} in {time.perf_counter() - t0:.1f} s")
        except Exception as exc:  # noqa: BLE001
            self.log(f"{weights}: {label} failed: {type(exc).__name__}: {exc}"[:600])
            self.result["stages"][f"{weights} {label}_error"] = traceback.format_exc()[-3000:]
            uncompile(loaded.pipe)

    def _batch_rows(self, weights: str, loaded, ntok: int) -> None:
        """Batches of different prompts (different lengths: the padded, masked path), as dynamic batching of
        different jobs would run them; batch 1 is the same prompt alone. With `--cfg-free`, the same batches again
        at guidance 1.0 (V4_FAST_20: one transformer pass a step, so a small image fills less of the GPU)."""
        from worker.pipeline.fast_path import padded_text_length

        base = "compile" if getattr(loaded.pipe, "_letterpress_compiled", False) else "fast"
        kinds = [(base, "V4_QUALITY_48", 2)] + ([(f"{base}+cfg-free", "V4_FAST_20", 1)] if self.args.cfg_free else [])
        for path, preset, passes in kinds:
            for size in self.args.batch_res:
                for batch in self.args.batch_sizes:
                    prompts = [self.args.prompt + _BATCH_SUFFIXES[i % len(_BATCH_SUFFIXES)] for i in range(batch)]
                    counts = [token_count(loaded, p) for p in prompts]
                    steps = self.args.steps_for(size)
                    fn = lambda n, prompts=prompts, size=size, preset=preset: run_fast(loaded, [
                        make_spec(p, size, n, (self.args.seed + i,), preset=preset) for i, p in enumerate(prompts)])
                    row = self._row(weights, path, size, batch, steps, fn, tokens=padded_text_length(counts),
                                    prompt_tokens=counts, stock_flops=False, passes=passes)
                    row["kind"] = "batching"
                    self._record(row)

    def _preset_error(self, weights: str, loaded) -> None:
        """A full preset's image on the fast path (compiled if this stage is) against the first stage's."""
        size, steps = self.args.sizes[0], self.args.error_steps
        preset = next((p for p in PRESETS.values() if p.steps == steps), PRESETS["V4_DEFAULT_20"])
        path = "fast+compile" if getattr(loaded.pipe, "_letterpress_compiled", False) else "fast"
        try:
            image = run_fast(loaded, [make_spec(self.args.prompt, size, steps, (self.args.seed,),
                                                preset=preset.name)])[1][0]
        except Exception as exc:  # noqa: BLE001
            self.log(f"{weights}: full-preset error run failed: {type(exc).__name__}: {exc}"[:600])
            return
        if self.args.save_images:
            image.save(self.out / f"error_{weights}_{size}_{steps}.png")
        self._error(weights, ("preset", size, steps), f"{path} image, {steps} steps ({preset.name})", size, image)
        self.save()

    def _equivalence(self, weights: str, loaded, ntok: int, paths: list[str]) -> None:
        """Images at a full preset's steps: stock vs stock-tight vs fast (vs compiled)."""
        size, steps, prompt = self.args.sizes[0], self.args.equiv_steps, self.args.prompt
        preset = next((p for p in PRESETS.values() if p.steps == steps), PRESETS["V4_DEFAULT_20"])
        spec = make_spec(prompt, size, steps, (self.args.seed,), preset=preset.name)
        images: dict[str, Any] = {}
        try:
            images["stock"] = run_stock(loaded, spec, tight=False, text_tokens=ntok)[1][0]
            images["stock-tight"] = run_stock(loaded, spec, tight=True, text_tokens=ntok)[1][0]
            path = "fast+compile" if getattr(loaded.pipe, "_letterpress_compiled", False) else "fast"
            images[path] = run_fast(loaded, [spec])[1][0]
        except Exception as exc:  # noqa: BLE001
            self.log(f"equivalence run failed: {type(exc).__name__}: {exc}"[:600])
        if self.args.save_images:
            for name, image in images.items():
                image.save(self.out / f"equiv_{weights}_{name.replace('+', '_')}_{size}.png")
        for name in images:
            if name == "stock":
                continue
            entry = {"weights": weights, "size": size, "steps": steps, "preset": preset.name, "path": name,
                     "vs_stock": pixel_diff(images[name], images.get("stock")),
                     "vs_stock_tight": pixel_diff(images[name], images.get("stock-tight"))}
            self.result["equivalence"].append(entry)
            self.log(f"equivalence {weights} {name} vs stock at {steps} steps: {entry['vs_stock']}")
        self.save()

    def run(self) -> dict[str, Any]:
        if self.device.startswith("cuda") and not self.args.no_gemm:
            self.result["meta"].update(gemm_peaks(self.device))
            self.log(f"gemm ceilings: {self.result['meta']}")
        if self.args.paths or self.args.batch_sizes:
            import torch._dynamo

            # Every stage, size, batch and weight type adds compiled graphs of the one block code; the default
            # limit (8) would silently send later rows back to eager.
            torch._dynamo.config.recompile_limit = 256
            torch._dynamo.config.accumulated_recompile_limit = 4096
            stages = Stages(self.args, self.device, self.log)
            for weights, loaded in stages:
                self.result["stages"][f"{weights} build_s"] = stages.build_s.get(weights)
                self.log(f"stage {weights} ready in {stages.build_s.get(weights, 0):.1f} s")
                self.run_stage(weights, loaded)
                self._loaded = None
        if self.args.e2e:
            gc.collect()  # the e2e worker is another process that loads its own pipeline on this GPU
            if self.device.startswith("cuda"):
                import torch._dynamo

                torch._dynamo.reset()
                torch.cuda.empty_cache()
            self.result["e2e"] = bench_e2e.run(self.args, self.log)
        self.result["meta"]["finished"] = _now()
        self.save()
        return self.result


def _num(x: float) -> str:
    return f"{x:.0f}" if x >= 10 else f"{x:.3g}"


def _path_label(path: str) -> str:
    base, cfg_free, _ = path.partition("+cfg-free")
    return {"compile": "fast+compile", "compile-cudnn": "fast+compile+cudnn"}.get(base, base) + cfg_free


# --------------------------------------------------------------------------------------------------------------
# Report


def cost_columns(img_per_min: dict[str, float], price_per_gpu_hour: float | None) -> dict[str, Any]:
    """Images per GPU-hour and the cost of 1,000 images at `price_per_gpu_hour` (None: unpriced), per preset."""
    per_hour = {p: 60.0 * ipm for p, ipm in img_per_min.items()}
    cost = None if price_per_gpu_hour is None else {p: 1000.0 * price_per_gpu_hour / n for p, n in per_hour.items()}
    return {"img_per_gpu_hour": per_hour, "cost_per_1000": cost}


def gpu_hour_price(args, device_name: str) -> tuple[float | None, str]:
    """`--price-per-gpu-hour`, else the configured price of this GPU kind (LETTERPRESS_PRICING__*, as usage is
    priced: common.usage.price_per_hour), at `--capacity`; and the currency."""
    from common.settings import get_settings

    pricing = get_settings().pricing
    if args.price_per_gpu_hour is not None:
        return args.price_per_gpu_hour, pricing.currency
    from common.usage import price_per_hour  # here: it needs the database libraries, which a GPU box may lack

    return price_per_hour(pricing, device_name, args.capacity), pricing.currency


def _cost_table(result: dict[str, Any], presets: list[str]) -> list[str]:
    meta = result["meta"]
    price = meta.get("price_per_gpu_hour")
    priced = f"at {price} {meta.get('currency')} per GPU-hour ({meta.get('capacity')})" if price is not None else (
        "unpriced: no --price-per-gpu-hour and no configured price for this GPU kind")
    head = ["variant", "size", "batch"] + [f"img/GPU-h {p.removeprefix('V4_')}" for p in presets]
    if price is not None:
        head += [f"per 1k {p.removeprefix('V4_')}" for p in presets]
    lines = ["", f"Cost per image {priced}:", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        if "error" in r or "img_per_gpu_hour" not in r:
            continue
        cells = [r["name"], f"{r['size']}²", str(r["batch"])] + [f"{r['img_per_gpu_hour'][p]:.0f}" for p in presets]
        if price is not None:
            cells += [f"{r['cost_per_1000'][p]:.2f}" for p in presets]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    presets = list(next((r["img_per_min"] for r in result["rows"] if "img_per_min" in r), {}).keys())
    lines = [f"Run {meta['date']} on {meta['device']} (torch {meta['torch']}, diffusers {meta['diffusers']}, "
             f"transformers {meta['transformers']}, bitsandbytes {meta.get('bitsandbytes')}, torchao "
             f"{meta.get('torchao')}); model: {meta.get('model') or meta['size']}; prompt "
             f"{meta.get('prompt_tokens')} tokens.", "", f"Command: `{meta['command']}`", ""]
    if "bf16_tflops" in meta:
        lines += [f"Matmul ceilings on this GPU (8192³, random data): bf16 {meta['bf16_tflops']:.0f} TFLOP/s, "
                  f"fp8 {meta.get('fp8_tflops', float('nan')):.0f} TFLOP/s.", ""]
    stock48: dict[int, float] = {}
    for r in result["rows"]:
        if r.get("path") == "stock" and r.get("weights") in ("bf16", "fp32") and "error" not in r and r["batch"] == 1:
            stock48.setdefault(r["size"], r["img_per_min"].get("V4_QUALITY_48"))
    head = ["variant", "size", "batch", "text tok", "s/step", "fixed s"] + [f"img/min {p.removeprefix('V4_')}"
                                                                         for p in presets]
    head += ["x stock @48", "peak GB", "TFLOP/s exec", "TFLOP/s useful", "px diff vs stock mean/max"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['size']}² | {r['batch']} | | FAILED: {r['error'][:160]} |")
            continue
        ipm = r["img_per_min"]
        ratio = ""
        if stock48.get(r["size"]) and "V4_QUALITY_48" in ipm:
            ratio = f"{ipm['V4_QUALITY_48'] / stock48[r['size']]:.2f}"
        diff = r.get("diff_vs_stock")
        cells = [r["name"], f"{r['size']}²", str(r["batch"]), str(r["text_tokens"]), f"{r['s_step']:.4f}",
                 f"{r['fixed_s']:.2f}"] + [f"{ipm[p]:.2f}" for p in presets]
        cells += [ratio, f"{r.get('peak_gb', 0):.1f}", _num(r["tflops"]), _num(r["useful_tflops"]),
                  f"{diff['mean']:.2f} / {diff['max']}" if diff else ""]
        lines.append("| " + " | ".join(cells) + " |")
    lines += _cost_table(result, presets)
    if result.get("equivalence"):
        lines += ["", "Equivalence at a full preset (same seed and weights; uint8 levels):", "",
                  "| weights | path | size | steps | vs stock mean / max / fraction differing | vs stock-tight |",
                  "|---|---|---|---|---|---|"]
        for e in result["equivalence"]:
            def fmt(d):
                return f"{d['mean']:.3f} / {d['max']} / {d['frac_differing']:.4f}" if d else ""
            lines.append(f"| {e['weights']} | {e['path']} | {e['size']}² | {e['steps']} | {fmt(e['vs_stock'])} | "
                         f"{fmt(e['vs_stock_tight'])} |")
    if result.get("errors"):
        lines += ["", "Error against the first stage, same inputs (velocity: ||v - v_ref|| / ||v_ref||; images: the "
                  "same over uint8 pixels, and the mean / max level difference):", "",
                  "| weights | vs | size | what | rel error | px mean / max |", "|---|---|---|---|---|---|"]
        for e in result["errors"]:
            px = f"{e['mean']:.2f} / {e['max']}" if "mean" in e else ""
            rel = f"{100 * e['rel']:.2f}%" if "rel" in e else ""
            lines.append(f"| {e['weights']} | {e['vs']} | {e['size']}² | {e['what']} | {rel} | {px} |")
    stages = result.get("stages") or {}
    if stages:
        lines += ["", "Stage costs (s): " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()
                                                     if isinstance(v, (int, float)))]
    e2e = result.get("e2e")
    if e2e:
        lines += ["", "End to end:", "", "```", json.dumps({k: v for k, v in e2e.items() if k != "log"}, indent=1),
                  "```"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------------
# Command line


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None):
    argv = list(sys.argv[1:] if argv is None else argv)
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="letterpress bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=("real", "tiny"), default="real" if cuda else "tiny",
                   help="random weights of the real sizes (GPU) or the tiny model (default on CPU)")
    p.add_argument("--model", help="a checkpoint directory or Hub id, loaded through load_pipeline per variant")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--paths", default=None,
                   help=f"code paths, any of {','.join(PATHS)} (default: all; on CPU without compile)")
    p.add_argument("--weights", default=None,
                   help=f"weight stages on CUDA, any of {','.join(WEIGHT_STAGES)} (default: all)")
    p.add_argument("--sizes", default=None, help="square image sides (default 1024,2048; tiny: 64)")
    p.add_argument("--presets", default=",".join(DEFAULT_PRESETS))
    p.add_argument("--steps", type=int, default=None, help="timed steps a row (default 6; 4 at 2048; tiny 3)")
    p.add_argument("--warm-steps", type=int, default=1)
    p.add_argument("--batch-sizes", default=None, help="batch sizes for the batching rows (default 1,2,4)")
    p.add_argument("--batch-res", default=None, help="sizes for the batching rows (default 512,1024; tiny 64)")
    p.add_argument("--batch-weights", default=None, help="weight stage for the batching rows (default bf16)")
    p.add_argument("--cfg-free", action="store_true",
                   help="after each fast-path row, the same path with every step at guidance 1.0 (the CFG-free "
                        "presets: no unconditional pass)")
    p.add_argument("--equiv-steps", type=int, default=None,
                   help="steps of the full-preset equivalence run (default 20; 0 = off)")
    p.add_argument("--error-steps", type=int, default=None,
                   help="steps of the full-preset image compared with the first stage's (default 20, tiny 4; 0 = off)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--no-gemm", action="store_true", help="skip the matmul ceiling measurement")
    p.add_argument("--save-images", action="store_true", help="save the equivalence run's images under --out")
    p.add_argument("--e2e", action="store_true", help="also measure the platform end to end (worker.bench.e2e)")
    p.add_argument("--e2e-only", action="store_true", help="only the end-to-end measurement")
    p.add_argument("--e2e-jobs", type=int, default=6)
    p.add_argument("--e2e-size", type=int, default=None, help="default 1024 (tiny: 256)")
    p.add_argument("--e2e-preset", default="V4_QUALITY_48")
    p.add_argument("--e2e-steps", type=int, default=None, help="override the preset's steps (tiny default 4)")
    p.add_argument("--e2e-batching", action="store_true",
                   help="the e2e worker batches compatible queued jobs (LETTERPRESS_WORKER__BATCHING__ENABLED)")
    p.add_argument("--e2e-compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compile the e2e worker's blocks (default: on CUDA)")
    p.add_argument("--out", default=os.environ.get("OUT") or "bench-out")
    p.add_argument("--price-per-gpu-hour", type=float, default=None,
                   help="price the rows per 1,000 images (default: the configured LETTERPRESS_PRICING__* price of "
                        "this GPU kind)")
    p.add_argument("--capacity", choices=("on_demand", "spot"), default="on_demand",
                   help="which configured price applies")
    args = p.parse_args(argv)
    args.argv = argv
    tiny = args.size == "tiny" and not args.model
    on_cpu = not args.device.startswith("cuda")
    default_paths = "stock,stock-tight,fast" if on_cpu else ",".join(PATHS)
    args.paths = [x.strip() for x in (args.paths if args.paths is not None else default_paths).split(",") if x]
    args.weights = [x.strip() for x in (args.weights or ",".join(WEIGHT_STAGES)).split(",") if x.strip()]
    args.sizes = _ints(args.sizes or ("64" if tiny else "1024,2048"))
    args.batch_sizes = _ints(args.batch_sizes if args.batch_sizes is not None else "1,2,4")
    args.batch_res = _ints(args.batch_res or ("64" if tiny else "512,1024"))
    args.batch_weights = args.batch_weights or ("fp32" if on_cpu else "bf16")
    args.equiv_steps = args.equiv_steps if args.equiv_steps is not None else (4 if tiny else 20)
    args.error_steps = args.error_steps if args.error_steps is not None else (4 if tiny else 20)
    base_steps = args.steps or (3 if tiny else 6)
    args.steps_for = lambda size: base_steps if (args.steps or size < 2048) else max(3, base_steps - 2)
    args.e2e_size = args.e2e_size or (256 if tiny else 1024)
    if args.e2e_steps is None and tiny:
        args.e2e_steps = 4
    if args.e2e_compile is None:
        args.e2e_compile = not on_cpu
    if args.e2e_only:
        args.e2e, args.paths, args.batch_sizes, args.equiv_steps, args.error_steps = True, [], [], 0, 0
    unknown = set(args.paths) - set(PATHS)
    if unknown:
        p.error(f"unknown paths {sorted(unknown)}: choose from {', '.join(PATHS)}")
    unknown = set(args.weights) - set(WEIGHT_STAGES)
    if unknown:
        p.error(f"unknown weights {sorted(unknown)}: choose from {', '.join(WEIGHT_STAGES)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """The side-by-side bench; `python -m worker.bench` (`worker.bench.__main__`) also dispatches subcommands."""
    args = parse_args(argv)
    result = Bench(args).run()
    print()
    print(render_markdown(result))
    failed = [r["name"] for r in result["rows"] if "error" in r]
    if failed:
        print(f"{len(failed)} rows failed: {', '.join(failed)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
