"""The `letterpress` command. Processes that belong to `api` or `worker` are started as modules
(`python -m ...`), so `common` never imports them.

    letterpress up                       local stack: Postgres, Redis, API, worker(s), local storage
    letterpress submit "prompt" --wait   through the REST API, with a progress bar; saves the PNGs
    letterpress api | worker | maintenance | migrate
    letterpress webhooks-worker          webhook deliveries (the `webhooks` queue; no GPU)
    letterpress webhooks secret --tenant NAME
    letterpress keys create|list|revoke|rotate
    letterpress model init-tiny PATH
    letterpress bench [--size tiny] [--e2e] ...  seconds a step, images a minute, memory, TFLOP/s of every path
    letterpress batch run prompts.jsonl --wait --out DIR    a JSONL batch with a live progress bar
    letterpress batch status|cancel|retry|download ID
    letterpress status [--json]          workers, queues and batches in progress (reads Postgres and Redis)
    letterpress recipe FILE              the recipe inside an image Letterpress wrote (PNG, WebP or JPEG)
    letterpress usage [--group-by day|batch|preset] [--from T] [--to T]   your GPU time and cost (REST)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

from common.fair_share import PRIORITIES
from common.settings import get_settings, reset_settings_cache


def _exec_module(module: str, *args: str) -> int:
    return subprocess.call([sys.executable, "-m", module, *args])


def cmd_api(args) -> int:
    from common.devstack.stack import api_argv, api_env

    settings = get_settings()
    env = api_env(settings, dict(os.environ), args.port)
    return subprocess.call(api_argv(settings, host=args.host, port=args.port), env=env)


def cmd_worker(args) -> int:
    from common.devstack.tiny_model import ensure_default_tiny_model

    ensure_default_tiny_model(get_settings(), cpu_only=args.cpu)
    queues = ["--queues", args.queues] if args.queues else []  # the launcher's default: every lane
    return _exec_module("worker.launcher", *(["--cpu"] if args.cpu else []), *queues)


def cmd_webhooks_worker(args) -> int:
    from common.broker import webhooks_worker_argv

    return subprocess.call(webhooks_worker_argv(concurrency=args.concurrency))


def cmd_webhooks_secret(args) -> int:
    from common.auth import get_or_create_tenant
    from common.db import session_scope
    from common.webhooks import outbox

    with session_scope() as session:
        tenant = get_or_create_tenant(session, args.tenant)
        if args.rotate:
            row = outbox.rotate_secret(session, tenant_id=tenant.id, previous_valid_for_s=args.previous_valid_for_s)
        else:
            row = outbox.get_secret(session, tenant_id=tenant.id)
        secret = row.secret
    print(secret)
    return 0


def cmd_secrets_reencrypt(_args) -> int:
    from common.db import session_scope
    from common.webhooks import outbox

    with session_scope() as session:
        rewritten = outbox.reencrypt_secrets(session)
    print(f"{rewritten} stored secret row(s) rewritten under the current LETTERPRESS_SECRET_KEY")
    return 0


def cmd_maintenance(_args) -> int:
    return _exec_module("worker.maintenance")


def cmd_migrate(args) -> int:
    from common.db import downgrade, migrate

    (downgrade if args.down else migrate)(revision=args.revision or ("base" if args.down else "head"))
    print(f"database at {args.revision or ('base' if args.down else 'head')}")
    return 0


def duration_arg(text: str) -> timedelta:
    """`90s`, `15m`, `12h`, `30d` (argparse type)."""
    units = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
    try:
        value, unit = float(text[:-1]), units[text[-1]]
    except (ValueError, KeyError, IndexError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90s, 15m, 12h or 30d") from None
    if value < 0:
        raise argparse.ArgumentTypeError("a duration is not negative")
    return timedelta(**{unit: value})


def scopes_arg(text: str) -> list[str]:
    from common.auth import SCOPES

    scopes = [s.strip() for s in text.split(",") if s.strip()]
    if not scopes or any(s not in SCOPES for s in scopes):
        raise argparse.ArgumentTypeError(f"--scopes takes a comma-separated subset of {', '.join(SCOPES)}")
    return scopes


def cmd_keys_create(args) -> int:
    from common.auth import create_api_key, get_or_create_tenant
    from common.db import session_scope

    with session_scope() as session:
        key = create_api_key(session, tenant=get_or_create_tenant(session, args.tenant or args.name), name=args.name,
                             expires_in=args.expires_in, scopes=args.scopes)
    print(key)
    print("(shown once: store it now)", file=sys.stderr)
    return 0


def cmd_keys_list(args) -> int:
    from common.auth import list_keys
    from common.cli.tables import table
    from common.db import session_scope

    with session_scope() as session:
        keys = list_keys(session, tenant=args.tenant)
    if args.json:
        print(json.dumps([{**vars(k), "id": str(k.id)} for k in keys], indent=2, default=str))
        return 0
    print("\n".join(table(["ID", "TENANT", "NAME", "PREFIX", "SCOPES", "CREATED", "EXPIRES", "REVOKED", "LAST USED",
                           "USABLE"],
                          [[k.id, k.tenant, k.name, k.prefix, ",".join(k.scopes), _when(k.created_at),
                            _when(k.expires_at), _when(k.revoked_at), _when(k.last_used_at),
                            "yes" if k.usable else "no"] for k in keys])))
    return 0


def _when(moment: datetime | None) -> str | None:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ") if moment else None


def _key_command(action) -> int:
    """Run `action(session)` on the keys; a key that cannot be found (or is ambiguous) is a message, not a trace."""
    from common.db import session_scope
    from common.errors import LetterpressError

    try:
        with session_scope() as session:
            return action(session)
    except LetterpressError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def cmd_keys_revoke(args) -> int:
    from common.auth import revoke_key

    def revoke(session) -> int:
        key = revoke_key(session, args.key)
        print(f"revoked {key.prefix} ({key.name}) at {_when(key.revoked_at)}: it authenticates nothing from now on")
        return 0

    return _key_command(revoke)


def cmd_keys_rotate(args) -> int:
    from common.auth import rotate_key

    def rotate(session) -> int:
        old, new = rotate_key(session, args.key, grace=args.grace)
        print(new)
        until = f"until {_when(old.expires_at)}" if old.revoked_at is None else "no longer (revoked)"
        print(f"(shown once: store it now) {old.prefix} works {until}", file=sys.stderr)
        return 0

    return _key_command(rotate)


def cmd_model_init_tiny(args) -> int:
    from common.devstack.tiny_model import build_tiny_model

    path = build_tiny_model(args.path, seed=args.seed)
    print(f"tiny random-weight Ideogram 4 written to {path}")
    return 0


def cmd_submit(args) -> int:
    from common.cli.client import Client, api_key, api_url

    settings = get_settings()
    body: dict = {"num_images": args.num_images}
    if args.caption:
        body["caption"] = json.loads(Path(args.caption).read_text())
    else:
        body["prompt"] = args.prompt
    for field in ("preset", "width", "height", "seed", "steps", "output_format", "output_quality"):
        if getattr(args, field) is not None:
            body[field] = getattr(args, field)
    if args.lora:
        body["loras"] = args.lora
    for field in ("strength", "magic_prompt", "priority"):
        if getattr(args, field) is not None:
            body[field] = getattr(args, field)
    if args.no_cache:
        body["cache"] = False
    client = Client(api_url(settings), api_key(settings))
    if args.image:
        local = Path(args.image)
        body["image"] = client.upload(local)["image"] if local.is_file() else args.image
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


def lora_argument(text: str) -> dict:
    """`--lora name` or `--lora name:0.8`."""
    name, _, scale = text.partition(":")
    try:
        return {"name": name, "scale": float(scale)} if scale else {"name": name}
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lora takes NAME or NAME:SCALE (a number), got {text!r}") from None


def _client():
    from common.cli.client import Client, api_key, api_url

    settings = get_settings()
    return Client(api_url(settings), api_key(settings))


def cmd_adapters_add(args) -> int:
    adapter = _client().add_adapter(args.name, args.source, replace=args.replace)
    print(f"adapter {adapter['name']} {adapter['sha256']} rank {adapter['rank']}, {adapter['layers']} layers "
          f"({', '.join(adapter['target_modules'])}), {adapter['size_bytes']} bytes")
    return 0


def cmd_adapters_list(args) -> int:
    from common.cli.tables import table

    adapters = _client().adapters()
    if args.json:
        print(json.dumps(adapters, indent=2))
        return 0
    rows = [[a["name"], a["sha256"][:12], a["rank"], a["layers"], a["size_bytes"], a["created_at"][:19]]
            for a in adapters]
    print("\n".join(table(["NAME", "SHA256", "RANK", "LAYERS", "BYTES", "CREATED"], rows)))
    return 0


def cmd_adapters_rm(args) -> int:
    _client().remove_adapter(args.name, purge=args.purge)
    print(f"adapter {args.name} removed{' and its file purged (if no other name uses it)' if args.purge else ''}")
    return 0


def _batch_client():
    from common.cli.client import BatchClient, api_key, api_url

    settings = get_settings()
    return BatchClient(api_url(settings), api_key(settings))


def _file_idempotency_key(path: Path, skip_invalid: bool) -> str:
    """The same file submitted again resumes its batch instead of starting a second one."""
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"file-{digest.hexdigest()}{'-skip' if skip_invalid else ''}"


def _print_batch(batch: dict) -> None:
    from common.cli.tables import human_duration
    from common.fleet import progress_rate

    c = batch["request_counts"]
    print(f"batch {batch['id']} {batch['status']}: {c['succeeded']} succeeded, {c['failed']} failed, "
          f"{c['canceled']} canceled, {c['running']} running, {c['queued']} queued of {c['total']}")
    started = batch.get("in_progress_at")
    ended = batch.get("completed_at") or batch.get("failed_at") or batch.get("cancelled_at")
    now = datetime.fromisoformat(ended) if ended else datetime.now(timezone.utc)
    finished = c["succeeded"] + c["failed"] + c["canceled"]
    rate, eta = progress_rate(finished, datetime.fromisoformat(started) if started else None, now,
                              remaining=c["queued"] + c["running"])
    usage = batch["usage"]
    print(f"  rate {f'{rate:.1f} images/min' if rate else '-'}, ETA {human_duration(eta) if not ended else 'done'}; "
          f"{usage['gpu_seconds']:.1f} GPU-seconds, {usage['estimated_cost']:.4f} {usage['currency']} so far"
          + (f" ({usage['unpriced_gpu_seconds']:.1f} s on unpriced GPUs)" if usage["unpriced_gpu_seconds"] else ""))
    if batch.get("invalid"):
        print(f"  {batch['invalid']['count']} invalid line(s) skipped", file=sys.stderr)


def cmd_batch_run(args) -> int:
    client = _batch_client()
    path = Path(args.file)
    key = None if args.no_resume else (args.idempotency_key or _file_idempotency_key(path, args.skip_invalid))
    metadata = json.loads(args.metadata) if args.metadata else None
    batch, resumed = client.create_batch(path, idempotency_key=key, skip_invalid=args.skip_invalid,
                                         metadata=metadata, priority=args.priority)
    print(f"batch {batch['id']} {'resumed' if resumed else 'submitted'}: {batch['request_counts']['total']} items")
    if not args.wait:
        return 0
    batch = client.wait_batch(batch["id"])
    _print_batch(batch)
    if args.out:
        written, kept = client.download_batch(batch["id"], args.out)
        print(f"{written} image(s) written, {kept} already there, manifest.jsonl in {args.out}")
    return 0 if batch["status"] == "completed" and not batch["request_counts"]["failed"] else 1


def cmd_batch_priority(args) -> int:
    batch = _batch_client().set_batch_priority(args.id, args.priority)
    print(f"batch {batch['id']} is {batch['priority']} priority")
    return 0


def cmd_batch_status(args) -> int:
    client = _batch_client()
    batch = client.wait_batch(args.id) if args.wait else client.get_batch(args.id)
    if args.json:
        print(json.dumps(batch, indent=2))
    else:
        _print_batch(batch)
    return 0


def cmd_batch_cancel(args) -> int:
    _print_batch(_batch_client().cancel_batch(args.id))
    return 0


def cmd_batch_retry(args) -> int:
    _print_batch(_batch_client().retry_batch(args.id))
    return 0


def cmd_batch_download(args) -> int:
    written, kept = _batch_client().download_batch(args.id, args.out)
    print(f"{written} image(s) written, {kept} already there, manifest.jsonl in {args.out}")
    return 0


def cmd_usage(args) -> int:
    from common.cli.client import Client, api_key, api_url
    from common.cli.tables import table

    settings = get_settings()
    report = Client(api_url(settings), api_key(settings)).usage(since=args.since, to=args.to, group_by=args.group_by)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    group, total = report["group_by"], report["total"]
    print(f"usage {report['from']} to {report['to']}, by {group}")
    rows = [[g[group] or "-", g["images"], g["attempts"], g["gpu_seconds"], f"{g['estimated_cost']:.4f}",
             g["unpriced_gpu_seconds"] or ""] for g in report["data"]]
    rows.append(["total", total["images"], total["attempts"], total["gpu_seconds"],
                 f"{total['estimated_cost']:.4f}", total["unpriced_gpu_seconds"] or ""])
    print("\n".join(table([group.upper(), "IMAGES", "ATTEMPTS", "GPU-SECONDS", f"COST ({total['currency']})",
                           "UNPRICED S"], rows)))
    return 0


def cmd_recipe(args) -> int:
    from common.image_files import NoRecipe, read_recipe

    try:
        body = read_recipe(Path(args.file).read_bytes())
    except (OSError, NoRecipe) as exc:
        print(f"{args.file}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(body, indent=2, ensure_ascii=False))
    return 0


def cmd_status(args) -> int:
    from common.cli.status import fleet_status, render

    status = fleet_status(get_settings())
    print(json.dumps(status, indent=2) if args.json else render(status))
    return 1 if status["errors"] else 0


def cmd_up(args) -> int:
    from common.devstack.stack import run_dev_stack

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
    w.add_argument("--queues", help="the broker lists to serve, strictly in this order (default: every lane, "
                                     "highest first, then batch)")
    w.set_defaults(func=cmd_worker)

    sub.add_parser("maintenance", help="requeue expired leases and lost enqueues").set_defaults(
        func=cmd_maintenance)

    ww = sub.add_parser("webhooks-worker", help="deliver webhooks (Celery, `webhooks` queue, thread pool)")
    ww.add_argument("--concurrency", type=int, default=8)
    ww.set_defaults(func=cmd_webhooks_worker)

    webhooks = sub.add_parser("webhooks", help="webhooks").add_subparsers(dest="webhooks_command", required=True)
    ws = webhooks.add_parser("secret", help="print the tenant's whsec_ signing secret (created on first use)")
    ws.add_argument("--tenant", required=True, help="tenant name")
    ws.add_argument("--rotate", action="store_true", help="make a new secret; the old one signs beside it a while")
    ws.add_argument("--previous-valid-for-s", type=int, default=24 * 3600)
    ws.set_defaults(func=cmd_webhooks_secret)

    # listed for --help; main() hands `bench ...` to `python -m worker.bench` before parsing
    sub.add_parser("bench", add_help=False, help="GPU benchmark of every path (`letterpress bench --help`)")

    m = sub.add_parser("migrate", help="alembic upgrade head (or --down)")
    m.add_argument("--down", action="store_true")
    m.add_argument("--revision")
    m.set_defaults(func=cmd_migrate)

    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="keys_command", required=True)
    kc = keys.add_parser("create", help="create an API key and print it once")
    kc.add_argument("--name", required=True)
    kc.add_argument("--tenant", help="tenant name (default: the key's name)")
    kc.add_argument("--expires-in", type=duration_arg, help="e.g. 90d: the key stops working then (default: never)")
    kc.add_argument("--scopes", type=scopes_arg, default=["read", "submit"],
                    help="comma-separated: read, submit, admin (default read,submit; admin: /v1/admin)")
    kc.set_defaults(func=cmd_keys_create)
    kl = keys.add_parser("list", help="every key (never the key itself): prefix, tenant, expiry, revoked, last use")
    kl.add_argument("--tenant", help="only this tenant's keys")
    kl.add_argument("--json", action="store_true")
    kl.set_defaults(func=cmd_keys_list)
    kr = keys.add_parser("revoke", help="revoke a key now (by id or prefix): the next request with it is a 401")
    kr.add_argument("key", help="the key's id or its prefix (lp_...), as `keys list` shows it")
    kr.set_defaults(func=cmd_keys_revoke)
    ko = keys.add_parser("rotate", help="a new key for the same tenant; the old one stops after --grace")
    ko.add_argument("key", help="the key's id or its prefix (lp_...)")
    ko.add_argument("--grace", type=duration_arg, default=timedelta(0),
                    help="how long the old key keeps working, e.g. 1h (default: revoked at once)")
    ko.set_defaults(func=cmd_keys_rotate)

    secrets = sub.add_parser("secrets", help="secrets the database holds").add_subparsers(
        dest="secrets_command", required=True)
    secrets.add_parser("reencrypt", help="rewrite every stored secret under the current LETTERPRESS_SECRET_KEY "
                                         "(after a rotation, or once after upgrading)").set_defaults(
        func=cmd_secrets_reencrypt)

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
    s.add_argument("--format", dest="output_format", choices=["png", "webp", "jpeg"], help="default png")
    s.add_argument("--quality", dest="output_quality", type=int, help="webp and jpeg: 1-100 (default 90)")
    s.add_argument("--lora", action="append", type=lora_argument, metavar="NAME[:SCALE]",
                   help="apply a registered adapter (repeatable), e.g. --lora brand-look:0.8")
    s.add_argument("--image", help="remix: a local image file (uploaded first), upload:<sha256>, s3://... or "
                                   "https://...")
    s.add_argument("--strength", type=float, help="remix: how far from the image, 0-1 (default 0.8)")
    s.add_argument("--magic-prompt", choices=["ON", "AUTO", "OFF"], help="rewrite the prompt into a caption")
    s.add_argument("--priority", choices=PRIORITIES, help="the job's lane (default normal)")
    s.add_argument("--no-cache", action="store_true", help="always generate, even for a repeated request")
    s.add_argument("--idempotency-key")
    s.add_argument("--wait", action="store_true", help="show progress and download the images")
    s.add_argument("--out", default="out")
    s.set_defaults(func=cmd_submit)

    adapters = sub.add_parser("adapters", help="your LoRA adapters").add_subparsers(dest="adapters_command",
                                                                                   required=True)
    aa = adapters.add_parser("add", help="register a .safetensors LoRA (a local file, or an s3:// / file:// URI "
                                         "the server reads)")
    aa.add_argument("name")
    aa.add_argument("source", help="path of a local .safetensors file, or s3://bucket/key, or file:///server/path")
    aa.add_argument("--replace", action="store_true", help="point an existing name at this file")
    aa.set_defaults(func=cmd_adapters_add)
    al = adapters.add_parser("list", help="your adapters")
    al.add_argument("--json", action="store_true")
    al.set_defaults(func=cmd_adapters_list)
    ar = adapters.add_parser("rm", help="remove a name (its file stays for stored jobs unless --purge)")
    ar.add_argument("name")
    ar.add_argument("--purge", action="store_true", help="also delete the file when no other name uses it")
    ar.set_defaults(func=cmd_adapters_rm)

    batch = sub.add_parser("batch", help="JSONL batches").add_subparsers(dest="batch_command", required=True)
    br = batch.add_parser("run", help="submit a JSONL file (one job request + custom_id a line)")
    br.add_argument("file")
    br.add_argument("--wait", action="store_true", help="follow it with a progress bar until it ends")
    br.add_argument("--out", help="with --wait: save the images and manifest.jsonl to DIR or s3://bucket/prefix")
    br.add_argument("--skip-invalid", action="store_true", help="run the valid lines, report the invalid ones")
    br.add_argument("--metadata", help="a JSON object stored on the batch")
    br.add_argument("--idempotency-key", help="default: derived from the file's bytes, so rerunning resumes")
    br.add_argument("--no-resume", action="store_true", help="always start a new batch")
    br.add_argument("--priority", choices=PRIORITIES, default="normal",
                    help="its lane: a high batch gets 4 turns to a low one's 1 (by default), neither starves")
    br.set_defaults(func=cmd_batch_run)
    bs = batch.add_parser("status", help="counts and status")
    bs.add_argument("id")
    bs.add_argument("--wait", action="store_true")
    bs.add_argument("--json", action="store_true")
    bs.set_defaults(func=cmd_batch_status)
    for name, func, text in (("cancel", cmd_batch_cancel, "cancel queued items; running ones finish"),
                             ("retry", cmd_batch_retry, "re-run only the failed items")):
        bc = batch.add_parser(name, help=text)
        bc.add_argument("id")
        bc.set_defaults(func=func)
    bp = batch.add_parser("priority", help="move a running batch to another lane")
    bp.add_argument("id")
    bp.add_argument("priority", choices=PRIORITIES)
    bp.set_defaults(func=cmd_batch_priority)
    us = sub.add_parser("usage", help="your GPU time and estimated cost (GET /v1/usage)")
    us.add_argument("--group-by", choices=["day", "batch", "preset"], default="day")
    us.add_argument("--from", dest="since", help="ISO 8601 (default: 30 days before --to)")
    us.add_argument("--to", help="ISO 8601 (default: now)")
    us.add_argument("--json", action="store_true")
    us.set_defaults(func=cmd_usage)
    rc = sub.add_parser("recipe", help="print the recipe inside an image Letterpress wrote (PNG, WebP or JPEG)")
    rc.add_argument("file")
    rc.set_defaults(func=cmd_recipe)
    st = sub.add_parser("status", help="workers, queues and batches in progress (an operator's view: all tenants)")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)
    bd = batch.add_parser("download", help="save the images and manifest.jsonl (skips files already there)")
    bd.add_argument("id")
    bd.add_argument("--out", required=True, help="DIR or s3://bucket/prefix")
    bd.set_defaults(func=cmd_batch_download)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # every argument, options included, belongs to worker.bench
        return _exec_module("worker.bench", *argv[1:])
    args = build_parser().parse_args(argv)
    if getattr(args, "command", None) == "submit" and not (args.prompt or args.caption):
        build_parser().error("submit needs a prompt or --caption FILE")
    reset_settings_cache()
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
