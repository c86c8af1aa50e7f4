"""A small REST client for the CLI (`letterpress submit`): submit, follow with a progress bar, download.

`--wait` follows the object's Server-Sent Events (`GET /v1/jobs/{id}/events`, `GET /v1/batches/{id}/events`,
api/event_streams.py): each `progress` event moves the bar, `done` carries the finished object. The stream is
reconnected with `Last-Event-ID` when the server ends it with `timeout` or the connection drops (`Client.follow`);
a server without the route (404 or 405: older than the streams), or with no room for another stream (429), is
polled as before."""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import httpx

from common.settings import Settings

TERMINAL = ("succeeded", "failed", "canceled")
STREAM_READ_TIMEOUT_S = 60.0  # the server sends at least a keep-alive comment every 15 s (events_heartbeat_s)
STREAM_RETRIES = 5            # dropped connections in a row (no event in between) before giving up
POLL_INSTEAD = (404, 405, 429)  # the events route's answers that mean "poll": no such route, or no room for a stream


def api_url(settings: Settings) -> str:
    return os.environ.get("LETTERPRESS_API_URL", f"http://{settings.api.host}:{settings.api.port}").rstrip("/")


def api_key(settings: Settings) -> str:
    key = os.environ.get("LETTERPRESS_API_KEY")
    if key:
        return key
    dev_key = settings.home / "dev_api_key"
    if dev_key.is_file():
        return dev_key.read_text().strip()
    raise SystemExit("no API key: set LETTERPRESS_API_KEY, or run `letterpress up` (it writes a dev key) "
                     "or `letterpress keys create --name NAME`")


def sse_events(lines: Iterable[str]) -> Iterator[tuple[str, str | None, Any]]:
    """(event, id, data decoded from JSON) of each event of a Server-Sent Events stream's lines; comments
    (`: keep-alive`) are skipped."""
    event, event_id, data = None, None, []
    for line in lines:
        if line == "":
            if event is not None or data:
                yield event or "message", event_id, json.loads("\n".join(data)) if data else None
            event, event_id, data = None, None, []
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                event = value
            elif name == "id":
                event_id = value
            elif name == "data":
                data.append(value)


