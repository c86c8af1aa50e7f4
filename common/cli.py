"""The `letterpress` command. Processes that belong to `api` or `worker` are started as modules
(`python -m ...`), so `common` never imports them.

    letterpress up                       local stack: Postgres, Redis, API, worker(s), local storage
    letterpress submit "prompt" --wait   through the REST API, with a progress bar; saves the PNGs
    letterpress api | worker | maintenance | migrate
    letterpress keys create --name NAME
    letterpress model init-tiny PATH
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from common.settings import get_settings, reset_settings_cache


def _exec_module(module: str, *args: str) -> int:
    return subprocess.call([sys.executable, "-m", module, *args])


def cmd_api(args) -> int:
    s = get_settings()
    return _exec_module("uvicorn", "api.main:app", "--host", args.host or s.api.host, "--port",
                        str(args.port or s.api.port))


def cmd_worker(args) -> int:
    return _exec_module("worker.launcher", *(["--cpu"] if args.cpu else []), "--queues", args.queues)


def cmd_maintenance(_args) -> int:
    return _exec_module("worker.maintenance")


def cmd_migrate(args) -> int:
    from common.db import downgrade, migrate

    (downgrade if args.down else migrate)(revision=args.revision or ("base" if args.down else "head"))
    print(f"database at {args.revision or ('base' if args.down else 'head')}")
    return 0


def cmd_keys_create(args) -> int:
    from common.auth import create_api_key, get_or_create_tenant
    from common.db import session_scope

    with session_scope() as session:
        key = create_api_key(session, tenant=get_or_create_tenant(session, args.tenant or args.name), name=args.name)
    print(key)
    print("(shown once: store it now)", file=sys.stderr)
    return 0


def cmd_model_init_tiny(args) -> int:
    from common.tiny_model import build_tiny_model

    path = build_tiny_model(args.path, seed=args.seed)
    print(f"tiny random-weight Ideogram 4 written to {path}")
    return 0


def cmd_submit(args) -> int:
    from common.client import Client, api_key, api_url

    settings = get_settings()
    body: dict = {"num_images": args.num_images}
    if args.caption:
        body["caption"] = json.loads(Path(args.caption).read_text())
    else:
        body["prompt"] = args.prompt
    for field in ("preset", "width", "height", "seed", "steps"):
        if getattr(args, field) is not None:
            body[field] = getattr(args, field)
    client = Client(api_url(settings), api_key(settings))
    job = client.submit(body, idempotency_key=args.idempotency_key)
    print(f"job {job['id']} {job['status']}")
    if not args.wait:
        return 0
    job = client.wait(job["id"])
    if job["status"] != "succeeded":
        print(f"job {job['id']} {job['status']}: {json.dumps(job['error'])}", file=sys.stderr)
        return 1
    for path in client.download(job, Path(args.out)):
        print(path)
    return 0


def cmd_up(args) -> int:
    from common.devstack import run_dev_stack

    return run_dev_stack(api_port=args.port, workers=not args.no_worker)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="letterpress", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", aliases=["dev"], help="run the local stack (no Docker)")
    up.add_argument("--port", type=int, default=None)
    up.add_argument("--no-worker", action="store_true")
    up.set_defaults(func=cmd_up)

    api = sub.add_parser("api", help="run the REST API (uvicorn)")
    api.add_argument("--host")
    api.add_argument("--port", type=int)
    api.set_defaults(func=cmd_api)

    w = sub.add_parser("worker", help="one Celery worker per visible GPU (or one CPU worker)")
    w.add_argument("--cpu", action="store_true")
    w.add_argument("--queues", default="interactive,batch")
    w.set_defaults(func=cmd_worker)

    sub.add_parser("maintenance", help="requeue expired leases and lost enqueues").set_defaults(
        func=cmd_maintenance)

    m = sub.add_parser("migrate", help="alembic upgrade head (or --down)")
    m.add_argument("--down", action="store_true")
    m.add_argument("--revision")
    m.set_defaults(func=cmd_migrate)

    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="keys_command", required=True)
    kc = keys.add_parser("create", help="create an API key and print it once")
    kc.add_argument("--name", required=True)
    kc.add_argument("--tenant", help="tenant name (default: the key's name)")
    kc.set_defaults(func=cmd_keys_create)

    model = sub.add_parser("model", help="models").add_subparsers(dest="model_command", required=True)
    it = model.add_parser("init-tiny", help="build a tiny random-weight Ideogram 4 in diffusers format")
    it.add_argument("path")
    it.add_argument("--seed", type=int, default=0)
    it.set_defaults(func=cmd_model_init_tiny)

    s = sub.add_parser("submit", help="submit a job through the REST API")
    s.add_argument("prompt", nargs="?")
    s.add_argument("--caption", help="path to a structured caption JSON file instead of a prompt")
    s.add_argument("--preset")
    s.add_argument("--width", type=int)
    s.add_argument("--height", type=int)
    s.add_argument("--seed", type=int)
    s.add_argument("--steps", type=int)
    s.add_argument("--num-images", type=int, default=1)
    s.add_argument("--idempotency-key")
    s.add_argument("--wait", action="store_true", help="show progress and download the images")
    s.add_argument("--out", default="out")
    s.set_defaults(func=cmd_submit)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "command", None) == "submit" and not (args.prompt or args.caption):
        build_parser().error("submit needs a prompt or --caption FILE")
    reset_settings_cache()
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
