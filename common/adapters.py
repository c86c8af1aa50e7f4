"""The adapter registry: a tenant's LoRA files by name, and what a job's `loras` resolve to.

A registration reads the file once (common.lora_files: safetensors only, LoRA pairs that fit this model's
transformer), stores it content-addressed at `{prefix}/{tenant}/adapters/{sha256}.safetensors` and records its
name, sha256 and what was read. The file is stored before the row is written; if the row cannot be written, a file
no row names is deleted again, so nothing half-registered remains.

Jobs name adapters by name; `resolve_loras` turns those names into `{"name", "sha256", "scale"}` for the job's
params, so a stored job reproduces with the same bytes even after its name points at another file. Every lookup
is inside the caller's tenant: another tenant's adapter is "not found", exactly like one that does not exist.

Deleting a name keeps its file (stored jobs still reproduce) unless `purge` is asked for and no other name of the
tenant points at the same file; a job that needs a purged file then fails with a clear error.
"""
from __future__ import annotations

import hashlib
import logging
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, IO

from sqlalchemy import select
from sqlalchemy.orm import Session

from common.errors import Conflict, InvalidRequest, NotFound
from common.job_request import ADAPTER_NAME_PATTERN
from common.lora_files import NotALora, check_for_model
from common.models import Adapter
from common.settings import Settings
from common.storage import COPY_CHUNK, Storage

log = logging.getLogger(__name__)

_NAME = re.compile(ADAPTER_NAME_PATTERN)


def adapter_key(prefix: str, tenant_id: object, sha256: str) -> str:
    return "/".join(p for p in (prefix.strip("/"), str(tenant_id), "adapters", f"{sha256}.safetensors") if p)


class FileTooLarge(InvalidRequest):
    """A staged file passed `adapters.max_file_bytes`."""


@dataclass(frozen=True)
class StagedFile:
    """A candidate adapter file on local disk, hashed while it was written."""
    path: Path
    sha256: str
    size_bytes: int
    source: str  # "upload:<name>", an s3:// URI or a server path


def stage(source: IO[bytes], into: Path, *, max_bytes: int, source_name: str, field: str = "file") -> StagedFile:
    """Copy `source` to `into`, hashing it; FileTooLarge (a 422 naming `field`) past `max_bytes`."""
    digest, size = hashlib.sha256(), 0
    with open(into, "wb") as out:
        while chunk := source.read(COPY_CHUNK):
            size += len(chunk)
            if size > max_bytes:
                raise FileTooLarge(f"the adapter file is larger than {max_bytes} bytes, the most this server takes",
                                   field=field)
            digest.update(chunk)
            out.write(chunk)
    return StagedFile(path=into, sha256=digest.hexdigest(), size_bytes=size, source=source_name)


def check_name(name: object, field: str = "name") -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidRequest(f"{field} must be 1-64 characters of letters, digits, '.', '_' or '-', starting with a "
                             "letter or digit", field=field)
    return name


def find(session: Session, *, tenant_id: uuid.UUID, name: str) -> Adapter | None:
    return session.scalar(select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.name == name))


def get(session: Session, *, tenant_id: uuid.UUID, name: str) -> Adapter:
    adapter = find(session, tenant_id=tenant_id, name=name) if _NAME.match(name) else None
    if adapter is None:
        raise NotFound(f"adapter {name} not found")
    return adapter


def replaceable(session: Session, *, tenant_id: uuid.UUID, name: str, replace: bool) -> Adapter | None:
    """The adapter a registration of `name` re-points (None for a new name); 409 when the name exists and
    `replace` is not set. Asked before a file is fetched or stored, and again when the row is written."""
    existing = find(session, tenant_id=tenant_id, name=name)
    if existing is not None and not replace:
        raise Conflict(f"adapter {name} exists; register with replace=true to point the name at another file",
                       field="name")
    return existing


