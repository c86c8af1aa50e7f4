"""Adapters end to end with real parts: LoRA files registered over HTTP with the real API process, jobs run by a
real Celery worker on the tiny model, images in S3. The same request, seed and adapter give the same pixels in the
worker and in this test process (another "worker"); without the adapter they differ; the recipe names the
adapter's sha256; a file lost from storage fails its job clearly and the worker keeps serving."""
from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from common.adapters import adapter_key
from common.image_files import read_recipe
from common.settings import ModelSettings, get_settings
from common.storage import shared_storage
from tests.support import ApiClient, make_tenant
from tests.tiny_loras import tiny_transformer, write_lora
from worker.attempt import spec_from_params
from worker.pipeline.adapters import LoraUse
from worker.pipeline.generation import generate
from worker.pipeline.loading import load_pipeline

JOB = {"prompt": "a poster that says BRAND", "width": 256, "height": 256, "preset": "V4_TURBO_12", "seed": 11}


def register(client, name: str, path: Path) -> dict:
    resp = client.http.post("/v1/adapters", data={"name": name},
                            files={"file": (path.name, path.read_bytes())})
    assert resp.status_code == 201, resp.text
    return resp.json()


def image_of(done: dict, index: int = 0) -> bytes:
    return httpx.get(done["images"][index]["url"]).content


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def test_adapters_change_images_reproducibly_and_the_recipe_names_them(client, worker, tiny_model, tmp_path):
    transformer = tiny_transformer(tiny_model)
    a = register(client, "look-a", write_lora(tmp_path / "a.safetensors", transformer, seed=1))
    b = register(client, "look-b", write_lora(tmp_path / "b.safetensors", transformer, rank=8,
                                             targets=("to_q", "to_v", "w1"), seed=2))
    bodies = {
        "base": JOB,
        "a": {**JOB, "loras": [{"name": "look-a"}]},
        "a-again": {**JOB, "loras": [{"name": "look-a"}]},
        "a+b": {**JOB, "loras": [{"name": "look-a"}, {"name": "look-b", "scale": 0.6}]},
        "a-half": {**JOB, "loras": [{"name": "look-a", "scale": 0.5}]},
        "base-again": JOB,
    }
    # the "again" jobs go through another tenant (with the same files under the same names): a generation after
    # other adapters were active, not the result cache (which is per tenant)
    again = ApiClient(client.base_url, make_tenant().key)
    register(again, "look-a", tmp_path / "a.safetensors")
    register(again, "look-b", tmp_path / "b.safetensors")
    ids = {label: (again if label.endswith("again") else client).submit(body).json()["id"]
           for label, body in bodies.items()}
    done = {label: (again if label.endswith("again") else client).wait(job_id) for label, job_id in ids.items()}
    assert not any(d["timings"].get("cached") for d in done.values())
    assert all(d["status"] == "succeeded" for d in done.values()), {k: d["error"] for k, d in done.items()}
    sha = {label: d["images"][0]["sha256"] for label, d in done.items()}
    assert sha["a"] == sha["a-again"] and sha["base"] == sha["base-again"]
    assert len({sha["base"], sha["a"], sha["a+b"], sha["a-half"]}) == 4

    recipe = read_recipe(image_of(done["a+b"]))
    assert recipe["loras"] == [{"name": "look-a", "sha256": a["sha256"], "scale": 1.0},
                               {"name": "look-b", "sha256": b["sha256"], "scale": 0.6}]
    assert "loras" not in read_recipe(image_of(done["base"]))

    # Another process, the same stored params and adapter file: the same pixels.
    loaded = load_pipeline(ModelSettings(id=str(tiny_model)), device="cpu")
    from common.db import session_scope
    from common.models import Job

    with session_scope() as session:
        params = session.get(Job, done["a+b"]["id"]).params
    files = {"look-a": tmp_path / "a.safetensors", "look-b": tmp_path / "b.safetensors"}
    spec = spec_from_params(params, lambda lora: files[lora["name"]])
    assert spec.loras == (LoraUse(a["sha256"], 1.0, files["look-a"]), LoraUse(b["sha256"], 0.6, files["look-b"]))
    here = np.asarray(generate(loaded, dataclasses.replace(spec, seeds=spec.seeds[:1]))[0].convert("RGB"))
    assert np.array_equal(here, pixels(image_of(done["a+b"])))


def test_a_file_lost_from_storage_fails_its_job_clearly_and_the_worker_keeps_serving(client, worker, tiny_model,
                                                                                    tenant, tmp_path):
    lost = register(client, "lost-look", write_lora(tmp_path / "c.safetensors", tiny_transformer(tiny_model), seed=5))
    storage = shared_storage(get_settings().storage)
    storage.delete(adapter_key(storage.prefix, tenant.id, lost["sha256"]))
    failed = client.wait(client.submit({**JOB, "seed": 12, "loras": [{"name": "lost-look"}]}).json()["id"])
    assert failed["status"] == "failed" and failed["attempts"] == 1, failed
    assert failed["error"]["type"] == "generation_error"
    assert "no longer in storage" in failed["error"]["message"] and "lost-look" in failed["error"]["message"]
    assert client.wait(client.submit({**JOB, "seed": 13}).json()["id"])["status"] == "succeeded"
