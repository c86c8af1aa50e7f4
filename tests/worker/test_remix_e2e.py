"""Remix through a real worker (tiny model): an uploaded image and a strength; the job runs only the schedule's last
steps; the image's recipe names the input by sha256 with the strength; the same request again (cache off) gives
the same bytes; an output of the platform remixes again by {job_id, index}."""
from __future__ import annotations

import io

import httpx
import numpy as np
from PIL import Image

from common.image_files import read_recipe, sha256_hex

JOB = {"prompt": "a poster that says REMIX", "width": 256, "height": 256, "preset": "V4_TURBO_12", "seed": 77,
       "steps": 4, "strength": 0.5}


def png() -> bytes:
    pixels = np.random.default_rng(5).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def test_a_remix_runs_its_last_steps_records_its_input_and_reproduces(client, worker):
    uploaded = client.http.post("/v1/uploads", files={"file": ("in.png", png(), "image/png")})
    assert uploaded.status_code == 201, uploaded.text
    image = uploaded.json()
    first = client.wait(client.submit({**JOB, "image": image["image"]}).json()["id"])
    assert first["status"] == "succeeded", first
    assert first["progress"] == {"step": 2, "total": 2, "fraction": 1.0}  # 4 steps x 0.5
    data = httpx.get(first["images"][0]["url"]).content
    assert sha256_hex(data) == first["images"][0]["sha256"]
    recipe = read_recipe(data)
    assert recipe["image_sha256"] == image["sha256"] == sha256_hex(png()) and recipe["strength"] == 0.5

    again = client.wait(client.submit({**JOB, "image": image["image"], "cache": False}).json()["id"])
    assert again["status"] == "succeeded" and "cached" not in again["timings"], again  # generated, not copied
    assert again["images"][0]["sha256"] == first["images"][0]["sha256"]  # same input, strength, seed: same bytes

    other_strength = client.wait(client.submit({**JOB, "image": image["image"], "strength": 1.0}).json()["id"])
    assert other_strength["status"] == "succeeded"
    assert other_strength["images"][0]["sha256"] != first["images"][0]["sha256"]

    chained = client.wait(client.submit({**JOB, "image": {"job_id": first["id"], "index": 0}}).json()["id"])
    assert chained["status"] == "succeeded", chained
    assert read_recipe(httpx.get(chained["images"][0]["url"]).content)["image_sha256"] == first["images"][0]["sha256"]
