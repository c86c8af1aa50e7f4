"""`letterpress bench` on the tiny model, CPU: it runs every CPU path, writes sane JSON and markdown, and its
end-to-end mode drives the real platform (Postgres, Redis, API, a Celery worker) to completion."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from common.presets import PRESETS
from tests.support import REPO
from worker.bench.models import step_flops


def run_bench(out: Path, *args: str, timeout: int = 900) -> dict:
    cmd = [sys.executable, "-m", "worker.bench", "--size", "tiny", "--device", "cpu", "--out", str(out), *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "bench.md").is_file()
    return json.loads((out / "bench.json").read_text())


def test_tiny_bench_writes_every_row_with_sane_fields(tmp_path):
    result = run_bench(tmp_path, "--sizes", "32", "--steps", "3", "--paths", "stock,stock-tight,fast",
                       "--batch-sizes", "1,2", "--batch-res", "32", "--equiv-steps", "3",
                       "--presets", "V4_QUALITY_48,V4_TURBO_12", "--cfg-free", "--price-per-gpu-hour", "2.5")
    meta = result["meta"]
    assert meta["price_per_gpu_hour"] == 2.5 and meta["capacity"] == "on_demand"
    assert meta["device"] == "cpu" and meta["size"] == "tiny" and meta["torch"] and meta["diffusers"]
    assert meta["prompt_tokens"] > 50
    rows = result["rows"]
    assert not [r for r in rows if "error" in r], [r.get("error") for r in rows]
    names = [(r["name"], r["batch"]) for r in rows]
    assert names == [("fp32 stock", 1), ("fp32 stock-tight", 1), ("fp32 fast", 1), ("fp32 fast+cfg-free", 1),
                     ("fp32 fast", 1), ("fp32 fast", 2), ("fp32 fast+cfg-free", 1), ("fp32 fast+cfg-free", 2)]
    for r in rows:
        assert r["s_step"] > 0 and r["fixed_s"] >= 0 and r["steps_timed"] == 3
        for preset, ipm in r["img_per_min"].items():  # the cost columns follow from the measured rate
            assert r["img_per_gpu_hour"][preset] == pytest.approx(60 * ipm)
            assert r["cost_per_1000"][preset] == pytest.approx(1000 * 2.5 / (60 * ipm))
        assert r["tflops"] > 0 and r["useful_tflops"] > 0
        for name, rate in r["img_per_min"].items():
            expected = 60 * r["batch"] / (r["fixed_s"] + PRESETS[name].steps * r["s_step"])
            assert rate == pytest.approx(expected)
        assert r["img_per_min"]["V4_TURBO_12"] > r["img_per_min"]["V4_QUALITY_48"]
    assert "Cost per image at 2.5" in (tmp_path / "bench.md").read_text()
    stock, tight, fast = rows[0], rows[1], rows[2]
    assert stock["text_tokens"] == 2048 and tight["text_tokens"] == fast["text_tokens"] == meta["prompt_tokens"]
    assert stock["tflop_step"] > fast["tflop_step"]  # the stock call computes the padding too
    # Float32 on CPU: the fast path is within one level of the stock call and equal to stock at equal length.
    assert fast["diff_vs_stock"]["max"] <= 1 and fast["diff_vs_stock_tight"]["max"] == 0
    cfg_free = rows[3]
    # one pass a step (the tiny model is text-bound, so fewer FLOPs but not half)
    assert cfg_free["path"] == "fast+cfg-free" and cfg_free["tflop_step"] < fast["tflop_step"]
    assert rows[5]["prompt_tokens"][0] != rows[5]["prompt_tokens"][1]  # a mixed-length batch: the masked path
    # --cfg-free: the batching rows again at guidance 1.0, one pass a step
    assert rows[7]["kind"] == "batching" and rows[7]["tflop_step"] < rows[5]["tflop_step"]
    equivalence = {e["path"]: e for e in result["equivalence"]}
    assert equivalence["fast"]["vs_stock"]["max"] <= 1 and equivalence["fast"]["steps"] == 3
    md = (tmp_path / "bench.md").read_text()
    assert "| fp32 fast |" in md and "python" in md and "-m worker.bench " in md


def test_int8_is_a_weight_stage_and_reports_its_error_against_the_first_stage():
    from worker.bench.paths import STAGE_PATHS, WEIGHT_STAGES, parse_args, render_markdown

    assert STAGE_PATHS["int8"] == STAGE_PATHS["fp8"]
    assert WEIGHT_STAGES.index("int8") < WEIGHT_STAGES.index("fp8")  # both need dense weights: one a run
    args = parse_args(["--size", "tiny", "--device", "cpu", "--weights", "bf16,int8", "--error-steps", "0"])
    assert args.weights == ["bf16", "int8"] and args.error_steps == 0
    with pytest.raises(SystemExit):
        parse_args(["--weights", "int4"])
    result = {"meta": {"date": "d", "device": "NVIDIA H200", "torch": "t", "diffusers": "d", "transformers": "t",
                       "size": "real", "command": "python3 -m worker.bench"}, "rows": [], "equivalence": [],
              "errors": [{"weights": "int8", "vs": "bf16", "size": 1024, "what": "one step's velocity (t = 0.5)",
                          "rel": 0.018},
                         {"weights": "int8", "vs": "bf16", "size": 1024, "what": "fast+compile image, 6 steps",
                          "rel": 0.05, "mean": 1.25, "max": 40}]}
    md = render_markdown(result)
    assert "| int8 | bf16 | 1024² | one step's velocity (t = 0.5) | 1.80% |  |" in md
    assert "| int8 | bf16 | 1024² | fast+compile image, 6 steps | 5.00% | 1.25 / 40 |" in md


def test_pixel_diff_has_the_relative_error():
    from PIL import Image

    from worker.bench.paths import pixel_diff

    ref, other = Image.new("RGB", (4, 4), (100, 100, 100)), Image.new("RGB", (4, 4), (110, 100, 100))
    diff = pixel_diff(other, ref)
    assert diff["max"] == 10 and diff["rel"] == pytest.approx(10 / (100 * 3**0.5))
    assert pixel_diff(ref, ref)["rel"] == 0.0


def test_step_flops_match_the_design_figure_for_the_real_model():
    """DESIGN.md: one step at 1024² with trimmed text is about 168 TFLOP."""
    config = SimpleNamespace(num_attention_heads=18, attention_head_dim=256, num_layers=34, intermediate_size=12288,
                             llm_features_dim=53248)
    pipe = SimpleNamespace(transformer=SimpleNamespace(config=config))
    fast = step_flops(pipe, text_tokens=200, image_tokens=4096, batch=1, stock=False)
    stock = step_flops(pipe, text_tokens=2048, image_tokens=4096, batch=1, stock=True)
    assert 160e12 < fast < 175e12
    assert stock > 1.25 * fast  # padding to 2,048 and the per-step projection
    assert step_flops(pipe, text_tokens=200, image_tokens=4096, batch=4, stock=False) == pytest.approx(4 * fast)
    cfg_free = step_flops(pipe, text_tokens=200, image_tokens=4096, batch=1, stock=False, passes=1)
    assert 0.5 * fast < cfg_free < 0.55 * fast  # the conditional pass is the longer one (text rows too)


@pytest.mark.slow  # boots Postgres, Redis, the API and a worker process
def test_tiny_bench_end_to_end_through_the_platform(tmp_path):
    result = run_bench(tmp_path, "--e2e-only", "--e2e-jobs", "2", "--e2e-size", "64", "--e2e-steps", "2")
    e2e = result["e2e"]
    assert "error" not in e2e, e2e.get("traceback")
    assert e2e["jobs"] == 2 and len(e2e["bare"]["generate_s"]) == 2
    assert e2e["platform"]["img_per_min"] > 0 and e2e["bare"]["img_per_min"] > 0 and e2e["ratio"] > 0
    assert all(t["store_s"] >= 0 and t["generate_s"] > 0 for t in e2e["platform"]["timings"])


def test_cli_bench_passes_arguments_through():
    proc = subprocess.run([sys.executable, "-m", "common.cli.main", "bench", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--e2e" in proc.stdout and "--size" in proc.stdout
