"""Cursor pagination for every list endpoint: newest first by (created_at, id), continued by an opaque cursor.

`newest_first` runs one page of a query; `ListPage` is the body every list endpoint returns. The cursor is
base64 of `created_at|id` of the last row served; one the API did not return is a 422 naming `cursor`.
"""
from __future__ import annotations

import base64
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

from pydantic import BaseModel
from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import Session

from common.errors import InvalidRequest

RowT = TypeVar("RowT")
ItemT = TypeVar("ItemT")


def encode_cursor(created_at: datetime, row_id: object) -> str:
    """The cursor that continues after the row with this (created_at, id)."""
    return base64.urlsafe_b64encode(f"{created_at.isoformat()}|{row_id}".encode()).decode()


def decode_cursor(cursor: str, id_type: Callable[[str], Any] = uuid.UUID) -> tuple[datetime, Any]:
    """(created_at, id) of a cursor from `encode_cursor`, the id read by `id_type`. Raises InvalidRequest
    (422, field `cursor`) for anything else."""
    try:
        created, row_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|")
        return datetime.fromisoformat(created), id_type(row_id)
    except Exception:  # noqa: BLE001 - any garbage is the caller's
        raise InvalidRequest("cursor is not one this API returned", field="cursor") from None


@dataclass(frozen=True)
class Page(Generic[RowT]):
    """One page of rows, whether more follow, and the cursor that continues after it."""
    rows: list[RowT]
    has_more: bool
    next_cursor: str | None


def newest_first(session: Session, query: Select, model: Any, *, cursor: str | None, limit: int,
                 id_type: Callable[[str], Any] = uuid.UUID) -> Page:
    """Up to `limit` rows of `query` (a select of `model`, which has `created_at` and `id`), newest first,
    after `cursor` when given. `id_type` reads the id back from a cursor (uuid.UUID, or str for text ids)."""
    if cursor:
        created, row_id = decode_cursor(cursor, id_type)
        query = query.where(or_(model.created_at < created, and_(model.created_at == created, model.id < row_id)))
    rows = list(session.scalars(query.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)))
    page, more = rows[:limit], len(rows) > limit
    last = page[-1] if more else None
    return Page(rows=page, has_more=more, next_cursor=encode_cursor(last.created_at, last.id) if last else None)


class ListPage(BaseModel, Generic[ItemT]):
    """The body of a list endpoint; subclass it per item type (`class JobList(ListPage[JobOut])`)."""
    object: str = "list"
    data: list[ItemT]
    next_cursor: str | None
    has_more: bool

    @classmethod
    def of(cls, page: Page, data: list[ItemT]):
        """The body for `page`, its rows already turned into `data`."""
        return cls(data=data, next_cursor=page.next_cursor, has_more=page.has_more)
