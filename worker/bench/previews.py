"""`letterpress bench previews`: what a preview costs a generation (worker/pipeline/previews.py).

    python -m worker.bench previews --sizes 1024,2048 --steps 12 --every 0,4,2 --rounds 2

On the real-size random-weight model (worker.bench.models.build_random_real; random weights give the real
speed), the worker's fast path generates one image per call with previews every N steps (0: none), the variants
interleaved round after round in one process so the machine's drift hits all alike. Reported per size and N: the
call's seconds (median of the rounds), previews made, and the added seconds per preview against N = 0. Also
the one-time fit of the colour map from the VAE. `--compile` runs the regional compile first (minutes).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch


def _timed_call(loaded, spec, every: int) -> tuple[float, int]:
    from worker.pipeline.fast_path import generate_batch
    from worker.pipeline.previews import PreviewRequest

    made: list[int] = []
    request = PreviewRequest(every=every, deliver=lambda step, jpegs: made.append(step)) if every else None
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    generate_batch(loaded, [spec], previews=request)
    torch.cuda.synchronize()
    return time.perf_counter() - t0, len(made)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="letterpress bench previews", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1024,2048")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", default="0,4,2", help="preview periods to compare (0: no previews)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    from worker.bench.models import DEFAULT_PROMPT, build_random_real, make_spec
    from worker.pipeline import previews

    loaded = build_random_real("cuda")
    if args.compile:
        from worker.pipeline.fast_path import prepare_compiled
        prepare_compiled(loaded)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    previews.projection_of(loaded.pipe)
    torch.cuda.synchronize()
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "compiled": args.compile,
              "steps": args.steps, "fit_s": round(time.perf_counter() - t0, 3), "rows": []}
    periods = [int(x) for x in args.every.split(",")]
    for size in (int(x) for x in args.sizes.split(",")):
        spec = make_spec(DEFAULT_PROMPT, size, args.steps, (1,))
        _timed_call(loaded, spec, 0)  # warm: text cache, cuDNN plans, allocator
        times: dict[int, list[float]] = {every: [] for every in periods}
        counts: dict[int, int] = {}
        for _ in range(args.rounds):
            for every in periods:
                seconds, counts[every] = _timed_call(loaded, spec, every)
                times[every].append(seconds)
        base = statistics.median(times[0]) if 0 in times else None
        for every in periods:
            median = statistics.median(times[every])
            per = (median - base) / counts[every] if base is not None and counts[every] else None
            row = {"size": size, "every": every, "call_s": round(median, 4), "previews": counts[every],
                   "per_preview_ms": round(per * 1000, 2) if per is not None else None,
                   "step_s": round(median / args.steps, 4), "runs": [round(t, 4) for t in times[every]]}
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "previews.json").write_text(json.dumps(result, indent=1))
    return 0