def register(session: Session, *, tenant_id: uuid.UUID, name: str, staged: StagedFile, storage: Storage,
             settings: Settings, replace: bool = False, field: str = "file") -> Adapter:
    """Check, store and record an adapter in the caller's transaction (committed by the caller: on any failure
    after this is called, call `forget_unreferenced`). 409 when the name exists and `replace` is not set.

    The file is read and uploaded before the session's first statement: those can take longer than the
    database's idle_in_transaction_session_timeout, which would end a transaction left open across them."""
    check_name(name)
    try:
        info = check_for_model(staged.path, settings.model)
    except NotALora as exc:
        raise InvalidRequest(f"not a LoRA for this model: {exc}", field=field) from None
    if info.rank > settings.adapters.max_rank:
        raise InvalidRequest(f"the adapter's rank {info.rank} is over this server's limit of "
                             f"{settings.adapters.max_rank}", field=field)
    key = adapter_key(storage.prefix, tenant_id, staged.sha256)
    if not storage.exists(key):
        storage.put_file(key, staged.path)
    existing = replaceable(session, tenant_id=tenant_id, name=name, replace=replace)
    values: dict[str, Any] = dict(
        sha256=staged.sha256, key=key, size_bytes=staged.size_bytes, rank=info.rank,
        target_modules=list(info.target_modules), layers=info.layers, layout=info.layout,
        base_model=info.base_model, checked_against=settings.model.id or None, source=staged.source[:2000])
    if existing is None:
        adapter = Adapter(tenant_id=tenant_id, name=name, **values)
        session.add(adapter)
    else:
        previous_key = existing.key
        for attr, value in values.items():
            setattr(existing, attr, value)
        adapter = existing
        log.info("adapter %s of tenant %s now points at %s (was %s)", name, tenant_id, staged.sha256, previous_key)
    session.flush()
    return adapter


def forget_unreferenced(session: Session, storage: Storage, *, tenant_id: uuid.UUID, sha256: str) -> None:
    """Delete the stored file of `sha256` when no adapter row of the tenant names it (after a failed commit or a
    purge); a failure to delete is logged, the object is then an orphan an operator may remove."""
    referenced = session.scalar(select(Adapter.id).where(Adapter.tenant_id == tenant_id, Adapter.sha256 == sha256)
                                .limit(1))
    if referenced is None:
        key = adapter_key(storage.prefix, tenant_id, sha256)
        try:
            storage.delete(key)
        except Exception as exc:  # noqa: BLE001 - recorded; the registry itself is consistent
            log.error("could not delete unreferenced adapter file %s: %s", key, exc)


def delete(session: Session, storage: Storage, *, tenant_id: uuid.UUID, name: str, purge: bool) -> None:
    adapter = get(session, tenant_id=tenant_id, name=name)
    sha256 = adapter.sha256
    session.delete(adapter)
    session.commit()
    if purge:
        forget_unreferenced(session, storage, tenant_id=tenant_id, sha256=sha256)


class TenantAdapters:
    """Adapter names -> sha256 inside one tenant, each name looked up once (a batch of a million lines names a
    few adapters)."""

    def __init__(self, session: Session, tenant_id: uuid.UUID):
        self._session = session
        self._tenant_id = tenant_id
        self._sha: dict[str, str | None] = {}

    def resolve(self, loras: list[dict[str, Any]], field: str = "loras") -> list[dict[str, Any]]:
        """[{"name", "scale"}] -> [{"name", "sha256", "scale"}]; an unknown name (or another tenant's) is a 422
        naming the entry."""
        missing = {entry["name"] for entry in loras} - set(self._sha)
        if missing:
            rows = self._session.execute(select(Adapter.name, Adapter.sha256).where(
                Adapter.tenant_id == self._tenant_id, Adapter.name.in_(missing))).all()
            found = {name: sha256 for name, sha256 in rows}
            self._sha.update({name: found.get(name) for name in missing})
        resolved = []
        for i, entry in enumerate(loras):
            sha256 = self._sha[entry["name"]]
            if sha256 is None:
                raise InvalidRequest(f"no adapter named {entry['name']!r} (letterpress adapters list)",
                                     field=f"{field}.{i}.name")
            resolved.append({"name": entry["name"], "sha256": sha256, "scale": entry["scale"]})
        return resolved


def resolve_loras(session: Session, *, tenant_id: uuid.UUID, loras: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return TenantAdapters(session, tenant_id).resolve(loras)
