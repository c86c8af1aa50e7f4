"""The `letterpress` CLI as a user runs it: keys create, submit --wait against the real stack."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from PIL import Image

from tests.support import ApiClient


def letterpress(*args: str, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "common.cli.main", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def test_keys_create_prints_a_working_key_once(stack_env, api_url):
    result = letterpress("keys", "create", "--name", "cli-test", env=stack_env)  # the stack's database
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip()
    assert key.startswith("lp_")
    assert "shown once" in result.stderr
    assert ApiClient(api_url, key).http.get("/v1/jobs").status_code == 200


def test_submit_wait_downloads_the_png(stack_env, api_url, worker, tenant, tmp_path):
    result = letterpress("submit", "a poster that says HELLO", "--preset", "V4_TURBO_12", "--width", "256",
                         "--height", "256", "--seed", "3", "--wait", "--out", str(tmp_path),
                         env={"LETTERPRESS_API_URL": api_url, "LETTERPRESS_API_KEY": tenant.key})
    assert result.returncode == 0, result.stderr
    paths = [line for line in result.stdout.splitlines() if line.endswith(".png")]
    assert len(paths) == 1
    with Image.open(paths[0]) as im:
        assert im.size == (256, 256) and "letterpress" in im.text


def test_submit_webp_then_read_its_recipe_back(stack_env, api_url, worker, tenant, tmp_path):
    result = letterpress("submit", "a poster that says WEBP", "--preset", "V4_TURBO_12", "--width", "256",
                         "--height", "256", "--seed", "4", "--format", "webp", "--quality", "60", "--wait", "--out",
                         str(tmp_path), env={"LETTERPRESS_API_URL": api_url, "LETTERPRESS_API_KEY": tenant.key})
    assert result.returncode == 0, result.stderr
    (path,) = [line for line in result.stdout.splitlines() if line.endswith(".webp")]
    recipe = letterpress("recipe", path)
    assert recipe.returncode == 0, recipe.stderr
    body = json.loads(recipe.stdout)
    assert body["prompt"] == "a poster that says WEBP" and body["seed"] == 4 and body["output_quality"] == 60
    (tmp_path / "notes.txt").write_text("not an image")
    refused = letterpress("recipe", str(tmp_path / "notes.txt"))
    assert refused.returncode == 1 and "not an image" in refused.stderr


def test_submit_remixes_a_local_image_with_a_priority(stack_env, api_url, worker, tenant, tmp_path):
    source = tmp_path / "sketch.png"
    Image.new("RGB", (96, 64), (200, 40, 40)).save(source)
    result = letterpress("submit", "a poster that says REMIX", "--preset", "V4_TURBO_12", "--width", "256",
                         "--height", "256", "--seed", "5", "--steps", "4", "--image", str(source), "--strength", "0.5",
                         "--priority", "high", "--no-cache", "--wait", "--out", str(tmp_path / "out"),
                         env={"LETTERPRESS_API_URL": api_url, "LETTERPRESS_API_KEY": tenant.key})
    assert result.returncode == 0, result.stderr
    (path,) = [line for line in result.stdout.splitlines() if line.endswith(".png")]
    recipe = json.loads(letterpress("recipe", path).stdout)
    assert recipe["strength"] == 0.5 and len(recipe["image_sha256"]) == 64


def test_submit_reports_validation_errors(stack_env, api_url, tenant):
    result = letterpress("submit", "x", "--width", "1000",
                         env={"LETTERPRESS_API_URL": api_url, "LETTERPRESS_API_KEY": tenant.key})
    assert result.returncode != 0
    assert "width" in result.stderr and "422" in result.stderr


def test_model_init_tiny_builds_a_loadable_checkpoint(tmp_path):
    result = letterpress("model", "init-tiny", str(tmp_path / "tiny"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "tiny" / "model_index.json").is_file()


def test_adapters_add_list_submit_with_a_lora_and_remove(stack_env, api_url, worker, tenant, tiny_model, tmp_path):
    from tests.tiny_loras import tiny_transformer, write_lora

    env = {"LETTERPRESS_API_URL": api_url, "LETTERPRESS_API_KEY": tenant.key}
    path = write_lora(tmp_path / "brand.safetensors", tiny_transformer(tiny_model))
    added = letterpress("adapters", "add", "brand-look", str(path), env=env)
    assert added.returncode == 0, added.stderr
    assert "rank 4" in added.stdout
    listed = json.loads(letterpress("adapters", "list", "--json", env=env).stdout)
    assert [a["name"] for a in listed] == ["brand-look"]
    result = letterpress("submit", "a poster that says BRAND", "--preset", "V4_TURBO_12", "--width", "256",
                         "--height", "256", "--seed", "5", "--lora", "brand-look:0.8", "--wait", "--out",
                         str(tmp_path), env=env)
    assert result.returncode == 0, result.stderr
    (png,) = [line for line in result.stdout.splitlines() if line.endswith(".png")]
    recipe = json.loads(letterpress("recipe", png).stdout)
    assert recipe["loras"] == [{"name": "brand-look", "sha256": listed[0]["sha256"], "scale": 0.8}]
    bad = letterpress("submit", "x", "--lora", "brand-look:strong", env=env)
    assert bad.returncode != 0 and "NAME:SCALE" in bad.stderr
    unknown = letterpress("submit", "x", "--lora", "not-mine", env=env)
    assert unknown.returncode != 0 and "loras.0.name" in unknown.stderr
    removed = letterpress("adapters", "rm", "brand-look", "--purge", env=env)
    assert removed.returncode == 0, removed.stderr
    assert json.loads(letterpress("adapters", "list", "--json", env=env).stdout) == []
