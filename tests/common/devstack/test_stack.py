"""`letterpress up` (what `make up` runs) on embedded defaults: its own Postgres and Redis, local storage, the
tiny model (no GPU); then `letterpress submit --wait` gets a PNG, as the README says."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from PIL import Image

from tests.support import free_port, wait_until


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LETTERPRESS_")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


@pytest.mark.slow  # the whole local stack in subprocesses
def test_up_then_submit_gets_a_png(tmp_path):
    home, port = tmp_path / "home", free_port()
    env = clean_env(LETTERPRESS_HOME=str(home))
    log = open(tmp_path / "up.log", "wb")
    up = subprocess.Popen([sys.executable, "-m", "common.cli.main", "up", "--port", str(port)], env=env, stdout=log,
                          stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: up.poll() is not None or _ready(port), 120, what="letterpress up ready")
        assert up.poll() is None, (tmp_path / "up.log").read_text()
        assert (home / "dev_api_key").is_file()
        submit = subprocess.run(
            [sys.executable, "-m", "common.cli.main", "submit", "a poster that says HELLO", "--width", "256", "--height",
             "256", "--preset", "V4_TURBO_12", "--wait", "--out", str(tmp_path / "out")],
            env={**env, "LETTERPRESS_API_URL": f"http://127.0.0.1:{port}"}, capture_output=True, text=True,
            timeout=300)
        assert submit.returncode == 0, submit.stderr + (tmp_path / "up.log").read_text()[-3000:]
        png = next((tmp_path / "out").glob("*.png"))
        with Image.open(png) as im:
            assert im.size == (256, 256)
        assert any((home / "storage").rglob("*.png"))  # local storage under LETTERPRESS_HOME
        assert (home / "models" / "tiny" / "model_index.json").is_file()  # the embedded default model
    finally:
        os.killpg(up.pid, signal.SIGTERM)
        up.wait(timeout=60)
    time.sleep(0.5)
    assert not _ready(port)
    # nothing `up` started outlives it: the API, the launcher and its worker, the webhooks worker
    wait_until(lambda: not _processes_of(home), 60, what="every process of letterpress up gone")


def _processes_of(home) -> list[int]:
    """The pids of the processes started with this LETTERPRESS_HOME."""
    mark = f"LETTERPRESS_HOME={home}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and mark in open(f"/proc/{entry}/environ", "rb").read().split(b"\0"):
                pids.append(int(entry))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return pids


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