class Client:
    def __init__(self, base_url: str, key: str, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None):
        self.base_url = base_url
        self.http = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=timeout,
                                 transport=transport)

    def _check(self, resp: httpx.Response) -> dict:
        if resp.status_code >= 400:
            try:
                err = resp.json()["error"]
                where = f" ({err['field']})" if err.get("field") else ""
                raise SystemExit(f"error {resp.status_code}: {err['message']}{where}")
            except (ValueError, KeyError):
                raise SystemExit(f"error {resp.status_code}: {resp.text[:500]}") from None
        return resp.json()

    def submit(self, body: dict, idempotency_key: str | None = None) -> dict:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._check(self.http.post("/v1/jobs", json=body, headers=headers))

    def get(self, job_id: str) -> dict:
        return self._check(self.http.get(f"/v1/jobs/{job_id}"))

    def upload(self, path: Path) -> dict:
        """Upload an image to remix from (POST /v1/uploads); its `image` is what a job's `image` takes."""
        with path.open("rb") as f:
            return self._check(self.http.post("/v1/uploads", files={"file": (path.name, f)}))

    def add_adapter(self, name: str, source: str, *, replace: bool = False) -> dict:
        """Register a LoRA: a local .safetensors file is uploaded; an s3:// or file:// URI is read by the server."""
        fields = {"name": name, "replace": "true" if replace else "false"}
        if source.startswith(("s3://", "file://")):
            return self._check(self.http.post("/v1/adapters", json={"name": name, "uri": source, "replace": replace}))
        path = Path(source)
        with path.open("rb") as f:  # streamed by httpx, never read whole
            return self._check(self.http.post("/v1/adapters", data=fields, files={"file": (path.name, f)},
                                              timeout=None))

    def adapters(self) -> list[dict]:
        found, cursor = [], None
        while True:
            page = self._check(self.http.get("/v1/adapters", params={"limit": 200, **({"cursor": cursor} if cursor
                                                                                       else {})}))
            found += page["data"]
            if not page["has_more"]:
                return found
            cursor = page["next_cursor"]

    def remove_adapter(self, name: str, *, purge: bool = False) -> None:
        resp = self.http.delete(f"/v1/adapters/{name}", params={"purge": "true" if purge else "false"})
        if resp.status_code != 204:
            self._check(resp)

    def usage(self, **params: str | None) -> dict:
        """GET /v1/usage (`from` is a keyword: pass it as `since`)."""
        query = {"from": params.pop("since", None), **params}
        return self._check(self.http.get("/v1/usage", params={k: v for k, v in query.items() if v is not None}))

    def follow(self, path: str, on_progress: Callable[[dict], None]) -> dict | None:
        """Follow the Server-Sent Events at `path` until `done`, and return its data (the finished object);
        `on_progress` gets each `progress` event's data. After a `timeout` event, or a connection that drops,
        it reconnects with `Last-Event-ID` (nothing is seen twice); STREAM_RETRIES drops in a row without an
        event in between end the command. None when the server answers POLL_INSTEAD: poll instead."""
        last, failures = None, 0
        timeout = httpx.Timeout(self.http.timeout.connect, read=STREAM_READ_TIMEOUT_S)
        while True:
            ended = None  # the last event of this connection
            try:
                with self.http.stream("GET", path, headers={"Last-Event-ID": last} if last else {},
                                      timeout=timeout) as resp:
                    if resp.status_code in POLL_INSTEAD:
                        return None
                    if resp.status_code >= 400:
                        resp.read()
                        self._check(resp)
                    for ended, event_id, data in sse_events(resp.iter_lines()):
                        failures, last = 0, event_id or last
                        if ended == "done":
                            return data
                        if ended == "progress":
                            on_progress(data)
                error = "the server ended the stream"
            except httpx.TransportError as exc:  # dropped, reset, or silent past the read timeout
                error = f"{type(exc).__name__}: {exc}"
            if ended == "timeout":
                continue  # the stream reached its longest: reconnect at once
            failures += 1
            if failures > STREAM_RETRIES:
                raise SystemExit(f"lost the event stream {path} ({error})")
            time.sleep(min(0.5 * 2 ** (failures - 1), 8.0))

    def wait(self, job_id: str, *, poll_s: float = 0.5, show_progress: bool = True) -> dict:
        """Until the job ends, with a live bar: steps done of its total, its status and queue position. Follows
        the job's event stream; polls a server without one."""
        from tqdm import tqdm

        job = self.get(job_id)
        with tqdm(total=job["progress"]["total"], unit="step", disable=not show_progress,
                  desc=f"job {job_id[:8]}") as bar:
            def show(status: str, step: int, queue_position: int | None) -> None:
                bar.set_postfix_str(status + (f" #{queue_position} in queue" if queue_position is not None else ""))
                bar.n = step
                bar.refresh()

            show(job["status"], job["progress"]["step"], job["queue_position"])
            if job["status"] in TERMINAL:
                return job
            done = self.follow(f"/v1/jobs/{job_id}/events",
                               lambda p: show(p["status"], p["step"], p["queue_position"]))
            while done is None:  # an older server: poll
                time.sleep(poll_s)
                job = self.get(job_id)
                show(job["status"], job["progress"]["step"], job["queue_position"])
                if job["status"] in TERMINAL:
                    return job
            show(done["status"], done["progress"]["step"], done["queue_position"])
            return done

    def download(self, job: dict, out_dir: Path) -> list[Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for image in job["images"]:
            url = image["url"]
            # the API's own URLs need the key; presigned storage URLs must not get it
            resp = self.http.get(url) if url.startswith(self.base_url) else httpx.get(url, timeout=60)
            resp.raise_for_status()
            path = out_dir / f"{job['id']}_{image['index']}.{_extension(image.get('key'))}"
            path.write_bytes(resp.content)
            paths.append(path)
        return paths


# ------------------------------------------------------------------------------------------------- batches

BATCH_TERMINAL = ("completed", "failed", "cancelled")


def _extension(key: str | None) -> str:
    """The stored image's extension (png, webp, jpg), from its storage key."""
    suffix = PurePosixPath(key or "").suffix.lstrip(".")
    return suffix or "png"


def _file_name(custom_id: str, index: int, num_images: int, extension: str = "png") -> str:
    """A file name from the caller's custom_id; ids that are not already safe get a short hash (no collisions)."""
    import hashlib
    import re

    safe = re.sub(r"[^A-Za-z0-9._-]", "_", custom_id)[:180] or "_"
    if safe != custom_id or safe.startswith("."):
        safe = f"{safe}-{hashlib.sha1(custom_id.encode()).hexdigest()[:8]}"
    return f"{safe}.{extension}" if num_images <= 1 else f"{safe}_{index}.{extension}"


class _Sink:
    """Where `batch download` writes: a local directory or `s3://bucket/prefix` (boto3's default credentials and
    AWS_ENDPOINT_URL). Files already there with the right sha256 are skipped, so a download resumes."""

    def __init__(self, out: str):
        from urllib.parse import urlparse

        parsed = urlparse(out)
        self.s3 = None
        if parsed.scheme == "s3":
            import boto3

            self.s3, self.bucket, self.prefix = boto3.client("s3"), parsed.netloc, parsed.path.strip("/")
        else:
            self.root = Path(out)
            self.root.mkdir(parents=True, exist_ok=True)

    def has(self, name: str, sha256: str | None) -> bool:
        import hashlib

        if self.s3 is not None:
            return False
        path = self.root / name
        return sha256 is not None and path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == sha256

    def write(self, name: str, data: bytes) -> str:
        if self.s3 is not None:
            key = f"{self.prefix}/{name}" if self.prefix else name
            self.s3.put_object(Bucket=self.bucket, Key=key, Body=data)
            return f"s3://{self.bucket}/{key}"
        path = self.root / name
        tmp = path.with_name(f".{path.name}.part")
        tmp.write_bytes(data)
        tmp.replace(path)
        return str(path)


class BatchClient(Client):
    """`letterpress batch ...`: submit a JSONL file, follow it with a progress bar, cancel, retry, download."""

    def _check_batch(self, resp: httpx.Response) -> dict:
        if resp.status_code == 422:
            err = resp.json().get("error", {})
            lines = [f"  line {e['line']}: {e.get('field') or ''}{': ' if e.get('field') else ''}{e['message']}"
                     for e in err.get("errors", [])[:20]]
            more = err.get("invalid_count", 0) - len(lines)
            raise SystemExit("\n".join([f"error 422: {err.get('message')}", *lines]
                                       + ([f"  ... and {more} more"] if more > 0 else [])))
        return self._check(resp)

    def create_batch(self, path: Path, *, idempotency_key: str | None = None, skip_invalid: bool = False,
                     metadata: dict | None = None, priority: str = "normal") -> tuple[dict, bool]:
        """Upload a JSONL file. Returns (batch, created): created is False when the Idempotency-Key matched an
        earlier submission of the same file (a resume)."""
        import json

        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        data = {"skip_invalid": "true" if skip_invalid else "false", "priority": priority}
        if metadata is not None:
            data["metadata"] = json.dumps(metadata)
        with path.open("rb") as f:
            resp = self.http.post("/v1/batches", files={"file": (path.name, f, "application/x-ndjson")}, data=data,
                                  headers=headers, timeout=max(self.http.timeout.read or 30, 600))
        return self._check_batch(resp), resp.status_code == 200

    def get_batch(self, batch_id: str) -> dict:
        return self._check(self.http.get(f"/v1/batches/{batch_id}"))

    def set_batch_priority(self, batch_id: str, priority: str) -> dict:
        return self._check(self.http.post(f"/v1/batches/{batch_id}/priority", json={"priority": priority}))

    def cancel_batch(self, batch_id: str) -> dict:
        return self._check(self.http.post(f"/v1/batches/{batch_id}/cancel"))

    def retry_batch(self, batch_id: str) -> dict:
        return self._check(self.http.post(f"/v1/batches/{batch_id}/retry"))

    def batch_results(self, batch_id: str):
        """The manifest, one dict a line, streamed."""
        import json

        with self.http.stream("GET", f"/v1/batches/{batch_id}/results", timeout=None) as resp:
            if resp.status_code >= 400:
                resp.read()
                self._check(resp)
            for line in resp.iter_lines():
                if line.strip():
                    yield json.loads(line)

    def wait_batch(self, batch_id: str, *, poll_s: float = 1.0, show_progress: bool = True) -> dict:
        """Until the batch ends, with a live bar: done (succeeded + failed + canceled) of total, the failures,
        and tqdm's rate and ETA. Follows the batch's event stream; polls a server without one."""
        from tqdm import tqdm

        batch = self.get_batch(batch_id)
        with tqdm(total=batch["request_counts"]["total"], unit="img", disable=not show_progress,
                  desc=f"batch {batch_id[:8]}", dynamic_ncols=True) as bar:
            def show(progress: dict) -> None:
                counts = progress["request_counts"]
                bar.update(counts["succeeded"] + counts["failed"] + counts["canceled"] - bar.n)
                bar.set_postfix(status=progress["status"], ok=counts["succeeded"], failed=counts["failed"],
                                running=counts["running"], refresh=True)

            show(batch)
            if batch["status"] in BATCH_TERMINAL:
                return batch
            done = self.follow(f"/v1/batches/{batch_id}/events", show)
            while done is None:  # an older server: poll
                time.sleep(poll_s)
                batch = self.get_batch(batch_id)
                show(batch)
                if batch["status"] in BATCH_TERMINAL:
                    return batch
            show(done)
            return done

    def download_batch(self, batch_id: str, out: str, *, workers: int = 8,
                       show_progress: bool = True) -> tuple[int, int]:
        """Save every succeeded image as `{custom_id}.png` (`{custom_id}_{i}.png` for several; `.webp` or `.jpg` for
        those formats) and the manifest
        (with each line's `file`) as manifest.jsonl. Returns (images written, images already there)."""
        import json
        from concurrent.futures import ThreadPoolExecutor

        from tqdm import tqdm

        sink = _Sink(out)
        manifest = list(self.batch_results(batch_id))
        todo = []
        for line in manifest:
            images = line.get("images") or ([{"index": 0, "url": line["url"], "sha256": line["sha256"],
                                              "key": line["key"]}] if line.get("key") else [])
            line["files"] = []
            for image in images:
                name = _file_name(line["custom_id"], image["index"], len(images), _extension(image.get("key")))
                line["files"].append(name)
                todo.append((name, image["url"], image["sha256"]))

        def fetch(item) -> bool:
            name, url, sha = item
            if sink.has(name, sha):
                return False
            resp = self.http.get(url) if url.startswith(self.base_url) else httpx.get(url, timeout=120)
            resp.raise_for_status()
            sink.write(name, resp.content)
            return True

        written = 0
        with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(total=len(todo), unit="img",
                                                                    disable=not show_progress,
                                                                    desc="download") as bar:
            for fresh in pool.map(fetch, todo):
                written += fresh
                bar.update(1)
        sink.write("manifest.jsonl", "".join(json.dumps({k: v for k, v in line.items() if k != "url"}) + "\n"
                                             for line in manifest).encode())
        return written, len(todo) - written
