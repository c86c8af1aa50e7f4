"""`letterpress bench adapters`: what a LoRA adapter costs a worker, side by side in one run.

    python -m worker.bench adapters [--size real|tiny] [--res 1024] [--rank 64] [--slots 3] [--out DIR]

On one pipeline (random weights of the real sizes on a GPU, or the tiny model on the CPU) and three random LoRA
files of `--rank` over the attention and feed-forward layers of every block:

1. eager (no compile): seconds a step without an adapter and with one; the time to switch to an adapter that is
   not loaded (read the file, load it), and between two loaded ones (`set_adapters`);
2. compiled with hot-swap slots (worker/pipeline/adapters.py, what a GPU worker runs): the warm-up, seconds a step
   with LoRA off and with one adapter in a slot (the other slots zero), the time of a hot swap (read the file,
   copy it into a slot), and how many graphs the switches compiled (torch._dynamo counters: 0 is the claim).

Writes `adapters.json` and `adapters.md` under --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from worker.bench.models import build_random_real, make_spec, uncompile
from worker.bench.paths import _now, _sync, run_fast

TARGETS = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0", "feed_forward.w1",
           "feed_forward.w2", "feed_forward.w3")
PROMPT = "a vintage travel poster of the alps with the title VISIT THE ALPS in large yellow letters"


def write_random_lora(path: Path, transformer, *, rank: int, seed: int) -> Path:
    """A random LoRA of `rank` over TARGETS in every block (diffusers key layout), saved as safetensors."""
    from safetensors.torch import save_file

    generator = torch.Generator("cpu").manual_seed(seed)
    state = {}
    for i, layer in enumerate(transformer.layers):
        for target in TARGETS:
            module = layer.get_submodule(target)
            key = f"transformer.layers.{i}.{target}"
            dtype = module.weight.dtype
            state[f"{key}.lora_A.weight"] = (torch.randn(rank, module.in_features, generator=generator) * 0.01
                                             ).to(dtype)
            state[f"{key}.lora_B.weight"] = (torch.randn(module.out_features, rank, generator=generator) * 0.01
                                             ).to(dtype)
    save_file(state, str(path))
    return path


def _timed(device: str, fn: Callable[[], Any]) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


class AdapterBench:
    def __init__(self, args):
        self.args = args
        self.device = args.device
        self.rows: list[dict[str, Any]] = []
        self.result: dict[str, Any] = {"meta": {"started": _now(), "args": vars(args)}, "rows": self.rows}

    def log(self, message: str) -> None:
        print(f"[{_now()}] {message}", flush=True)

    def _load(self):
        if self.args.size == "real":
            return build_random_real(self.device)
        from common.devstack.tiny_model import build_tiny_model
        from common.settings import ModelSettings
        from worker.pipeline.loading import load_pipeline

        path = build_tiny_model(Path(tempfile.mkdtemp(prefix="letterpress-bench-")) / "tiny")
        return load_pipeline(ModelSettings(id=str(path)), device=self.device)

    def step_s(self, loaded, loras: tuple = ()) -> float:
        def spec(steps: int):
            return dataclasses.replace(make_spec(PROMPT, self.args.res, steps, (1,)), loras=loras)
        run_fast(loaded, [spec(self.args.warm_steps)])
        timing, _ = run_fast(loaded, [spec(self.args.steps)])
        return timing["s_step"]

    def activate_s(self, loaded, loras: tuple) -> float:
        from worker.pipeline.adapters import adapters_of

        return _timed(self.device, lambda: adapters_of(loaded).activate(loras))

    def record(self, mode: str, what: str, value: float, unit: str) -> None:
        self.rows.append({"mode": mode, "what": what, "value": value, "unit": unit})
        self.log(f"{mode}: {what} = {value:.4f} {unit}")

    def run(self) -> dict[str, Any]:
        from torch._dynamo.utils import counters

        from worker.pipeline.adapters import LoadedAdapters, LoraUse
        from worker.pipeline.fast_path import prepare_compiled

        loaded = self._load()
        self.result["meta"]["device"] = (torch.cuda.get_device_name(self.device) if self.device.startswith("cuda")
                                         else "cpu")
        files = Path(tempfile.mkdtemp(prefix="letterpress-loras-"))
        uses = [LoraUse(sha256=f"{i}" * 64, scale=1.0,
                        path=write_random_lora(files / f"{i}.safetensors", loaded.pipe.transformer,
                                               rank=self.args.rank, seed=i)) for i in range(3)]
        self.result["meta"]["lora_file_bytes"] = uses[0].path.stat().st_size
        a, b, c = ((u,) for u in uses)

        # 1. eager: named adapters
        loaded.adapters = LoadedAdapters(loaded.pipe, resident=2)
        self.record("eager", "s/step, no adapter", self.step_s(loaded), "s")
        self.record("eager", "switch to a new adapter (read + load)", self.activate_s(loaded, a), "s")
        self.record("eager", "s/step, one adapter", self.step_s(loaded, a), "s")
        self.record("eager", "switch to a second new adapter", self.activate_s(loaded, b), "s")
        self.record("eager", "switch between two loaded adapters", self.activate_s(loaded, a), "s")
        self.record("eager", "LoRA off", self.activate_s(loaded, ()), "s")
        for name in list(getattr(loaded.pipe.transformer, "peft_config", {})):
            loaded.pipe.delete_adapters(name)

        # 2. compiled with hot-swap slots, on a fresh adapter state (a new pipeline would take minutes to build)
        from worker.pipeline.loading import LoadedPipeline

        loaded = LoadedPipeline(pipe=loaded.pipe, device=loaded.device, dtype=loaded.dtype, variant=loaded.variant,
                                model_id=loaded.model_id, revision=loaded.revision)
        state = LoadedAdapters(loaded.pipe)
        loaded.adapters = state
        t0 = time.perf_counter()
        state.prepare_slots(slots=self.args.slots, rank=self.args.rank)
        self.record("compiled", f"prepare {self.args.slots} slots of rank {self.args.rank}",
                    time.perf_counter() - t0, "s")
        t0 = time.perf_counter()
        prepare_compiled(loaded, warmup_sizes=[(self.args.res, self.args.res)], warmup_steps=2)
        self.record("compiled", "compile warm-up (LoRA off and on)", time.perf_counter() - t0, "s")
        graphs = counters["stats"]["unique_graphs"]
        self.record("compiled", "s/step, LoRA off", self.step_s(loaded), "s")
        self.record("compiled", "hot swap in a new adapter (read + copy)", self.activate_s(loaded, a), "s")
        self.record("compiled", "s/step, one adapter (other slots zero)", self.step_s(loaded, a), "s")
        self.record("compiled", "hot swap to another adapter", self.activate_s(loaded, b), "s")
        if self.args.slots >= 2:
            self.record("compiled", "s/step, two adapters", self.step_s(loaded, (uses[0], uses[2])), "s")
        self.record("compiled", "s/step, LoRA off again", self.step_s(loaded), "s")
        self.record("compiled", "s/step, the first adapter again", self.step_s(loaded, a), "s")
        self.record("compiled", "graphs compiled by these switches", counters["stats"]["unique_graphs"] - graphs,
                    "graphs")
        if self.device.startswith("cuda"):
            self.result["meta"]["peak_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        uncompile(loaded.pipe)
        self.result["meta"]["finished"] = _now()
        return self.result


def render_markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    args = meta["args"]
    lines = [f"Adapters on {meta.get('device')} ({args['size']} sizes, {args['res']}², rank {args['rank']} over "
             f"{len(TARGETS)} Linear layers a block, {meta.get('lora_file_bytes', 0) / 2**20:.0f} MiB a file, "
             f"{args['slots']} slots, median of {args['steps']} steps)", "",
             "| mode | measure | value |", "|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['mode']} | {row['what']} | {row['value']:.4f} {row['unit']} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="letterpress bench adapters", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=("real", "tiny"), default="real" if cuda else "tiny")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--res", type=int, default=None, help="square image side (default 1024; tiny 64)")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--slots", type=int, default=3, help="hot-swap slots (the worker's adapters.max_per_job)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warm-steps", type=int, default=1)
    p.add_argument("--out", default="bench-results")
    args = p.parse_args(argv)
    args.res = args.res or (1024 if args.size == "real" else 64)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result = AdapterBench(args).run()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapters.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "adapters.md").write_text(render_markdown(result))
    print(render_markdown(result))
    return 0
