"""A small REST client for the CLI (`letterpress submit`): submit, poll with a progress bar, download."""
from __future__ import annotations

import os
import time
from pathlib import Path, PurePosixPath

import httpx

from common.settings import Settings

TERMINAL = ("succeeded", "failed", "canceled")


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


class Client:
    def __init__(self, base_url: str, key: str, timeout: float = 30.0):
        self.base_url = base_url
        self.http = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=timeout)

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

    def wait(self, job_id: str, *, poll_s: float = 0.5, show_progress: bool = True) -> dict:
        from tqdm import tqdm

        job = self.get(job_id)
        with tqdm(total=job["progress"]["total"], unit="step", disable=not show_progress,
                  desc=f"job {job_id[:8]}") as bar:
            while True:
                bar.set_postfix_str(job["status"] + (f" #{job['queue_position']} in queue"
                                                     if job["queue_position"] is not None else ""))
                bar.n = job["progress"]["step"]
                bar.refresh()
                if job["status"] in TERMINAL:
                    return job
                time.sleep(poll_s)
                job = self.get(job_id)

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
        """Poll until the batch ends, with a live bar: done (succeeded + failed + canceled) of total, the
        failures, and tqdm's rate and ETA."""
        from tqdm import tqdm

        batch = self.get_batch(batch_id)
        counts = batch["request_counts"]
        with tqdm(total=counts["total"], unit="img", disable=not show_progress, desc=f"batch {batch_id[:8]}",
                  dynamic_ncols=True) as bar:
            while True:
                counts = batch["request_counts"]
                bar.update(counts["succeeded"] + counts["failed"] + counts["canceled"] - bar.n)
                bar.set_postfix(status=batch["status"], ok=counts["succeeded"], failed=counts["failed"],
                                running=counts["running"], refresh=True)
                if batch["status"] in BATCH_TERMINAL:
                    return batch
                time.sleep(poll_s)
                batch = self.get_batch(batch_id)

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
