"""`letterpress worker`: one Celery worker process per visible GPU, each pinned with CUDA_VISIBLE_DEVICES, or one
CPU worker when there is no GPU. Supervises them: a crashed worker is restarted; the first SIGTERM/SIGINT is
forwarded so each drains (docs/RELIABILITY.md), and a worker stops when the launcher dies."""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time

from common.broker import QUEUES
from common.settings import get_settings

log = logging.getLogger("letterpress.worker")
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def visible_gpus() -> list[str]:
    pinned = os.environ.get("CUDA_VISIBLE_DEVICES")
    if pinned is not None:
        return [g for g in pinned.split(",") if g.strip() and g.strip() != "-1"]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def plan_workers(gpus: list[str]) -> dict[str, str | None]:
    """Worker name -> the one GPU it is pinned to (None: the single CPU worker)."""
    return {f"gpu{g}": g for g in gpus} or {"cpu": None}


def worker_command(name: str, queues: str) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--pool", "solo",
            "--concurrency", "1", "-Q", queues, "-n", f"{name}@%h", "--loglevel", "INFO",
            "--without-gossip", "--without-mingle"]


def metrics_ports(names: list[str], base: int) -> dict[str, int]:
    """Each worker process of the host its own scrape port: base, base + 1, ... (0: no metrics)."""
    return {name: base + i if base else 0 for i, name in enumerate(names)}


def spawn(name: str, gpu: str | None, queues: str, metrics_port: int) -> subprocess.Popen:
    """A worker in a session of its own, so the only stop signal it gets is the one this launcher forwards (a
    terminal's Ctrl-C or a kill of the launcher's process group does not reach it directly), and that ends with
    this launcher even if it is killed outright."""
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = gpu if gpu is not None else ""
    env["LETTERPRESS_WORKER__METRICS_PORT"] = str(metrics_port)
    log.info("starting worker %s (CUDA_VISIBLE_DEVICES=%s)", name, env["CUDA_VISIBLE_DEVICES"] or "none")
    return subprocess.Popen(worker_command(name, queues), env=env, start_new_session=True,
                            preexec_fn=_stop_with_parent)


def _stop_with_parent() -> None:
    """In the new worker, before exec: SIGTERM when the launcher dies, whatever killed it (Linux's
    PR_SET_PDEATHSIG; elsewhere nothing)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="letterpress worker")
    parser.add_argument("--queues", default=",".join(QUEUES), help="the lists to serve, in order")
    parser.add_argument("--cpu", action="store_true", help="one CPU worker even when GPUs are visible")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    gpus = [] if args.cpu else visible_gpus()
    slots = plan_workers(gpus)
    ports = metrics_ports(list(slots), get_settings().worker.metrics_port)
    procs = {name: spawn(name, gpu, args.queues, ports[name]) for name, gpu in slots.items()}
    started = {name: time.monotonic() for name in procs}
    backoff = {name: 1.0 for name in procs}  # a worker that keeps dying at start (bad model config) backs off
    stopping = False

    def forward(signum, _frame):
        # Once: a Celery worker that gets a second stop signal while handling the first can deadlock in its
        # handler (the second takes the lock of `worker_shutting_down` that the first holds) and never exits.
        nonlocal stopping
        if stopping:
            return
        stopping = True
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while True:
        for name, proc in list(procs.items()):
            code = proc.poll()
            if code is not None and not stopping:
                if time.monotonic() - started[name] > 60:
                    backoff[name] = 1.0
                log.warning("worker %s exited with %s; restarting in %.0fs", name, code, backoff[name])
                time.sleep(backoff[name])
                backoff[name] = min(backoff[name] * 2, 60.0)
                procs[name] = spawn(name, slots[name], args.queues, ports[name])
                started[name] = time.monotonic()
        if stopping and all(p.poll() is not None for p in procs.values()):
            return 0
        time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main())
