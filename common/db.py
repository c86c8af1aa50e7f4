"""Engine and session factory. Sessions are opened and committed at the edges (a request, a task).

`after_commit(session, key, factory)` gives a transaction work to do once it commits (the webhook outbox sends its
event ids this way): nothing runs when it rolls back. The hooks live on this module's session factory, not on
SQLAlchemy's global `Session` class, and are installed when the factory is made, never at import time.
"""
from __future__ import annotations

import uuid
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from common.errors import NotFound
from common.settings import DatabaseSettings, get_settings

Row = TypeVar("Row")

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def get_engine(url: str | None = None) -> Engine:
    """The engine of `url` (default: the settings' database), one per URL and process."""
    return _engine(url or get_settings().database.url)


def server_options(db: DatabaseSettings) -> str:
    """The Postgres settings every connection of the product starts with. JIT is off: compiling the queue-position
    query costs 100-140 ms on a million jobs, far more than the few milliseconds it runs."""
    idle_ms = int(db.idle_in_transaction_timeout_s * 1000)
    return f"-c idle_in_transaction_session_timeout={idle_ms} -c jit=off"


@lru_cache(maxsize=8)
def _engine(url: str) -> Engine:
    settings = get_settings()
    return create_engine(
        url,
        pool_size=settings.database.pool_size,
        max_overflow=settings.database.max_overflow,
        pool_timeout=settings.database.pool_timeout_s,
        pool_pre_ping=True,  # a restarted Postgres costs one failed checkout, not a failed request
        pool_recycle=1800,
        connect_args={"connect_timeout": 5, "options": server_options(settings.database)},
    )


def session_factory(url: str | None = None) -> sessionmaker[Session]:
    """The session factory of `url` (default: the settings' database), one per URL and process."""
    return _session_factory(url or get_settings().database.url)


@lru_cache(maxsize=8)
def _session_factory(url: str) -> sessionmaker[Session]:
    factory = sessionmaker(bind=get_engine(url), expire_on_commit=False)
    event.listen(factory, "after_commit", _run_after_commit)
    event.listen(factory, "after_rollback", _drop_after_commit)
    return factory


def reset_engines() -> None:
    """Forget cached engines and session factories (tests that point the settings at another database)."""
    _session_factory.cache_clear()
    _engine.cache_clear()


_AFTER_COMMIT = "letterpress.after_commit"  # session.info key: {key: callable run once the transaction commits}
Action = TypeVar("Action", bound=Callable[[], Any])


def after_commit(session: Session, key: str, factory: Callable[[], Action]) -> Action:
    """The action registered under `key` for this transaction, made by `factory()` on first use. Every action
    runs once the transaction commits (in registration order); a rollback drops them all. Actions must not
    raise: the commit has already happened."""
    actions = session.info.setdefault(_AFTER_COMMIT, {})
    if key not in actions:
        actions[key] = factory()
    return actions[key]


def _run_after_commit(session: Session) -> None:
    for action in session.info.pop(_AFTER_COMMIT, {}).values():
        action()


def _drop_after_commit(session: Session) -> None:
    session.info.pop(_AFTER_COMMIT, None)


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """A unit of work: commit on success, roll back on error."""
    session = session_factory(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def alembic_config(url: str | None = None):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", (url or get_settings().database.url).replace("%", "%%"))
    return cfg


def migrate(url: str | None = None, revision: str = "head") -> None:
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def downgrade(url: str | None = None, revision: str = "base") -> None:
    from alembic import command

    command.downgrade(alembic_config(url), revision)


def get_owned(session: Session, model: type[Row], row_id: uuid.UUID | str, *, tenant_id: uuid.UUID | None,
              noun: str, options: tuple = ()) -> Row:
    """A row by id (`options`: loader options of the one query); a malformed id, a missing row and another
    tenant's row are all NotFound (no existence leak)."""
    try:
        key = uuid.UUID(str(row_id))
    except ValueError:
        raise NotFound(f"{noun} {row_id} not found") from None
    row = session.get(model, key, options=options)
    if row is None or (tenant_id is not None and row.tenant_id != tenant_id):
        raise NotFound(f"{noun} {row_id} not found")
    return row
