"""`letterpress worker`: one worker per visible GPU, each pinned; one CPU worker without a GPU."""
from __future__ import annotations

import os
import stat

from worker import launcher


def test_one_worker_per_pinned_gpu(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,2")
    assert launcher.plan_workers(launcher.visible_gpus()) == {"gpu0": "0", "gpu2": "2"}


def test_gpus_found_by_nvidia_smi(monkeypatch, tmp_path):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: a)'\necho 'GPU 1: NVIDIA H100 (UUID: b)'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert launcher.plan_workers(launcher.visible_gpus()) == {"gpu0": "0", "gpu1": "1"}


def test_no_gpu_means_one_cpu_worker(monkeypatch, tmp_path):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    assert launcher.plan_workers(launcher.visible_gpus()) == {"cpu": None}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert launcher.plan_workers(launcher.visible_gpus()) == {"cpu": None}


def test_spawn_pins_cuda_visible_devices(monkeypatch):
    seen = {}

    class FakePopen:
        def __init__(self, cmd, env):
            seen["cmd"], seen["env"] = cmd, env

    monkeypatch.setattr(launcher.subprocess, "Popen", FakePopen)
    launcher.spawn("gpu3", "3", "interactive,batch", 9403)
    assert seen["env"]["CUDA_VISIBLE_DEVICES"] == "3"
    assert seen["env"]["LETTERPRESS_WORKER__METRICS_PORT"] == "9403"
    assert seen["cmd"][seen["cmd"].index("-n") + 1] == "gpu3@%h"
    assert "--pool" in seen["cmd"] and "solo" in seen["cmd"]


def test_each_worker_of_a_host_gets_its_own_metrics_port():
    assert launcher.metrics_ports(["gpu0", "gpu1", "gpu2"], 9400) == {"gpu0": 9400, "gpu1": 9401, "gpu2": 9402}
    assert launcher.metrics_ports(["cpu"], 0) == {"cpu": 0}  # 0: metrics off
