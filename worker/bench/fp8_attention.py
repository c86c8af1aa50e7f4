"""fp8 attention at Ideogram 4's head shape: cuDNN's fp8 SDPA against the bf16 SDPA the compiled path runs.

A standalone microbenchmark (issue 15): one attention call of an `Ideogram4Transformer2DModel` block, batch 1,
18 heads of 256 (the model's config), no mask, sequence = image tokens + a prompt's tokens (4,297 at 1024²,
16,585 at 2048² with the 201-token bench prompt). For each size it times, with CUDA events (median of `--reps`
calls after warm-up):

- bf16 `torch.nn.functional.scaled_dot_product_attention` with the cuDNN backend, and with the flash backend;
- cuDNN's fp8 SDPA forward (`nvidia-cudnn-frontend`'s `sdpa_fp8`: e4m3 Q, K, V and softmax probabilities,
  per-tensor scales, fp32 accumulation), the kernel alone and with the per-tensor quantization of Q, K and V
  before it; output bf16 where the backend accepts that, else e4m3 (dequantized for the error);

and the relative error ||out - ref|| / ||ref|| of each against fp32 attention on the same random inputs
(1,024 random query rows against all keys).

    python -m worker.bench.fp8_attention [--sizes 1024,2048] [--reps 20] [--json out.json]

Needs CUDA, a Hopper or newer GPU for the fp8 rows, and the `nvidia-cudnn-frontend` package (`import cudnn`).
Random normal inputs: real activations have other ranges, so the errors here are those of the format on this
data, not a statement about images.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Callable, Sequence

import torch

HEADS, HEAD_DIM, PATCH = 18, 256, 16  # Ideogram4Transformer2DModel defaults; 8x VAE x 2x2 patches = 16 px a token
E4M3_MAX = 448.0
ERR_ROWS = 1024  # query rows the fp32 reference checks, drawn at random


def median_ms(fn: Callable[[], object], reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.float()
    if not torch.isfinite(out).all():
        return float("nan")
    return float((out - ref).norm() / ref.norm())


def reference(q, k, v, scale: float, rows: torch.Tensor) -> torch.Tensor:
    """fp32 attention of the query rows `rows` against all keys (every row in fp32 would take minutes)."""
    s = (q[:, :, rows].float() @ k.float().transpose(-1, -2)) * scale
    return torch.softmax(s, dim=-1) @ v.float()


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor e4m3: (x * scale) in fp8 and the descale (1 / scale), a (1, 1, 1, 1) fp32 tensor."""
    scale = (E4M3_MAX / x.abs().amax().float().clamp(min=1e-12)).reshape(1, 1, 1, 1)
    return (x.float() * scale).to(torch.float8_e4m3fn), scale.reciprocal()


class CudnnFp8Attention:
    """One cuDNN fp8 SDPA forward graph for (b, h, s, d) contiguous e4m3 Q, K, V; `out_bf16` picks O's type."""

    def __init__(self, shape: Sequence[int], scale: float, out_bf16: bool):
        import cudnn

        self.cudnn = cudnn
        self.handle = cudnn.create_handle()
        cudnn.set_stream(handle=self.handle, stream=torch.cuda.current_stream().cuda_stream)
        e4m3, fp32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
        g = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=fp32, compute_data_type=fp32,
                          handle=self.handle)
        shape = list(shape)
        stride = [shape[1] * shape[2] * shape[3], shape[2] * shape[3], shape[3], 1]
        self.q, self.k, self.v = (g.tensor(name=n, dim=shape, stride=stride, data_type=e4m3) for n in "qkv")
        one = dict(dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=fp32)
        self.scalars = [g.tensor(name=n, **one) for n in ("dq", "dk", "dv", "ds", "ss", "so")]
        o, _, amax_s, amax_o = g.sdpa_fp8(q=self.q, k=self.k, v=self.v, descale_q=self.scalars[0],
                                          descale_k=self.scalars[1], descale_v=self.scalars[2],
                                          descale_s=self.scalars[3], scale_s=self.scalars[4],
                                          scale_o=self.scalars[5], generate_stats=False, attn_scale=scale,
                                          use_causal_mask=False, name="sdpa_fp8")
        o.set_output(True).set_dim(shape).set_stride(stride).set_data_type(
            cudnn.data_type.BFLOAT16 if out_bf16 else e4m3)
        for amax in (amax_s, amax_o):
            amax.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(fp32)
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        g.check_support()
        g.build_plans()
        self.graph, self.o, self.amax_s, self.amax_o = g, o, amax_s, amax_o
        self.out_bf16 = out_bf16
        dev = torch.device("cuda")
        self.out = torch.empty(shape, device=dev, dtype=torch.bfloat16 if out_bf16 else torch.float8_e4m3fn)
        self.amax = [torch.empty(1, 1, 1, 1, device=dev, dtype=torch.float32) for _ in range(2)]
        self.workspace = torch.empty(g.get_workspace_size(), device=dev, dtype=torch.uint8)

    def __call__(self, q8, k8, v8, dq, dk, dv, scale_s, descale_s, scale_o) -> torch.Tensor:
        pack = {self.q: q8, self.k: k8, self.v: v8, self.o: self.out, self.amax_s: self.amax[0],
                self.amax_o: self.amax[1]}
        pack.update(zip(self.scalars, (dq, dk, dv, descale_s, scale_s, scale_o)))
        self.graph.execute(pack, self.workspace, handle=self.handle)
        return self.out


