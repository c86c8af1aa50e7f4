"""`letterpress bench profile`: where one denoising step's time goes, and what its kernels could do alone.

    python -m worker.bench profile --size 1024               # real-size random weights on the GPU
    python -m worker.bench profile --size 1024 --fp8         # the fp8 variant (torchao)
    python -m worker.bench profile --size 64 --model tiny    # the tiny model on the CPU (smoke test)

`letterpress bench` says how fast each path is; this says why. On the compiled fast path at one image size:

1. **Kernel breakdown** of a step (the conditional and the unconditional transformer pass, as the worker runs
   them), from `torch.profiler`: time a step in matmuls, attention, fused elementwise work (Triton kernels made
   by `torch.compile`) and the rest, with the achieved TFLOP/s of the matmul and attention classes, and the
   longest kernels by name.
2. **Attention alone** at the step's shapes (one image, 18 heads of 256; the conditional pass's text + image
   tokens and the unconditional pass's image tokens): each SDPA backend PyTorch has (flash, cuDNN, memory
   efficient) and FlexAttention, so a faster kernel shows up here before anyone wires it in.
3. **Matmuls alone** at the step's shapes, split as the model runs them (Q, K, V and w1, w3 as separate
   products) and fused (one QKV product, one w1|w3 product).
4. **Fused projections in the compiled step** (`--fused`): the same blocks with Q/K/V and w1/w3 each computed
   as one matmul, compiled the same way, timed against the stock blocks in the same process. Measured only;
   `worker.pipeline.fast_path` uses the model's own blocks.

Results go to `--out` as `profile.json`, and a summary is printed. Timings use CUDA events on a GPU and
`time.perf_counter` on the CPU; every figure is the mean of `--reps` runs after warm-up runs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import types
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from worker.bench.models import DEFAULT_PROMPT, build_random_real, step_flops, uncompile

# Kernel (GPU) or operator (CPU) names, lower-cased, by class; the first class whose marker a name contains wins.
# Triton kernels are classed by prefix first: inductor names its fused elementwise kernels after every op they
# absorb, so "triton_per_fused__scaled_dot_product_cudnn_attention_..." is a norm/rotary kernel, not attention.
KERNEL_CLASSES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("flash", "fmha", "sdpa", "attention", "attn")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "matmul", "aten::mm", "aten::addmm", "aten::bmm",
                "aten::linear", "scaled_mm", "splitk")),
)


def classify(name: str) -> str:
    lowered = name.lower()
    if lowered.startswith("triton_"):
        if not lowered.startswith("triton_tem"):
            return "fused elementwise"
        return "attention" if "flex" in lowered else "matmul"  # inductor's template kernels
    for label, markers in KERNEL_CLASSES:
        if any(marker in lowered for marker in markers):
            return label
    return "other"


class Timer:
    """Mean seconds of `fn()` over `reps` runs after `warmup` runs: CUDA events on a GPU, wall clock on the CPU."""

    def __init__(self, device: str, reps: int, warmup: int = 2):
        self.cuda = device.startswith("cuda")
        self.reps, self.warmup = reps, warmup

    def __call__(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(self.reps):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3 / self.reps
        t0 = time.perf_counter()
        for _ in range(self.reps):
            fn()
        return (time.perf_counter() - t0) / self.reps


# --------------------------------------------------------------------------------------------------------------
# The step


class Step:
    """One denoising step of the fast path (conditional + unconditional pass) on fixed inputs, as a callable."""

    def __init__(self, loaded, prompt: str, size: int):
        from worker.pipeline.fast_path import _prepare_conditioning, encode_text

        pipe = loaded.pipe
        self.pipe = pipe
        device = pipe._execution_device
        scale = pipe.vae_scale_factor * pipe.patch_size
        self.grid = size // scale
        self.text = encode_text(loaded, prompt)
        self.cond = _prepare_conditioning(pipe, [self.text], self.grid, self.grid, device)
        generator = torch.Generator(device="cpu").manual_seed(0)
        self.latents = torch.randn(1, self.grid * self.grid, pipe.transformer.config.in_channels,
                                   generator=generator).to(device)
        self.t_model = torch.full((1,), 0.5, device=device, dtype=pipe.transformer.dtype)

    @property
    def image_tokens(self) -> int:
        return self.grid * self.grid

    @property
    def cond_tokens(self) -> int:
        return self.text.tokens + self.image_tokens

    @torch.no_grad()
    def __call__(self) -> torch.Tensor:
        from worker.pipeline.fast_path import _transformer_pass

        pos = _transformer_pass(self.pipe.transformer, self.latents, self.t_model, self.cond.cond_rotary,
                                self.cond.text_block, self.cond.attention_mask)
        neg = _transformer_pass(self.pipe.unconditional_transformer, self.latents, self.t_model,
                                self.cond.uncond_rotary)
        return 7.0 * pos - 6.0 * neg


def attention_flops(pipe, tokens: int) -> float:
    cfg = pipe.transformer.config
    return float(cfg.num_layers * 4 * tokens * tokens * cfg.num_attention_heads * cfg.attention_head_dim)


def kernel_breakdown(step: Step, device: str, steps: int = 3) -> dict[str, Any]:
    """Per-step time by kernel class over `steps` profiled steps (after one warm step), and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    step()
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    by_class: dict[str, float] = defaultdict(float)
    kernels = []
    for event in prof.key_averages():
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        if us <= 0 or (not cuda and not event.key.startswith("aten::")):
            continue
        label = classify(event.key)
        by_class[label] += us / steps / 1e3
        kernels.append({"name": event.key[:160], "class": label, "ms_per_step": us / steps / 1e3,
                        "calls_per_step": event.count / steps})
    kernels.sort(key=lambda k: -k["ms_per_step"])
    total_ms = sum(by_class.values())
    pipe = step.pipe
    attn = attention_flops(pipe, step.cond_tokens) + attention_flops(pipe, step.image_tokens)
    matmul = step_flops(pipe, text_tokens=step.text.tokens, image_tokens=step.image_tokens, batch=1,
                        stock=False) - attn
    rates = {"matmul": matmul, "attention": attn}
    classes = {label: {"ms_per_step": ms, "share": ms / total_ms if total_ms else 0.0,
                       **({"tflops": rates[label] / (ms / 1e3) / 1e12} if label in rates and ms else {})}
               for label, ms in sorted(by_class.items(), key=lambda kv: -kv[1])}
    return {"busy_ms_per_step": total_ms, "classes": classes, "top_kernels": kernels[:20],
            "tflop_per_step": {"matmul": matmul / 1e12, "attention": attn / 1e12}}


