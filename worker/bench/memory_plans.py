"""`letterpress bench memory-plans`: what every memory plan needs on a GPU, for worker.pipeline.memory_plans.

    python -m worker.bench memory-plans --steps 1 --out /tmp/mp   # every plan at 1024² and 2048², with caps

Each plan (a weight variant x the text encoder resident or offloaded) runs the worker's fast path (eager: the
compiled path peaked the same in `letterpress bench`'s rows) on the real-size random-weight model: prompt encode
(text cache cleared), `--steps` guided steps (both transformers) and the VAE decode. Per plan and size it runs a
201-token and a 1,866-token prompt, and at 1024² also a batch of 2 (the compile warm-up's mixed batch,
`num_images: 2`), recording peak allocated and reserved memory. Then the worst case runs again under
`torch.cuda.set_per_process_memory_fraction` caps at its peak + `--margins` GiB until one runs (the table's
`runs_under`), and under the `--caps` of smaller cards. It also times one new prompt's encode with the encoder
resident and offloaded, checks that the offloaded encoder's features are the resident one's bit for bit, and
measures the fp8 load peak through the loader's own `place_components` from CPU weights.

Two builds of the model, so every variant comes from dense bf16 weights: bf16 -> fp8; then the text encoder's
language model in NF4 -> nf4-dequant (dense transformers, NF4 encoder, as the loader makes it) -> nf4.
Writes `memory_plans.json` (every run) under `--out` after each measurement; prints the table last.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

GIB = 2**30
LONG_TOKENS = 2000


class Run:
    def __init__(self, out: Path, sizes: list[int], steps: int, caps: list[tuple[str, int, int]],
                 margins: list[float]):
        self.out, self.sizes, self.steps, self.caps, self.margins = out, sizes, steps, caps, margins
        self.device = "cuda"
        props = torch.cuda.get_device_properties(0)
        self.total = props.total_memory
        self.result: dict[str, Any] = {
            "device": props.name, "total_memory": self.total, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "runs": [], "encode": [], "caps": [], "checks": [], "errors": []}

    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "memory_plans.json").write_text(json.dumps(self.result, indent=1))

    # ---------------------------------------------------------------------------------------------------------

    def prompts(self, loaded) -> dict[str, str]:
        from worker.bench.models import DEFAULT_PROMPT
        from worker.pipeline.fast_path import _tokenize

        long = DEFAULT_PROMPT
        while _tokenize(loaded.pipe, long + " " + DEFAULT_PROMPT, 10**6).shape[0] < LONG_TOKENS:
            long = long + " " + DEFAULT_PROMPT
        while _tokenize(loaded.pipe, long, 10**6).shape[0] > LONG_TOKENS:
            long = long[:-16]
        return {"short": DEFAULT_PROMPT, "long": long}

    def generate(self, loaded, prompt: str, size: int, batch: int) -> None:
        from worker.pipeline.fast_path import generate_batch, text_cache
        from worker.pipeline.spec import GenerationSpec

        text_cache(loaded).clear()
        spec = GenerationSpec(prompt_text=prompt, width=size, height=size, steps=self.steps, mu=0.0, std=1.5,
                              guidance_schedule=(5.0,) * self.steps, seeds=tuple(range(batch)))
        generate_batch(loaded, [spec])
        torch.cuda.synchronize()

    def measure(self, loaded, variant: str, placement: str, prompts: dict[str, str]) -> None:
        """Peak allocated and reserved of each (size, prompt, batch) of this plan, then its caps."""
        for size in self.sizes:
            cases = [("short", 1), ("long", 1)] + ([("long", 2)] if size <= 1024 else [])
            worst = 0
            for prompt_name, batch in cases:
                row = {"variant": variant, "text_encoder": placement, "size": size, "prompt": prompt_name,
                       "batch": batch}
                _clean()
                row["resident_gib"] = torch.cuda.memory_allocated() / GIB
                torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                try:
                    self.generate(loaded, prompts[prompt_name], size, batch)
                    row["ok"] = True
                except torch.cuda.OutOfMemoryError as exc:
                    row["ok"], row["error"] = False, str(exc)[:300]
                row["seconds"] = time.perf_counter() - t0
                row["allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
                row["reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
                worst = max(worst, torch.cuda.max_memory_allocated())
                self.result["runs"].append(row)
                self.log(f"{variant:12s} {placement:8s} {size}² {prompt_name:5s} x{batch}: "
                         f"resident {row['resident_gib']:.2f}, peak {row['allocated_gib']:.2f} alloc / "
                         f"{row['reserved_gib']:.2f} reserved GiB, {row['seconds']:.1f}s ok={row['ok']}")
                self.save()
            label = f"{variant}/{placement}"
            batch = 2 if size <= 1024 else 1
            for margin in self.margins:  # the smallest margin over the peak that runs under a cap
                if self.capped(loaded, label, worst + int(margin * GIB), prompts["long"], size, batch,
                               kind="margin", margin_gib=margin):
                    break
            for cap_label, cap, cap_size in self.caps:
                if cap_label == label and cap_size == size:
                    self.capped(loaded, label, cap, prompts["long"], size, 1, kind="class")

    def encode_cost(self, loaded, variant: str, placement: str, prompts: dict[str, str]) -> None:
        """Seconds for one uncached prompt encode (median of 3), short and long prompt."""
        from worker.pipeline.fast_path import _encode_uncached

        for name, prompt in prompts.items():
            times = []
            for _ in range(4):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                _encode_uncached(loaded.pipe, prompt, 10**6)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            row = {"variant": variant, "text_encoder": placement, "prompt": name, "seconds": times,
                   "median_s": statistics.median(times[1:])}
            self.result["encode"].append(row)
            self.log(f"encode {variant} {placement} {name}: {row['median_s']:.3f}s (first {times[0]:.3f}s)")
        self.save()

    @torch.no_grad()
    def features(self, loaded, prompt: str) -> torch.Tensor:
        from worker.pipeline.fast_path import _text_features, _tokenize

        return _text_features(loaded.pipe, _tokenize(loaded.pipe, prompt, 10**6)).cpu()

    def check_equal(self, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        same = bool(torch.equal(a, b))
        self.result["checks"].append({"check": name, "bit_identical": same,
                                      "max_abs_diff": float((a.float() - b.float()).abs().max())})
        self.log(f"check {name}: bit-identical={same}")
        self.save()

    def capped(self, loaded, label: str, cap_bytes: int, prompt: str, size: int, batch: int, *, kind: str,
               margin_gib: float | None = None) -> bool:
        """One generation under a memory cap standing in for a smaller card: ran, or out of memory."""
        _clean()
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_bytes / self.total))
        torch.cuda.reset_peak_memory_stats()
        row = {"plan": label, "kind": kind, "cap_bytes": cap_bytes, "size": size, "batch": batch,
               "margin_gib": margin_gib}
        try:
            self.generate(loaded, prompt, size, batch)
            row["ran"] = True
        except torch.cuda.OutOfMemoryError as exc:
            row["ran"], row["error"] = False, str(exc)[:200]
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
        row["reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
        row["allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
        self.result["caps"].append(row)
        self.log(f"cap {cap_bytes / GIB:.2f} GiB ({kind}{'' if margin_gib is None else f' +{margin_gib}'}), "
                 f"{label} at {size}² x{batch}: ran={row['ran']} (peak {row['allocated_gib']:.2f} alloc / "
                 f"{row['reserved_gib']:.2f} reserved GiB)")
        _clean()
        self.save()
        return row["ran"]

    def guarded(self, label: str, fn) -> Any:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - record and go on: the rest of the table still counts
            import traceback

            self.result["errors"].append({"stage": label, "error": traceback.format_exc()[-2000:]})
            self.log(f"ERROR in {label}: {type(exc).__name__}: {exc}")
            self.save()
            return None

    # ---------------------------------------------------------------------------------------------------------

    def dense_build(self) -> None:
        """bf16 (resident, offloaded), the fp8 load through the loader's `place_components`, fp8 (offloaded,
        resident)."""
        from worker.bench.models import build_random_real
        from worker.pipeline.loading import TextEncoderOffload, place_components

        t0 = time.perf_counter()
        loaded = build_random_real(self.device)
        self.log(f"built in {time.perf_counter() - t0:.1f}s; {torch.cuda.memory_allocated() / GIB:.2f} GiB")
        free, total = torch.cuda.mem_get_info()
        self.result["non_torch_gib"] = (total - free - torch.cuda.memory_reserved()) / GIB  # context, modules
        pipe = loaded.pipe
        prompts = self.prompts(loaded)
        self.result["prompt_tokens"] = {k: _ntok(loaded, v) for k, v in prompts.items()}
        self.measure(loaded, "bf16", "resident", prompts)
        self.encode_cost(loaded, "bf16", "resident", prompts)
        resident_features = self.features(loaded, prompts["short"])

        t0 = time.perf_counter()
        offload = TextEncoderOffload(pipe.text_encoder, self.device)
        pipe._letterpress_text_offload = offload
        _clean()
        self.result["offload_setup"] = {"seconds": time.perf_counter() - t0, "pinned": offload.pinned,
                                        "offloaded_gib": offload.offloaded_bytes / GIB, "blocks": len(offload.blocks),
                                        "allocated_after_gib": torch.cuda.memory_allocated() / GIB}
        self.log(f"offload: {self.result['offload_setup']}")
        self.check_equal("bf16 text features, offloaded vs resident", resident_features,
                         self.features(loaded, prompts["short"]))
        self.measure(loaded, "bf16", "offload", prompts)
        self.encode_cost(loaded, "bf16", "offload", prompts)

        # fp8 as the loader makes it: the bf16 transformers on the CPU, quantized one linear at a time on the GPU
        for t in (pipe.transformer, pipe.unconditional_transformer):
            t.to("cpu")
        _clean()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        place_components(pipe, "fp8", self.device)
        torch.cuda.synchronize()
        loaded.variant = "fp8"
        self.result["fp8_load"] = {"seconds": time.perf_counter() - t0, "text_encoder": "offload",
                                   "peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
                                   "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
                                   "before_gib": base / GIB, "after_gib": torch.cuda.memory_allocated() / GIB}
        self.log(f"fp8 load: {self.result['fp8_load']}")
        self.save()
        self.measure(loaded, "fp8", "offload", prompts)
        offload.remove()
        pipe._letterpress_text_offload = None
        self.measure(loaded, "fp8", "resident", prompts)
        del loaded, pipe, offload
        _clean()

    def nf4_build(self) -> None:
        """nf4-dequant (dense transformers, NF4 encoder) and nf4 (everything NF4), resident and offloaded."""
        from worker.bench.models import build_random_real
        from worker.bench.paths import to_nf4
        from worker.pipeline.loading import TextEncoderOffload

        loaded = build_random_real(self.device)
        pipe = loaded.pipe
        prompts = self.prompts(loaded)
        to_nf4(pipe.text_encoder.language_model)
        _clean()
        loaded.variant = "nf4-dequant"
        self.measure(loaded, "nf4-dequant", "resident", prompts)
        resident_features = self.features(loaded, prompts["short"])
        self.encode_cost(loaded, "nf4-dequant", "resident", prompts)
        offload = TextEncoderOffload(pipe.text_encoder, self.device)
        _clean()
        self.result["offload_setup_nf4"] = {"pinned": offload.pinned, "offloaded_gib": offload.offloaded_bytes / GIB,
                                            "allocated_after_gib": torch.cuda.memory_allocated() / GIB}
        self.check_equal("nf4 text features, offloaded vs resident", resident_features,
                         self.features(loaded, prompts["short"]))
        self.encode_cost(loaded, "nf4-dequant", "offload", prompts)
        self.measure(loaded, "nf4-dequant", "offload", prompts)
        to_nf4(pipe.transformer)
        to_nf4(pipe.unconditional_transformer)
        _clean()
        loaded.variant = "nf4"
        self.measure(loaded, "nf4", "offload", prompts)
        offload.remove()
        _clean()
        self.measure(loaded, "nf4", "resident", prompts)


def _ntok(loaded, prompt: str) -> int:
    from worker.pipeline.fast_path import _tokenize

    return int(_tokenize(loaded.pipe, prompt, 10**6).shape[0])


def _clean() -> None:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def table(result: dict[str, Any]) -> str:
    """Per plan and size: the worst peak over prompts and batches, GiB."""
    worst: dict[tuple, dict[str, float]] = {}
    for r in result["runs"]:
        key = (r["variant"], r["text_encoder"], r["size"])
        w = worst.setdefault(key, {"allocated": 0.0, "reserved": 0.0, "resident": r["resident_gib"], "ok": True})
        w["allocated"] = max(w["allocated"], r["allocated_gib"])
        w["reserved"] = max(w["reserved"], r["reserved_gib"])
        w["ok"] = w["ok"] and r["ok"]
    lines = ["| variant | text encoder | size | weights on GPU GiB | peak allocated GiB | peak reserved GiB | ok |",
             "|---|---|---|---|---|---|---|"]
    for (variant, te, size), w in worst.items():
        lines.append(f"| {variant} | {te} | {size}² | {w['resident']:.2f} | {w['allocated']:.2f} | "
                     f"{w['reserved']:.2f} | {w['ok']} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="letterpress bench memory-plans", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1024,2048")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", default="", help="directory for memory_plans.json (default: $OUT or ./bench-out)")
    parser.add_argument("--only", default="dense,nf4", help="dense (bf16, fp8) and/or nf4 (nf4-dequant, nf4)")
    parser.add_argument("--caps", default="bf16/offload:48:1024,bf16/offload:48:2048,fp8/resident:48:2048,"
                        "bf16/offload:40:1024,fp8/offload:40:2048,nf4-dequant/offload:40:1024,"
                        "fp8/offload:24:1024,nf4/resident:24:1024,nf4/offload:24:2048,nf4/resident:24:2048",
                        help="plan:GB:size runs under a memory cap of GB (decimal) standing in for a smaller card")
    parser.add_argument("--margins", default="1.5,3,5",
                        help="GiB over each plan's measured peak to try as a cap, smallest first, until one runs")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    import os

    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("memory-plans needs a CUDA GPU", file=sys.stderr)
        return 2
    out = Path(args.out or os.environ.get("OUT") or "bench-out")
    caps = []
    for item in filter(None, args.caps.split(",")):
        label, gb, size = item.split(":")
        caps.append((label, int(float(gb) * 10**9), int(size)))
    run = Run(out, [int(s) for s in args.sizes.split(",") if s], args.steps, caps,
              [float(m) for m in args.margins.split(",") if m])
    run.result["caps_requested"] = caps
    t0 = time.perf_counter()
    if "dense" in args.only:
        run.guarded("dense", run.dense_build)
        _clean()
    if "nf4" in args.only:
        run.guarded("nf4", run.nf4_build)
    run.result["seconds"] = time.perf_counter() - t0
    run.save()
    print(table(run.result))
    print(json.dumps({k: run.result.get(k) for k in ("offload_setup", "offload_setup_nf4", "fp8_load", "checks",
                                                       "prompt_tokens", "non_torch_gib", "seconds")}))
    for c in run.result["caps"]:
        print(f"cap {c['plan']} {c['size']}² x{c['batch']} {c['kind']} {c['cap_bytes'] / GIB:.2f} GiB: ran={c['ran']}")
    for e in run.result["errors"]:
        print("ERROR", e["stage"], e["error"][-600:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
