"""`letterpress bench profile` on the tiny model, CPU: kernel classes are named right, and a run writes a
breakdown whose classes add up, attention rows for each backend, and a fused-projection step equal to the plain
one (the fused forward must compute the same function)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support import REPO
from worker.bench.profile import classify


@pytest.mark.parametrize("name, expected", [
    ("nvjet_sm90_tst_192x208_64x4_1x2_h_bz_coopB_TNT", "matmul"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32", "matmul"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7", "attention"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<256>>", "attention"),
    # inductor names a fused norm/rotary kernel after the attention op it feeds: still elementwise work
    ("triton_per_fused__scaled_dot_product_cudnn_attention__to_copy_add_mean", "fused elementwise"),
    ("triton_poi_fused__unsafe_view_mul_silu_3", "fused elementwise"),
    ("triton_tem_fused_mm_0", "matmul"),
    ("aten::mm", "matmul"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("Memset (Device)", "other"),
])
def test_kernel_classes(name, expected):
    assert classify(name) == expected


def test_tiny_profile_run(tmp_path):
    cmd = [sys.executable, "-m", "common.cli.main", "bench", "profile", "--model", "tiny", "--device", "cpu",
           "--size", "64", "--reps", "1", "--no-compile", "--fused", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "profile.json").read_text())
    assert result["tokens"]["uncond"] == 16 and result["tokens"]["cond"] == result["tokens"]["text"] + 16
    breakdown = result["breakdown"]
    classes = breakdown["classes"]
    assert {"matmul", "attention"} <= set(classes)
    assert sum(c["ms_per_step"] for c in classes.values()) == pytest.approx(breakdown["busy_ms_per_step"])
    assert sum(c["share"] for c in classes.values()) == pytest.approx(1.0)
    backends = {(r["pass"], r["backend"]) for r in result["attention_alone"] if "ms" in r}
    assert {("cond", "flash_attention"), ("uncond", "flash_attention"), ("cond", "math")} <= backends
    for row in result["attention_alone"]:
        if "ms" in row:
            assert row["max_abs_err"] < 1e-4, row
    assert {r["matmul"] for r in result["matmuls_alone"]} >= {"qkv fused", "w13 fused", "w2"}
    assert set(result["step_s"]) == {"eager", "fused", "plain (again)"}
    assert result["fused_vs_plain_max_abs_diff"] < 1e-4
