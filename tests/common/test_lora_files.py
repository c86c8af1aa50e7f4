"""common.lora_files.check_for_model: the LoRA check of a registration runs in a helper process (torch and diffusers
never enter the calling process), a helper that died is replaced, and a stuck one is answered as 503."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from common import lora_files
from common.errors import ServiceUnavailable
from common.settings import ModelSettings
from tests.tiny_loras import tiny_transformer, write_lora

pytestmark = pytest.mark.slow  # each test starts helper processes that import torch and diffusers


@pytest.fixture(scope="module")
def lora(tiny_model, tmp_path_factory) -> Path:
    return write_lora(tmp_path_factory.mktemp("lora") / "l.safetensors", tiny_transformer(tiny_model), rank=4)


def test_the_check_runs_in_a_helper_and_torch_never_enters_the_caller(tiny_model, lora):
    script = textwrap.dedent(f"""
        import json, sys
        from pathlib import Path
        from common.lora_files import check_for_model
        from common.settings import ModelSettings
        info = check_for_model(Path({str(lora)!r}), ModelSettings(id={str(tiny_model)!r}))
        print(json.dumps({{"rank": info.rank, "layers": info.layers,
                          "imported": [m for m in ("torch", "diffusers") if m in sys.modules]}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["rank"] == 4 and result["layers"] > 0 and result["imported"] == []


def test_a_helper_that_died_is_replaced(tiny_model, lora):
    model = ModelSettings(id=str(tiny_model))
    first = lora_files.check_for_model(lora, model)
    for pid in list(lora_files._helper._processes):
        os.kill(pid, signal.SIGKILL)
    assert lora_files.check_for_model(lora, model) == first


def test_a_stuck_helper_is_answered_503_and_replaced(tiny_model, lora, monkeypatch):
    model = ModelSettings(id=str(tiny_model))
    lora_files.check_for_model(lora, model)  # a warm helper
    processes = list(lora_files._helper._processes.values())
    monkeypatch.setattr(lora_files, "_check", _sleep_forever)
    monkeypatch.setattr(lora_files, "CHECK_TIMEOUT_S", 0.5)
    with pytest.raises(ServiceUnavailable):
        lora_files.check_for_model(lora, model)
    for process in processes:
        process.join(timeout=10)
    assert lora_files._helper is None and processes and not any(p.is_alive() for p in processes)
    monkeypatch.undo()
    assert lora_files.check_for_model(lora, model).rank == 4


def _sleep_forever(path: str, model: ModelSettings):
    import time

    time.sleep(3600)


def test_the_helper_ends_with_the_process_that_started_it(tiny_model, lora):
    """A parent gone without its exit handlers (os._exit, as after a kill) leaves no helper behind."""
    script = textwrap.dedent(f"""
        import os
        from pathlib import Path
        from common import lora_files
        from common.settings import ModelSettings
        lora_files.check_for_model(Path({str(lora)!r}), ModelSettings(id={str(tiny_model)!r}))
        print(*lora_files._helper._processes, flush=True)
        os._exit(0)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr[-2000:]
    [helper] = [int(pid) for pid in out.stdout.split()]
    deadline = time.monotonic() + 15
    while _alive(helper) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(helper)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return not (status.exists() and status.read_text().split(")")[-1].split()[0] == "Z")  # a zombie has ended
