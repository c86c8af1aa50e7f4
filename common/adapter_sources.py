"""Where a registration by URI may read an adapter file from, on the caller's behalf:

- `s3://bucket/key`: only inside the caller's own storage prefix or an operator allow-listed one
  (`LETTERPRESS_API__INPUT_URL_ALLOW`), by the one rule of common/references.py; a failed read is a generic 422,
  the storage error stays in the log;
- `file:///path`: only a regular file inside a directory the operator lists in `LETTERPRESS_ADAPTERS__PATH_ALLOW`
  (resolved first, so `..` and symbolic links cannot leave it); the answer is the same whether or not the file
  exists, so a caller cannot probe the server's disk.

- `hf://org/repo[@revision]/path/file.safetensors`: a file of a Hugging Face Hub model repository, only when the
  operator turns it on (`LETTERPRESS_ADAPTERS__HUB=true`), fetched with the Hub library into the configured cache
  (`LETTERPRESS_MODEL__HF_HOME`, the server's token, offline mode honoured: then only what the cache holds). Its
  size is checked against the limit before downloading when the Hub is reachable.

Anything else (http(s), any other host) is refused: this server fetches no URL a caller names.
"""
from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO
from urllib.parse import unquote, urlparse

from common.errors import InvalidRequest
from common.references import resolve_tenant_object
from common.settings import Settings, hf_env, hub_cache_dir
from common.storage import S3Storage, Storage

log = logging.getLogger(__name__)


@contextmanager
def open_source(uri: str, *, tenant_id: uuid.UUID, settings: Settings, storage: Storage,
                field: str = "uri") -> Iterator[IO[bytes]]:
    """A binary stream of the file `uri` names, when the caller may name it; else InvalidRequest naming `field`."""
    if uri.startswith("s3://"):
        bucket, key = resolve_tenant_object(uri, tenant_id=tenant_id, storage_settings=settings.storage,
                                            allow=settings.api.input_url_allow, field=field)
        client = storage.client if isinstance(storage, S3Storage) else S3Storage(bucket, "", settings.storage).client
        try:
            body = client.get_object(Bucket=bucket, Key=key)["Body"]
        except Exception as exc:  # noqa: BLE001 - whatever the store said stays server-side
            log.warning("reading %s %s failed: %s", field, uri, exc)
            raise InvalidRequest(f"{field} could not be read", field=field) from None
        try:
            yield body
        finally:
            body.close()
    elif uri.startswith("file://"):
        path = _allowed_path(uri, settings.adapters.path_allow, field)
        with open(path, "rb") as f:
            yield f
    elif uri.startswith("hf://"):
        with open(_hub_file(uri, settings, field), "rb") as f:
            yield f
    else:
        raise InvalidRequest(f"{field} must be s3://bucket/key inside your storage prefix, file:///path inside "
                             "a server directory the operator allows, or hf://org/repo[@revision]/file.safetensors "
                             "where the Hub is enabled", field=field)


_HUB_URI = re.compile(r"^hf://(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95})"
                      r"(?:@(?P<revision>[A-Za-z0-9][A-Za-z0-9._-]{0,99}))?/(?P<file>[A-Za-z0-9._/-]+\.safetensors)$")


def _hub_file(uri: str, settings: Settings, field: str) -> Path:
    """The local path of a Hub file (downloaded into the cache when the Hub is reachable and allowed)."""
    if not settings.adapters.hub:
        raise InvalidRequest(f"{field}: hf:// sources are not enabled on this server (LETTERPRESS_ADAPTERS__HUB)",
                             field=field)
    match = _HUB_URI.match(uri)
    if match is None or any(part in ("", ".", "..") for part in match["file"].split("/")):
        raise InvalidRequest(f"{field} must be hf://org/repo[@revision]/path/file.safetensors", field=field)
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

    model = settings.model
    env = hf_env(model)
    offline = env.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    token = env.get("HF_TOKEN") or None
    try:
        if not offline:
            size = get_hf_file_metadata(hf_hub_url(match["repo"], match["file"], revision=match["revision"]),
                                        token=token).size
            if size is not None and size > settings.adapters.max_file_bytes:
                raise FileTooLargeOnHub(size)
        return Path(hf_hub_download(match["repo"], match["file"], revision=match["revision"], token=token,
                                    cache_dir=hub_cache_dir(model), local_files_only=offline))
    except FileTooLargeOnHub as exc:
        raise InvalidRequest(f"{field} is {exc.size} bytes, over this server's limit of "
                             f"{settings.adapters.max_file_bytes}", field=field) from None
    except Exception as exc:  # noqa: BLE001 - what the Hub said stays server-side (a gated or private repo, ...)
        log.warning("reading %s %s failed: %s", field, uri, exc)
        raise InvalidRequest(f"{field} could not be read", field=field) from None


class FileTooLargeOnHub(Exception):
    def __init__(self, size: int):
        super().__init__(size)
        self.size = size


def _allowed_path(uri: str, allow: list[str], field: str) -> Path:
    refusal = InvalidRequest(f"{field} is not a file inside a directory this server allows "
                             "(LETTERPRESS_ADAPTERS__PATH_ALLOW)", field=field)
    parsed = urlparse(uri)
    if parsed.netloc not in ("", "localhost") or "\x00" in uri or not allow:
        raise refusal
    path = Path(unquote(parsed.path)).resolve()
    roots = [Path(root).expanduser().resolve() for root in allow]
    if not any(path.is_relative_to(root) and path != root for root in roots) or not path.is_file():
        raise refusal
    return path
