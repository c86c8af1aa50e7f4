"""The worker's disk cache of adapter files: fetched from storage once, verified by sha256, evicted least recently
used past `adapters.cache_bytes`.

Files are named by their sha256 (`{cache_dir}/{sha256}.safetensors`), written to a temporary name and renamed
into place only once their hash matched, so several workers of one host can share the directory and a crash
never leaves a file that passes for verified. A file missing from storage (an adapter deleted with `purge`) or
whose bytes do not match its sha256 fails its job with `AdapterError`; a storage outage raises StorageError,
which the attempt retries.
"""
from __future__ import annotations

import hashlib
import logging
import os
import uuid
from pathlib import Path

from common.adapters import adapter_key
from common.errors import NotFound
from common.storage import COPY_CHUNK, Storage
from worker.pipeline.adapters import AdapterError

log = logging.getLogger(__name__)
SUFFIX = ".safetensors"


class AdapterFiles:
    def __init__(self, storage: Storage, directory: Path, max_bytes: int):
        self.storage = storage
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.fetches = 0

    def path(self, *, tenant_id: uuid.UUID, sha256: str, name: str) -> Path:
        """The verified local file of the tenant's adapter `sha256`, fetched if this machine has not got it."""
        path = self.directory / f"{sha256}{SUFFIX}"
        if path.is_file():
            os.utime(path)  # most recently used
            return path
        self.directory.mkdir(parents=True, exist_ok=True)
        partial = self.directory / f".{sha256}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part"
        try:
            try:
                self.storage.get_file(adapter_key(self.storage.prefix, tenant_id, sha256), partial)
            except NotFound:
                raise AdapterError(f"adapter {name!r} (sha256 {sha256[:12]}...) is no longer in storage: it was "
                                   "deleted with purge=true; register it again to run this job") from None
            if _sha256(partial) != sha256:
                raise AdapterError(f"adapter {name!r}: the stored file does not match its sha256 {sha256[:12]}... "
                                   "(corrupted in storage); register it again")
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        self.fetches += 1
        self._evict(keep=path)
        return path

    def _evict(self, keep: Path) -> None:
        files = []
        for entry in self.directory.glob(f"*{SUFFIX}"):
            try:
                stat = entry.stat()
            except FileNotFoundError:  # another worker of this host evicted it just now
                continue
            files.append((stat.st_mtime, stat.st_size, entry))
        total = sum(size for _, size, _ in files)
        for _, size, entry in sorted(files):
            if total <= self.max_bytes:
                break
            if entry != keep:
                entry.unlink(missing_ok=True)
                total -= size
                log.info("adapter cache: evicted %s (%d bytes)", entry.name, size)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(COPY_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
