"""Object storage for images and manifests: S3-compatible (AWS, MinIO, R2 via boto3 `endpoint_url`) or a local
directory. Keys are deterministic (`{prefix}/{tenant}/{job_id}/{index}.png`), so a re-run overwrites with the
same bytes. Writes are retried with exponential backoff; a put returns only once the object is durable."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Protocol, TypeVar
from urllib.parse import urlparse

from common.errors import NotFound, StorageError
from common.settings import StorageSettings

log = logging.getLogger(__name__)
T = TypeVar("T")
COPY_CHUNK = 1024 * 1024


class Storage(Protocol):
    prefix: str

    def put(self, key: str, data: bytes, content_type: str = "image/png") -> None: ...
    def put_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> None: ...
    def get(self, key: str) -> bytes: ...
    def get_file(self, key: str, path: Path) -> None: ...
    def delete(self, key: str) -> None: ...
    def copy(self, source_key: str, key: str) -> None: ...
    def exists(self, key: str) -> bool: ...
    def presigned_url(self, key: str) -> str | None: ...
    def local_path(self, key: str) -> Path | None: ...


def image_key(prefix: str, tenant_id: object, job_id: object, index: int, extension: str = "png") -> str:
    """`{prefix}/{tenant}/{job}/{index}.{png|webp|jpg}` (common.image_files.FORMATS names the extensions)."""
    return "/".join(p for p in (prefix.strip("/"), str(tenant_id), str(job_id), f"{index}.{extension}") if p)


def with_retries(op: Callable[[], T], *, what: str, attempts: int, base_delay_s: float = 0.2) -> T:
    """Run a storage call, retrying transient errors with exponential backoff; raise StorageError at the end."""
    for attempt in range(1, attempts + 1):
        try:
            return op()
        except (NotFound, FileNotFoundError):
            raise
        except Exception as exc:  # noqa: BLE001 - any client/network error is worth a retry
            if attempt == attempts:
                raise StorageError(f"{what} failed after {attempts} attempts: {exc}") from exc
            delay = base_delay_s * 2 ** (attempt - 1)
            log.warning("%s failed (%s); retry %d/%d in %.1fs", what, exc, attempt, attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


class LocalStorage:
    """A directory. Writes go to a temporary file, fsync, then rename: readers never see half a PNG."""

    def __init__(self, root: Path, prefix: str = "", max_retries: int = 3):
        self.root = root.resolve()
        self.prefix = prefix
        self.max_retries = max_retries

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise StorageError(f"key escapes the storage root: {key}")
        return path

    def put(self, key: str, data: bytes, content_type: str = "image/png") -> None:
        def write() -> None:
            path = self._path(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        with_retries(write, what=f"write {key}", attempts=self.max_retries)

    def put_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> None:
        """A large file, streamed (never held in memory), with the same temporary-file-and-rename as put."""
        def write() -> None:
            target = self._path(key)
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
                shutil.copyfileobj(src, out, COPY_CHUNK)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
        with_retries(write, what=f"write {key}", attempts=self.max_retries)

    def get(self, key: str) -> bytes:
        path = self._path(key)
        if not path.is_file():
            raise NotFound(f"object {key} not found")
        return path.read_bytes()

    def get_file(self, key: str, path: Path) -> None:
        source = self._path(key)
        if not source.is_file():
            raise NotFound(f"object {key} not found")
        shutil.copyfile(source, path)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def copy(self, source_key: str, key: str) -> None:
        source = self._path(source_key)
        if not source.is_file():
            raise NotFound(f"object {source_key} not found")
        self.put_file(key, source)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def presigned_url(self, key: str) -> str | None:
        return None  # the API serves local files to their owner

    def local_path(self, key: str) -> Path | None:
        return self._path(key)


class S3Storage:
    def __init__(self, bucket: str, prefix: str, settings: StorageSettings):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix
        self.settings = settings
        secret = settings.secret_access_key.get_secret_value() if settings.secret_access_key else None
        self.client = boto3.client(
            "s3", endpoint_url=settings.endpoint_url, region_name=settings.region,
            aws_access_key_id=settings.access_key_id, aws_secret_access_key=secret,
            config=Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=30,
                          signature_version="s3v4"),
        )

    def put(self, key: str, data: bytes, content_type: str = "image/png") -> None:
        with_retries(lambda: self.client.put_object(Bucket=self.bucket, Key=key, Body=data,
                                                    ContentType=content_type),
                     what=f"put s3://{self.bucket}/{key}", attempts=self.settings.max_retries)

    def put_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> None:
        """A large file, streamed in parts (boto3's managed multipart upload)."""
        with_retries(lambda: self.client.upload_file(str(path), self.bucket, key,
                                                     ExtraArgs={"ContentType": content_type}),
                     what=f"upload s3://{self.bucket}/{key}", attempts=self.settings.max_retries)

    def get_file(self, key: str, path: Path) -> None:
        from botocore.exceptions import ClientError

        def download() -> None:
            try:
                self.client.download_file(self.bucket, key, str(path))
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    raise NotFound(f"object {key} not found") from None
                raise
        with_retries(download, what=f"download s3://{self.bucket}/{key}", attempts=self.settings.max_retries)

    def delete(self, key: str) -> None:
        with_retries(lambda: self.client.delete_object(Bucket=self.bucket, Key=key),
                     what=f"delete s3://{self.bucket}/{key}", attempts=self.settings.max_retries)

    def copy(self, source_key: str, key: str) -> None:
        """A server-side copy within the bucket (the bytes never pass through this process)."""
        with_retries(lambda: self.client.copy_object(Bucket=self.bucket, Key=key,
                                                     CopySource={"Bucket": self.bucket, "Key": source_key}),
                     what=f"copy s3://{self.bucket}/{source_key} to {key}", attempts=self.settings.max_retries)

    def get(self, key: str) -> bytes:
        def read() -> bytes:
            try:
                return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
            except self.client.exceptions.NoSuchKey:
                raise NotFound(f"object {key} not found") from None
        return with_retries(read, what=f"get s3://{self.bucket}/{key}", attempts=self.settings.max_retries)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise StorageError(f"head s3://{self.bucket}/{key}: {exc}") from exc

    def presigned_url(self, key: str) -> str | None:
        return self.client.generate_presigned_url("get_object", Params={"Bucket": self.bucket, "Key": key},
                                                  ExpiresIn=self.settings.presign_ttl_s)

    def local_path(self, key: str) -> Path | None:
        return None


def open_storage(settings: StorageSettings) -> Storage:
    """`s3://bucket/prefix` or `file:///dir` (relative `file://./dir` is resolved against the working dir)."""
    parsed = urlparse(settings.url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"storage URL {settings.url!r} names no bucket (s3://bucket/prefix)")
        return S3Storage(parsed.netloc, parsed.path.strip("/"), settings)
    if parsed.scheme == "file":
        root = Path(parsed.netloc + parsed.path) if parsed.netloc else Path(parsed.path)
        return LocalStorage(root, max_retries=settings.max_retries)
    raise StorageError(f"unsupported storage URL {settings.url!r}: use s3://bucket/prefix or file:///dir")


_shared: tuple[StorageSettings, Storage] | None = None
_shared_lock = threading.Lock()


def shared_storage(settings: StorageSettings) -> Storage:
    """This process's one storage client for `settings` (the API, the worker and the webhook payloads share it;
    boto3 clients are thread-safe and costly to make). A changed configuration gets a new client."""
    global _shared
    with _shared_lock:
        if _shared is None or _shared[0] != settings:
            _shared = (settings.model_copy(), open_storage(settings))
        return _shared[1]
