"""The fleet database: an engine for a URL (SQLite by default: WAL, foreign keys, a busy timeout; or
PostgreSQL), its schema migrated by Alembic, and the check that this keyedge knows the schema it opens.
One transaction per command: :func:`transaction`."""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..core.errors import KeyedgeError

MIGRATIONS = Path(__file__).parent / "migrations"


def shown(db: str) -> str:
    """The database as messages show it: never its password."""
    if "://" not in db:
        return db
    import sqlalchemy as sa

    try:
        return sa.engine.make_url(db).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "(a database URL that does not parse)"


def database_url(db: str) -> str:
    """A path is a SQLite file; anything with ``://`` is a SQLAlchemy URL (``postgresql+psycopg://...``)."""
    return db if "://" in db else f"sqlite:///{Path(db).resolve()}"


_ENGINES: dict[tuple[int, str], Any] = {}  # one pool per process and database: a claim is one short transaction


def engine_for(db: str, *, must_exist: bool = True):
    """The engine for the fleet database (one per process); a SQLite file must exist unless the fleet is
    being created."""
    url = database_url(db)
    if url.startswith("sqlite:///") and must_exist and not Path(url.removeprefix("sqlite:///")).is_file():
        raise KeyedgeError(f"fleet database {db} does not exist (keyedge fleet init creates one)")
    cached = _ENGINES.get((os.getpid(), url))
    if cached is None:
        cached = _ENGINES[(os.getpid(), url)] = _new_engine(db, url)
    return cached


def forget(db: str) -> None:
    """Close this process's connections to ``db`` (a file that is removed or replaced)."""
    engine = _ENGINES.pop((os.getpid(), database_url(db)), None)
    if engine is not None:
        engine.dispose()


def _new_engine(db: str, url: str):
    import sqlalchemy as sa

    try:
        if url.startswith("sqlite"):  # a connection per transaction: a replaced file is the new file
            engine = sa.create_engine(url, future=True, poolclass=sa.pool.NullPool)
        else:  # pre-pinged (a restarted server: reconnect), small (many workers share one server)
            engine = sa.create_engine(url, future=True, pool_pre_ping=True, pool_size=2, max_overflow=2)
    except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, ImportError) as exc:
        raise KeyedgeError(f"cannot use database {shown(db)}: {str(exc).replace(db, shown(db))}") from None
    if engine.dialect.name == "sqlite":
        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection, _record) -> None:  # every connection: WAL, foreign keys, wait on locks
            dbapi_connection.isolation_level = None  # transactions are begun explicitly (BEGIN IMMEDIATE)
            cursor = dbapi_connection.cursor()
            for pragma in ("journal_mode=WAL", "foreign_keys=ON", "busy_timeout=30000", "synchronous=NORMAL"):
                cursor.execute(f"PRAGMA {pragma}")
            cursor.close()

        @sa.event.listens_for(engine, "begin")
        def _begin(connection) -> None:  # take the write lock at BEGIN: no upgrade deadlocks between workers
            connection.exec_driver_sql("BEGIN IMMEDIATE")
    return engine


def _config(connection=None):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


@functools.lru_cache(maxsize=1)
def _script():
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_config())


def head_revision() -> str:
    head = _script().get_current_head()
    assert head is not None
    return head


def current_revision(connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(connection).get_current_revision()


def upgrade(connection) -> tuple[str | None, str]:
    """Run the migrations up to this keyedge's head in the connection's transaction; returns (before, after).
    A database of a newer schema is refused before anything is run."""
    from alembic import command

    before = current_revision(connection)
    check_known(before, allow_older=True)
    command.upgrade(_config(connection), "head")
    return before, head_revision()


def check_known(revision: str | None, *, allow_older: bool = False) -> None:
    """Refuse a schema this keyedge does not know (newer) or, unless ``allow_older``, one not at its head."""
    script = _script()
    if revision is not None and revision not in {r.revision for r in script.walk_revisions()}:
        raise KeyedgeError(f"the fleet database has schema revision {revision}, newer than this keyedge knows: "
                           "upgrade keyedge")
    if not allow_older and revision != script.get_current_head():
        raise KeyedgeError(f"the fleet database has schema revision {revision or 'none'}, older than this "
                           f"keyedge's {script.get_current_head()}: run keyedge fleet upgrade")


_REACHED: set[tuple[int, str]] = set()  # databases this process has reached once
RECONNECT_S = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # waits between attempts to reach a server that was there
RECONNECT_BUDGET_S = sum(RECONNECT_S)  # about 16 s: a server restart or a fail-over


class Disconnected(KeyedgeError):
    """The connection was lost inside a transaction (a server restarted or failed over): the server rolled
    the transaction back, nothing of it happened."""


def _waits(budget_s: float) -> list[float]:
    """The waits of :data:`RECONNECT_S` that fit in ``budget_s`` seconds."""
    waits, total = [], 0.0
    for wait in RECONNECT_S:
        if total + wait > budget_s:
            break
        waits.append(wait)
        total += wait
    return waits


def _connect(engine, db: str, budget_s: float = RECONNECT_BUDGET_S):
    """A connection; a server this process reached before (restarting, failing over) is waited for, at most
    ``budget_s`` (about 16 s by default), before the command gives up; one never reached is refused at once
    (a wrong URL), and so is a refused password."""
    import sqlalchemy as sa

    known = (os.getpid(), database_url(db))
    for wait in (*_waits(budget_s), None):
        try:
            connection = engine.connect()
        except sa.exc.OperationalError as exc:
            if wait is None or known not in _REACHED or "authentication" in str(exc):
                raise
            time.sleep(wait)
            continue
        _REACHED.add(known)
        return connection
    raise AssertionError("unreachable")


def retried(fn, budget_s: float = RECONNECT_BUDGET_S):
    """``fn()``, one whole transaction, run again when the connection was lost inside it (the server rolled
    it back), for at most ``budget_s`` of waiting. Only for transactions that are safe to run twice: a
    commit whose answer was lost may have happened (a claim then holds a device it never works on until
    its lease expires; nothing is lost or done twice)."""
    for wait in (*_waits(budget_s), None):
        try:
            return fn()
        except Disconnected:
            if wait is None:
                raise
            time.sleep(wait)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def transaction(db: str, *, must_exist: bool = True, at_head: bool = True,
                reconnect_s: float = RECONNECT_BUDGET_S) -> Iterator:
    """One transaction for a whole command (``BEGIN IMMEDIATE`` on SQLite): committed when the block ends
    (unless the block committed itself), rolled back on any error. A connection lost inside it raises
    :class:`Disconnected`; a server that was reached before is waited for at most ``reconnect_s``."""
    import sqlalchemy as sa

    engine = engine_for(db, must_exist=must_exist)
    try:
        with _connect(engine, db, reconnect_s) as connection:
            connection.begin()
            try:
                if at_head:
                    check_known(current_revision(connection))
                yield connection
                if connection.in_transaction():
                    connection.commit()
            except BaseException:
                if connection.in_transaction():
                    connection.rollback()
                raise
    except sa.exc.SQLAlchemyError as exc:
        detail = " ".join(str(getattr(exc, "orig", None) or exc).replace(db, shown(db)).split())
        lost = isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated
        raise (Disconnected if lost else KeyedgeError)(f"fleet database {shown(db)}: {detail}") from None
