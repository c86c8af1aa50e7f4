"""`letterpress worker`: one worker per visible GPU, each pinned; one CPU worker without a GPU."""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time

from tests.support import REPO
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
        def __init__(self, cmd, env, **options):
            seen["cmd"], seen["env"], seen["options"] = cmd, env, options

    monkeypatch.setattr(launcher.subprocess, "Popen", FakePopen)
    launcher.spawn("gpu3", "3", "interactive,batch", 9403)
    assert seen["env"]["CUDA_VISIBLE_DEVICES"] == "3"
    assert seen["env"]["LETTERPRESS_WORKER__METRICS_PORT"] == "9403"
    assert seen["cmd"][seen["cmd"].index("-n") + 1] == "gpu3@%h"
    assert "--pool" in seen["cmd"] and "solo" in seen["cmd"]
    assert seen["options"]["start_new_session"]  # only the launcher's forwarded signal reaches it


def test_each_worker_of_a_host_gets_its_own_metrics_port():
    assert launcher.metrics_ports(["gpu0", "gpu1", "gpu2"], 9400) == {"gpu0": 9400, "gpu1": 9401, "gpu2": 9402}
    assert launcher.metrics_ports(["cpu"], 0) == {"cpu": 0}  # 0: metrics off


# A stand-in worker: counts the SIGTERMs it gets into a file, and exits half a second after the first.
_COUNTING_WORKER = """
import os, signal, sys, time
path = sys.argv[1]
def on_term(*_):
    with open(path, "a") as f:
        f.write(f"{os.getpgrp()}\\n")
signal.signal(signal.SIGTERM, on_term)
while not os.path.exists(path):
    time.sleep(0.05)
time.sleep(0.5)
"""
_LAUNCHER = """
import sys
import worker.launcher as launcher
launcher.worker_command = lambda name, queues: [sys.executable, "-c", sys.argv[1], sys.argv[2]]
sys.exit(launcher.main(["--cpu"]))
"""


def test_a_stop_reaches_each_worker_once_however_often_the_launcher_is_told(tmp_path):
    """`letterpress up` stops its children as a terminal or `kill -- -PGID` does (the whole group), then signals
    the launcher again: each worker must get one SIGTERM (a Celery worker given a second one while it handles the
    first can deadlock in its signal handler and never exit), and it lives in a process group of its own."""
    received = tmp_path / "received"
    proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, _COUNTING_WORKER, str(received)], cwd=REPO,
                            env={**os.environ, "LETTERPRESS_WORKER__METRICS_PORT": "0"}, start_new_session=True)
    try:
        time.sleep(3)  # the launcher has started its worker
        os.killpg(proc.pid, signal.SIGTERM)  # the group: the launcher (and, before, its workers too)
        time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)  # and the launcher itself again, as `up` does
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    groups = received.read_text().split()
    assert len(groups) == 1
    assert int(groups[0]) != proc.pid  # not the launcher's group
