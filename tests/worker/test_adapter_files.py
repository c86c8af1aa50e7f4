"""The worker's adapter file cache (worker/adapter_files.py) over local storage: fetched once, verified by
sha256, least recently used evicted past the byte bound; a missing or corrupted stored file is a clear
AdapterError, and nothing unverified is left in the cache."""
from __future__ import annotations

import hashlib
import os
import time
import uuid

import pytest

from common.adapters import adapter_key
from common.storage import LocalStorage
from worker.adapter_files import AdapterFiles
from worker.pipeline.adapters import AdapterError

TENANT = uuid.UUID(int=7)


def store(storage: LocalStorage, data: bytes) -> str:
    sha = hashlib.sha256(data).hexdigest()
    storage.put(adapter_key(storage.prefix, TENANT, sha), data)
    return sha


@pytest.fixture()
def storage(tmp_path):
    return LocalStorage(tmp_path / "store", prefix="images")


def test_fetched_once_then_served_from_disk(storage, tmp_path):
    files = AdapterFiles(storage, tmp_path / "cache", max_bytes=10_000)
    sha = store(storage, b"a" * 100)
    first = files.path(tenant_id=TENANT, sha256=sha, name="a")
    storage.delete(adapter_key(storage.prefix, TENANT, sha))  # no second fetch needed
    assert files.path(tenant_id=TENANT, sha256=sha, name="a") == first
    assert first.read_bytes() == b"a" * 100 and files.fetches == 1


def test_least_recently_used_files_are_evicted_past_the_bound(storage, tmp_path):
    files = AdapterFiles(storage, tmp_path / "cache", max_bytes=250)
    shas = [store(storage, bytes([65 + i]) * 100) for i in range(3)]
    a = files.path(tenant_id=TENANT, sha256=shas[0], name="a")
    b = files.path(tenant_id=TENANT, sha256=shas[1], name="b")
    os.utime(b, (time.time() - 60, time.time() - 60))  # b used long ago, a just now
    files.path(tenant_id=TENANT, sha256=shas[0], name="a")
    files.path(tenant_id=TENANT, sha256=shas[2], name="c")
    assert a.exists() and not b.exists()
    assert sum(p.stat().st_size for p in (tmp_path / "cache").iterdir()) <= 250


def test_missing_and_corrupted_files_fail_clearly_and_leave_nothing(storage, tmp_path):
    files = AdapterFiles(storage, tmp_path / "cache", max_bytes=10_000)
    with pytest.raises(AdapterError, match="no longer in storage"):
        files.path(tenant_id=TENANT, sha256="0" * 64, name="gone")
    sha = hashlib.sha256(b"the real bytes").hexdigest()
    storage.put(adapter_key(storage.prefix, TENANT, sha), b"other bytes")
    with pytest.raises(AdapterError, match="does not match its sha256"):
        files.path(tenant_id=TENANT, sha256=sha, name="swapped")
    assert list((tmp_path / "cache").iterdir()) == []
