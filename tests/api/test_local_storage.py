"""With local storage, the API serves each PNG to its owner only."""
from __future__ import annotations

from fastapi.testclient import TestClient

from api.main import create_app
from common import job_states as js
from common.db import session_scope
from common.settings import settings_from_env, use_settings
from common.storage import LocalStorage, image_key, open_storage
from tests.support import make_tenant

PARAMS = {"prompt": "p", "prompt_text": "p", "preset": "V4_TURBO_12", "width": 256, "height": 256, "steps": 12,
          "mu": 0.5, "std": 1.75, "guidance_schedule": [7.0] * 12, "seed": 1, "seed_generated": False,
          "num_images": 1}


def test_local_storage_served_to_owner_only(stack_env, tmp_path):
    with use_settings(settings_from_env({**stack_env, "LETTERPRESS_STORAGE__URL": f"file://{tmp_path}"})) as cfg:
        storage = open_storage(cfg.storage)
        assert isinstance(storage, LocalStorage)
        owner, other = make_tenant(), make_tenant()
        with session_scope() as s:
            job, _ = js.create_job(s, tenant_id=owner.id, params=PARAMS, queue="test-none")
            claim = js.claim(s, job_id=job.id, worker_id="t", ttl_s=30)
            key = image_key(storage.prefix, owner.id, job.id, 0)
            storage.put(key, b"\x89PNG fake bytes")
            js.complete(s, job_id=job.id, token=claim.token,
                        images=[js.StoredImage(0, 1, key, "0" * 64, 256, 256, 15)])
        assert (tmp_path / key).read_bytes() == b"\x89PNG fake bytes"
        http = TestClient(create_app())
        got = http.get(f"/v1/jobs/{job.id}", headers={"Authorization": f"Bearer {owner.key}"}).json()
        url = got["images"][0]["url"]
        assert url.endswith(f"/v1/jobs/{job.id}/images/0")
        image = http.get(url, headers={"Authorization": f"Bearer {owner.key}"})
        assert image.status_code == 200 and image.content == b"\x89PNG fake bytes"
        assert image.headers["content-type"] == "image/png"
        assert http.get(url, headers={"Authorization": f"Bearer {other.key}"}).status_code == 404
        assert http.get(url).status_code == 401
        missing = http.get(f"/v1/jobs/{job.id}/images/3", headers={"Authorization": f"Bearer {owner.key}"})
        assert missing.status_code == 404


def test_local_storage_refuses_keys_escaping_its_root(tmp_path):
    import pytest

    from common.errors import StorageError

    storage = LocalStorage(tmp_path / "root")
    with pytest.raises(StorageError):
        storage.put("../outside.png", b"x")
    assert not (tmp_path / "outside.png").exists()
