"""Which stored objects a tenant may make the server read on its behalf: one rule for every field that names an
object by URL (a batch's `input_url` today; remix images, adapters, ... later).

The server reads with its own storage credentials, which reach every tenant's objects (and possibly other
buckets). So a reference is accepted only when it names an object

- inside the caller's own prefix of the configured storage, `s3://<bucket>/<prefix>/<tenant_id>/...`, or
- inside an operator allow-listed prefix (`LETTERPRESS_API__INPUT_URL_ALLOW`, e.g. `s3://shared-prompts/public/`).

The URL must be plain: no `..` or `.` segments, no empty segments (`//`), no `%` (percent-encoding), backslash,
control characters (NUL), `?` or `#`. Prefixes are compared segment by segment, so `{tenant}x/...` is not inside
`{tenant}/`. A refusal happens before anything is read and its message depends only on the caller and the
configuration, never on whether the object exists; a failed read is reported with a generic message and the
storage error is logged, not returned.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import IO

from common.errors import InvalidRequest
from common.settings import StorageSettings
from common.storage import S3Storage

log = logging.getLogger(__name__)

SCHEME = "s3://"
# S3 bucket names (lower-case DNS-like; legacy upper-case and underscores accepted). No `@`, `:` or `/`.
_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,253}[A-Za-z0-9]$")
# Characters that make a key mean something other than what it looks like, somewhere between us and the store.
_FORBIDDEN = re.compile(r"[%\\?#\x00-\x1f\x7f]")
MAX_KEY_BYTES = 1024  # S3's limit


def parse_s3_url(url: object) -> tuple[str, list[str]] | None:
    """`s3://bucket/a/b/c` -> ("bucket", ["a", "b", "c"]); None unless the URL is in that plain form."""
    if not isinstance(url, str) or not url.startswith(SCHEME) or _FORBIDDEN.search(url):
        return None
    bucket, slash, key = url[len(SCHEME):].partition("/")
    if not slash or not _BUCKET.match(bucket) or len(key.encode()) > MAX_KEY_BYTES:
        return None
    segments = key.split("/")
    if any(s in ("", ".", "..") for s in segments):
        return None
    return bucket, segments


def _prefix(url: str) -> tuple[str, list[str]] | None:
    """A prefix URL (`s3://bucket/`, `s3://bucket/some/prefix/`, trailing slash optional) as (bucket, segments)."""
    if not isinstance(url, str) or not url.startswith(SCHEME):
        return None
    bucket, _, path = url[len(SCHEME):].partition("/")
    path = path.strip("/")
    if not path:
        return (bucket, []) if _BUCKET.match(bucket) else None
    return parse_s3_url(f"{SCHEME}{bucket}/{path}")


def storage_root(storage_settings: StorageSettings) -> tuple[str, list[str]] | None:
    """(bucket, prefix segments) of the configured storage (open_storage's reading); None when it is not S3."""
    if not storage_settings.url.startswith(SCHEME):
        return None
    bucket, _, path = storage_settings.url[len(SCHEME):].partition("/")
    return bucket, [s for s in path.split("/") if s]


def tenant_prefix(storage_settings: StorageSettings, tenant_id: object) -> tuple[str, list[str]] | None:
    """(bucket, segments) of the tenant's own area, `{prefix}/{tenant_id}/`; None when storage is not S3."""
    root = storage_root(storage_settings)
    return None if root is None else (root[0], [*root[1], str(tenant_id)])


def _inside(bucket: str, segments: list[str], prefix: tuple[str, list[str]]) -> bool:
    p_bucket, p_segments = prefix
    return bucket == p_bucket and len(segments) > len(p_segments) and segments[:len(p_segments)] == p_segments


def _allowed_prefixes(allow: Iterable[str], storage_settings: StorageSettings) -> list[tuple[str, list[str]]]:
    """The usable allow-list entries. An entry that is not a plain `s3://bucket/prefix/`, or that would cover
    every tenant's area of the configured storage (e.g. the whole storage bucket), is ignored and logged."""
    root = storage_root(storage_settings)
    prefixes = []
    for entry in allow:
        prefix = _prefix(entry)
        if prefix is None:
            log.error("ignoring input_url_allow entry %r: not a plain s3://bucket/prefix/", entry)
            continue
        bucket, segments = prefix
        if root is not None and bucket == root[0] and root[1][:len(segments)] == segments:
            log.error("ignoring input_url_allow entry %r: it covers every tenant's objects in %s", entry,
                      storage_settings.url)
            continue
        prefixes.append(prefix)
    return prefixes


def refusal_message(field: str, *, tenant_id: object, storage_settings: StorageSettings) -> str:
    own = tenant_prefix(storage_settings, tenant_id)
    if own is None:
        return f"{field} must be a plain s3:// URL inside an allowed prefix"
    return (f"{field} must be a plain s3:// URL inside your own storage prefix "
            f"{SCHEME}{'/'.join([own[0], *own[1]])}/ or an allowed prefix")


def resolve_tenant_object(url: str, *, tenant_id: object, storage_settings: StorageSettings,
                          allow: Iterable[str] = (), field: str = "input_url") -> tuple[str, str]:
    """(bucket, key) of the object `url` names, when `tenant_id` may have the server read it; else
    InvalidRequest naming `field`, the same answer whether the object exists or not (nothing is read here)."""
    parsed = parse_s3_url(url)
    if parsed is not None:
        bucket, segments = parsed
        own = tenant_prefix(storage_settings, tenant_id)
        if (own is not None and _inside(bucket, segments, own)) or any(
                _inside(bucket, segments, p) for p in _allowed_prefixes(allow, storage_settings)):
            return bucket, "/".join(segments)
    raise InvalidRequest(refusal_message(field, tenant_id=tenant_id, storage_settings=storage_settings),
                         field=field)


def download_tenant_object(bucket: str, key: str, into: IO[bytes], *, storage_settings: StorageSettings,
                           client=None, field: str = "input_url") -> None:
    """Read a resolved reference (resolve_tenant_object) with the storage credentials into `into`. Any failure
    (missing, forbidden, unreachable) is InvalidRequest("{field} could not be read"); the real error is logged."""
    try:
        if client is None:
            client = S3Storage(bucket, "", storage_settings).client
        client.download_fileobj(bucket, key, into)
    except Exception as exc:  # noqa: BLE001 - whatever the store said stays server-side
        log.warning("reading %s s3://%s/%s failed: %s", field, bucket, key, exc)
        raise InvalidRequest(f"{field} could not be read", field=field) from None