# --------------------------------------------------------------------------------------------------------------
# Kernels alone


def attention_alone(pipe, lengths: dict[str, int], device: str, timer: Timer) -> list[dict[str, Any]]:
    """Each SDPA backend (and FlexAttention) on (1, heads, L, head_dim) at the step's sequence lengths."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cfg = pipe.transformer.config
    heads, dim, dtype = cfg.num_attention_heads, cfg.attention_head_dim, pipe.transformer.dtype
    backends: list[tuple[str, Callable]] = []
    for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH"):
        backend = getattr(SDPBackend, name)

        def run(q, k, v, backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v)
        backends.append((name.lower(), run))
    try:
        from torch.nn.attention.flex_attention import flex_attention
        backends.append(("flex", torch.compile(flex_attention, dynamic=False)))
    except Exception:  # noqa: BLE001 - not in this torch
        pass
    rows = []
    for what, length in lengths.items():
        q, k, v = (torch.randn(1, heads, length, dim, device=device, dtype=dtype) for _ in range(3))
        flops = 4 * length * length * heads * dim
        reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        for name, fn in backends:
            row: dict[str, Any] = {"pass": what, "tokens": length, "backend": name}
            if name == "math" and device.startswith("cuda") and length > 2048:
                continue  # materialises the L x L scores: slow and not a candidate
            try:
                max_err = (fn(q, k, v).float() - reference).abs().max().item()
                seconds = timer(lambda: fn(q, k, v))
                row.update(ms=seconds * 1e3, tflops=flops / seconds / 1e12, max_abs_err=max_err)
            except Exception as exc:  # noqa: BLE001 - a backend refusing these shapes is a result
                row["refused"] = f"{type(exc).__name__}: {exc}"[:200]
            rows.append(row)
    return rows


def matmuls_alone(pipe, tokens: int, device: str, timer: Timer) -> list[dict[str, Any]]:
    """One block's projections at `tokens` rows: as the model runs them and fused."""
    cfg = pipe.transformer.config
    hidden, inter, dtype = cfg.num_attention_heads * cfg.attention_head_dim, cfg.intermediate_size, \
        pipe.transformer.dtype
    x = torch.randn(tokens, hidden, device=device, dtype=dtype)
    y = torch.randn(tokens, inter, device=device, dtype=dtype)
    shapes = {"q|k|v (each)": (x, hidden), "qkv fused": (x, 3 * hidden), "out": (x, hidden),
              "w1|w3 (each)": (x, inter), "w13 fused": (x, 2 * inter), "w2": (y, hidden)}
    rows = []
    for name, (inp, n_out) in shapes.items():
        weight = torch.randn(n_out, inp.shape[1], device=device, dtype=dtype) / inp.shape[1] ** 0.5
        seconds = timer(lambda: F.linear(inp, weight))
        flops = 2 * tokens * inp.shape[1] * n_out
        rows.append({"matmul": name, "m": tokens, "k": inp.shape[1], "n": n_out, "ms": seconds * 1e3,
                     "tflops": flops / seconds / 1e12})
    by = {r["matmul"]: r["ms"] for r in rows}
    rows.append({"matmul": "per block, as run (3 qkv + 2 w13)",
                 "ms": 3 * by["q|k|v (each)"] + 2 * by["w1|w3 (each)"]})
    rows.append({"matmul": "per block, fused (qkv + w13)", "ms": by["qkv fused"] + by["w13 fused"]})
    return rows