def run_size(size: int, text_tokens: int, reps: int) -> dict[str, object]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    seq = (size // PATCH) ** 2 + text_tokens
    shape = (1, HEADS, seq, HEAD_DIM)
    flops = 4.0 * HEADS * seq * seq * HEAD_DIM
    scale = 1.0 / math.sqrt(HEAD_DIM)
    row: dict[str, object] = {"size": size, "seq": seq, "gflop": flops / 1e9}
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    rows = torch.randperm(seq, device="cuda")[:ERR_ROWS]
    ref = reference(q, k, v, scale, rows)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    bf16_out = None

    for name, backend in (("bf16_cudnn", SDPBackend.CUDNN_ATTENTION), ("bf16_flash", SDPBackend.FLASH_ATTENTION)):
        try:
            with sdpa_kernel([backend]):
                out = sdpa(q, k, v)
                row[f"{name}_err"] = rel_err(out[:, :, rows], ref)
                bf16_out = out if bf16_out is None else bf16_out
                ms = median_ms(lambda: sdpa(q, k, v), reps)
            row[f"{name}_ms"], row[f"{name}_tflops"] = ms, flops / ms / 1e9
        except Exception as exc:  # noqa: BLE001 - a backend this build lacks is a result
            row[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:300]

    (q8, dq), (k8, dk), (v8, dv) = quantize(q), quantize(k), quantize(v)
    one = torch.ones(1, 1, 1, 1, device="cuda", dtype=torch.float32)
    scale_s, descale_s = one * E4M3_MAX, one / E4M3_MAX  # softmax probabilities lie in [0, 1]
    scale_o = E4M3_MAX / v.abs().amax().float().reshape(1, 1, 1, 1)  # |O| <= max |V|: a convex mix of V rows
    for out_bf16 in (True, False):
        key = "fp8_out_bf16" if out_bf16 else "fp8_out_e4m3"
        try:
            attn = CudnnFp8Attention(shape, scale, out_bf16)
        except Exception as exc:  # noqa: BLE001 - the unsupported configuration and the backend's reason
            row[f"{key}_error"] = f"{type(exc).__name__}: {exc}"[:600]
            continue
        attn.out.view(torch.uint8).fill_(0xFF)  # NaN in bf16 and in e4m3: an unwritten value shows
        so = one if out_bf16 else scale_o
        out = attn(q8, k8, v8, dq, dk, dv, scale_s, descale_s, so).float() / (1.0 if out_bf16 else so)
        torch.cuda.synchronize()
        row[f"{key}_err"] = rel_err(out[:, :, rows], ref)
        row[f"{key}_all_finite"] = bool(torch.isfinite(out).all())
        if bf16_out is not None:
            row[f"{key}_err_vs_bf16"] = rel_err(out, bf16_out.float())
        ms = median_ms(lambda: attn(q8, k8, v8, dq, dk, dv, scale_s, descale_s, so), reps)
        row[f"{key}_ms"], row[f"{key}_tflops"] = ms, flops / ms / 1e9

        def quantized_call():
            (a, da), (b, db), (c, dc) = quantize(q), quantize(k), quantize(v)
            return attn(a, b, c, da, db, dc, scale_s, descale_s, so)

        row[f"{key}_with_quant_ms"] = median_ms(quantized_call, reps)
    return row


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m worker.bench.fp8_attention", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1024,2048", help="square image sides")
    p.add_argument("--text-tokens", type=int, default=201, help="prompt tokens added to the image tokens")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("fp8 attention needs CUDA", file=sys.stderr)
        return 2
    meta: dict[str, object] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                               "cudnn_torch": torch.backends.cudnn.version()}
    try:
        import cudnn

        meta.update(cudnn_frontend=cudnn.__version__, cudnn_backend=cudnn.backend_version())
    except Exception as exc:  # noqa: BLE001
        meta["cudnn_frontend_error"] = f"{type(exc).__name__}: {exc}"[:300]
    print(json.dumps(meta), flush=True)
    rows = []
    for size in (int(s) for s in args.sizes.split(",") if s.strip()):
        rows.append(run_size(size, args.text_tokens, args.reps))
        print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print("\n| size | seq | path | ms | TFLOP/s | rel err vs fp32 |\n|---|---|---|---|---|---|")
    for r in rows:
        for key in ("bf16_cudnn", "bf16_flash", "fp8_out_bf16", "fp8_out_e4m3"):
            if f"{key}_ms" in r:
                print(f"| {r['size']}² | {r['seq']} | {key} | {r[f'{key}_ms']:.3f} | {r[f'{key}_tflops']:.0f} | "
                      f"{r[f'{key}_err']:.2e} |")
            elif f"{key}_error" in r:
                print(f"| {r['size']}² | {r['seq']} | {key} | failed: {r[f'{key}_error'][:200]} | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
