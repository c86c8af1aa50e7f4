"""A small REST client for the CLI (`letterpress submit`): submit, poll with a progress bar, download."""
from __future__ import annotations

import os
import time
from pathlib import Path

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
            path = out_dir / f"{job['id']}_{image['index']}.png"
            path.write_bytes(resp.content)
            paths.append(path)
        return paths
