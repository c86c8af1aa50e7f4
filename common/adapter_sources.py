"""Where a registration by URI may read an adapter file from, on the caller's behalf:

- `s3://bucket/key`: only inside the caller's own storage prefix or an operator allow-listed one
  (`LETTERPRESS_API__INPUT_URL_ALLOW`), by the one rule of common/references.py; a failed read is a generic 422,
  the storage error stays in the log;
- `file:///path`: only a regular file inside a directory the operator lists in `LETTERPRESS_ADAPTERS__PATH_ALLOW`
  (resolved first, so `..` and symbolic links cannot leave it); the answer is the same whether or not the file
  exists, so a caller cannot probe the server's disk.

Anything else (http(s), a Hub id) is refused: this server fetches no URL a caller names.
"""
from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO
from urllib.parse import unquote, urlparse

from common.errors import InvalidRequest
from common.references import resolve_tenant_object
from common.settings import Settings
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
    else:
        raise InvalidRequest(f"{field} must be s3://bucket/key inside your storage prefix, or file:///path inside "
                             "a server directory the operator allows", field=field)


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
