"""`letterpress bench matmuls`: what a transformer block's linears reach in bf16, fp8 and int8 (issue 15's int8
question: why torchao's int8 variant ran only 1.08x bf16 on an H200, whose int8 tensor cores run at the fp8 rate).

For each linear shape of an `Ideogram4Transformer2DModel` block at an image size (rows = image tokens + text
tokens; QKV, attention out, SwiGLU w1/w3, w2), two tables:

- bare matmuls: `a @ b` in bf16, `torch._scaled_mm` in fp8 (e4m3, row-wise scales) and `torch._int_mm` in int8,
  on random data: the kernels' own rates, nothing around them;
- whole quantized linears as the variants run them, compiled: `nn.Linear` in bf16, torchao's float8 dynamic
  (row-wise) and torchao's `Int8DynamicActivationInt8WeightConfig` (dynamic per-row int8 activations): the
  kernel plus quantizing the activation and rescaling the output.

    python -m worker.bench matmuls [--size 1024] [--text-tokens 201] [--reps 50]

Needs CUDA; the fp8 rows need a Hopper or newer GPU, the quantized-linear rows torchao.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

WIDTH, FFN = 4608, 12288  # Ideogram4Transformer2DModel's defaults (worker.bench.models.build_random_real)
SHAPES = {"qkv": (WIDTH, 3 * WIDTH), "attn_out": (WIDTH, WIDTH), "w1|w3": (WIDTH, FFN), "w2": (FFN, WIDTH)}


def rate(fn: Callable[[], object], flops: float, reps: int) -> float:
    """TFLOP/s (or TOP/s) of `fn`, timed with CUDA events after a warm-up."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return flops * reps / (start.elapsed_time(end) / 1e3) / 1e12


def bare_rates(rows: int, k: int, n: int, reps: int) -> dict[str, float | str]:
    a = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    flops = 2.0 * rows * k * n
    out: dict[str, float | str] = {"bf16": rate(lambda: a @ w.t(), flops, reps)}
    try:
        a8, w8 = a.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
        sa = torch.ones(rows, 1, device="cuda", dtype=torch.float32)
        sw = torch.ones(1, n, device="cuda", dtype=torch.float32)
        out["fp8"] = rate(lambda: torch._scaled_mm(a8, w8.t(), scale_a=sa, scale_b=sw, out_dtype=torch.bfloat16),
                          flops, reps)
    except Exception as exc:  # noqa: BLE001 - no fp8 on this GPU: say so
        out["fp8"] = f"{type(exc).__name__}: {exc}"[:160]
    ai = torch.randint(-127, 127, (rows, k), device="cuda", dtype=torch.int8)
    wi = torch.randint(-127, 127, (n, k), device="cuda", dtype=torch.int8)
    out["int8"] = rate(lambda: torch._int_mm(ai, wi.t()), flops, reps)
    return out


def linear_rates(rows: int, k: int, n: int, reps: int) -> dict[str, float | str]:
    """Compiled linears: bf16, and torchao's fp8 and int8 dynamic quantization of a copy of the same layer."""
    import copy

    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    base = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    flops = 2.0 * rows * k * n
    out: dict[str, float | str] = {}
    variants: dict[str, Callable[[torch.nn.Module], None] | None] = {"bf16": None}
    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Int8DynamicActivationInt8WeightConfig,
            PerRow,
            quantize_,
        )

        variants["fp8"] = lambda m: quantize_(m, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
        variants["int8"] = lambda m: quantize_(m, Int8DynamicActivationInt8WeightConfig())
    except ImportError as exc:
        out["torchao"] = f"not installed: {exc}"
    for name, quantize in variants.items():
        layer = copy.deepcopy(base)
        torch._dynamo.reset()  # every layer compiles the same forward: without a reset the recompile limit hits
        try:
            if quantize is not None:
                quantize(layer)
            fn = torch.compile(layer, fullgraph=True)
            with torch.no_grad():
                out[name] = rate(lambda: fn(x), flops, reps)
        except Exception as exc:  # noqa: BLE001 - a variant this GPU or torchao cannot run: say so
            out[name] = f"{type(exc).__name__}: {exc}"[:160]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="letterpress bench matmuls", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=1024, help="square image side: rows = (size/16)^2 + text tokens")
    p.add_argument("--text-tokens", type=int, default=201)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--no-linears", action="store_true", help="bare matmuls only (no torchao, no compile)")
    p.add_argument("--out", default=os.environ.get("OUT") or "bench-out")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("letterpress bench matmuls needs CUDA", file=sys.stderr)
        return 2
    rows = (args.size // 16) ** 2 + args.text_tokens
    result: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows,
                    "command": " ".join(["python -m worker.bench matmuls", *(argv or [])]), "bare": {}, "linear": {}}
    for name, (k, n) in SHAPES.items():
        result["bare"][name] = bare_rates(rows, k, n, args.reps)
        print(json.dumps({"bare": name, "k": k, "n": n, **result["bare"][name]}), flush=True)
    if not args.no_linears:
        for name, (k, n) in SHAPES.items():
            result["linear"][name] = linear_rates(rows, k, n, args.reps)
            print(json.dumps({"linear": name, "k": k, "n": n, **result["linear"][name]}), flush=True)
    print(render(result))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "matmuls.json").write_text(json.dumps(result, indent=2))
    return 0


def render(result: dict) -> str:
    def cell(v) -> str:
        return f"{v:.0f}" if isinstance(v, float) else str(v)

    lines = [f"{result['device']}, torch {result['torch']}, {result['rows']} rows a linear", "",
             "| linear | k × n | bare bf16 | bare fp8 | bare int8 | linear bf16 | linear fp8 | linear int8 |",
             "|---|---|---|---|---|---|---|---|"]
    for name, (k, n) in SHAPES.items():
        bare, lin = result["bare"].get(name, {}), result["linear"].get(name, {})
        lines.append(f"| {name} | {k} × {n} | " + " | ".join(cell(bare.get(v, "")) for v in ("bf16", "fp8", "int8"))
                     + " | " + " | ".join(cell(lin.get(v, "")) for v in ("bf16", "fp8", "int8")) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