# --------------------------------------------------------------------------------------------------------------
# Fused projections (measured, not used by the product)


def _fused_block_forward(self, hidden_states, attention_mask, image_rotary_emb, adaln_input):
    """`Ideogram4TransformerBlock.forward` with Q/K/V as one matmul and w1/w3 as one (same arithmetic per
    output element; different kernels)."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn
    from diffusers.models.transformers.transformer_ideogram4 import _rotate_half

    mod = self.adaln_modulation(adaln_input)
    scale_msa, gate_msa, scale_mlp, gate_mlp = mod.chunk(4, dim=-1)
    attn = self.attention
    x = self.attention_norm1(hidden_states) * (1.0 + scale_msa)
    query, key, value = F.linear(x, self.fused_qkv).unflatten(-1, (3, attn.num_heads, attn.head_dim)).unbind(-3)
    query, key = attn.norm_q(query), attn.norm_k(key)
    cos, sin = (r.unsqueeze(2) for r in image_rotary_emb)
    query = query * cos + _rotate_half(query) * sin
    key = key * cos + _rotate_half(key) * sin
    out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask).flatten(2, 3)
    hidden_states = hidden_states + torch.tanh(gate_msa) * self.attention_norm2(attn.to_out[0](out))
    gate, up = F.linear(self.ffn_norm1(hidden_states) * (1.0 + scale_mlp), self.fused_w13).chunk(2, dim=-1)
    ffn = self.feed_forward.w2(F.silu(gate) * up)
    return hidden_states + torch.tanh(gate_mlp) * self.ffn_norm2(ffn)


def fuse_projections(pipe) -> None:
    """Give every block of both transformers fused weights and the fused forward (adds the fused copies)."""
    for transformer in (pipe.transformer, pipe.unconditional_transformer):
        for block in transformer.layers:
            a, ff = block.attention, block.feed_forward
            block.register_buffer("fused_qkv", torch.cat([a.to_q.weight, a.to_k.weight, a.to_v.weight]).detach(),
                                  persistent=False)
            block.register_buffer("fused_w13", torch.cat([ff.w1.weight, ff.w3.weight]).detach(), persistent=False)
            block.forward = types.MethodType(_fused_block_forward, block)


def unfuse_projections(pipe) -> None:
    for transformer in (pipe.transformer, pipe.unconditional_transformer):
        for block in transformer.layers:
            block.__dict__.pop("forward", None)
            for name in ("fused_qkv", "fused_w13"):
                block._buffers.pop(name, None)


# --------------------------------------------------------------------------------------------------------------


def _load(args):
    if args.model == "real":
        return build_random_real(args.device)
    from common.devstack.tiny_model import build_tiny_model
    from common.settings import ModelSettings
    from worker.pipeline.loading import load_pipeline

    path = build_tiny_model(Path(tempfile.mkdtemp(prefix="letterpress-profile-")) / "tiny")
    return load_pipeline(ModelSettings(id=str(path), variant="fp32"), device=args.device)


def run(args) -> dict[str, Any]:
    from worker.pipeline.fast_path import prepare_compiled

    device, size = args.device, args.size
    timer = Timer(device, args.reps)
    result: dict[str, Any] = {"args": vars(args), "torch": torch.__version__,
                              "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"}
    t0 = time.perf_counter()
    loaded = _load(args)
    pipe = loaded.pipe
    if args.fp8:  # the loader's own fp8 conversion (torchao float8 rowwise, repeated blocks only)
        from worker.pipeline.loading import quantize_pipeline

        quantize_pipeline(pipe, "fp8")
    result["load_s"] = time.perf_counter() - t0

    def compiled_step(label: str, **compile_kwargs) -> Step:
        t0 = time.perf_counter()
        prepare_compiled(loaded, warmup_sizes=[(size, size)], warmup_steps=1, **compile_kwargs)
        result[f"{label}_compile_s"] = time.perf_counter() - t0
        return Step(loaded, args.prompt, size)

    step = compiled_step("compile") if args.compile else Step(loaded, args.prompt, size)
    result["tokens"] = {"text": step.text.tokens, "cond": step.cond_tokens, "uncond": step.image_tokens}
    result["step_s"] = {"compiled" if args.compile else "eager": timer(step)}
    result["breakdown"] = kernel_breakdown(step, device)
    result["attention_alone"] = attention_alone(pipe, {"cond": step.cond_tokens, "uncond": step.image_tokens},
                                                device, timer)
    result["matmuls_alone"] = matmuls_alone(pipe, step.cond_tokens, device, timer)
    if args.fused:
        uncompile(pipe)
        fuse_projections(pipe)
        fused = compiled_step("fused_compile") if args.compile else Step(loaded, args.prompt, size)
        out_fused = fused()
        result["step_s"]["fused"] = timer(fused)
        unfuse_projections(pipe)
        uncompile(pipe)
        plain = compiled_step("recompile") if args.compile else Step(loaded, args.prompt, size)
        result["fused_vs_plain_max_abs_diff"] = (out_fused - plain()).abs().max().item()
        result["step_s"]["plain (again)"] = timer(plain)
    if args.max_autotune:
        uncompile(pipe)
        tuned = compiled_step("max_autotune_compile", mode="max-autotune-no-cudagraphs")
        result["step_s"]["max-autotune"] = timer(tuned)
    return result


def summary(result: dict[str, Any]) -> str:
    lines = [f"{result['gpu']}, torch {result['torch']}, tokens {result['tokens']}",
             "step s: " + ", ".join(f"{k} {v:.4f}" for k, v in result["step_s"].items())]
    b = result["breakdown"]
    if "fused_vs_plain_max_abs_diff" in result:
        lines.append(f"fused vs plain step output: max abs diff {result['fused_vs_plain_max_abs_diff']:.3g}")
    lines.append(f"busy {b['busy_ms_per_step']:.1f} ms/step; TFLOP/step {b['tflop_per_step']}")
    for label, c in b["classes"].items():
        rate = f", {c['tflops']:.3g} TFLOP/s" if "tflops" in c else ""
        lines.append(f"  {label:18s} {c['ms_per_step']:8.2f} ms  {100 * c['share']:5.1f}%{rate}")
    lines.append("top kernels (ms/step, calls/step):")
    lines += [f"  {k['ms_per_step']:7.2f} {k['calls_per_step']:6.0f}  [{k['class']}] {k['name'][:110]}"
              for k in b["top_kernels"][:12]]
    lines.append("attention alone:")
    for r in result["attention_alone"]:
        what = r.get("refused") or f"{r['ms']:.3f} ms, {r['tflops']:.3g} TFLOP/s, max err {r['max_abs_err']:.1e}"
        lines.append(f"  {r['pass']:6s} L={r['tokens']} {r['backend']:20s} {what}")
    lines.append("matmuls alone:")
    lines += [f"  {r['matmul']:34s} {r['ms']:.3f} ms" + (f", {r['tflops']:.3g} TFLOP/s" if "tflops" in r else "")
              for r in result["matmuls_alone"]]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="letterpress bench profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("real", "tiny"), default="real" if cuda else "tiny")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--size", type=int, default=1024 if cuda else 64)
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="default: worker.bench.models.DEFAULT_PROMPT")
    p.add_argument("--reps", type=int, default=10 if cuda else 2)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=cuda)
    p.add_argument("--fp8", action="store_true", help="profile the fp8 variant (torchao; Hopper and newer)")
    p.add_argument("--fused", action="store_true", help="also time the step with fused QKV and w1|w3 matmuls")
    p.add_argument("--max-autotune", action="store_true", help="also time a max-autotune compile")
    p.add_argument("--out", default=os.environ.get("OUT") or "bench-out")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(result, indent=2, default=str))
    print(summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
