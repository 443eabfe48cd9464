"""The one way to open a database: SQLAlchemy engines for the task queue, the routing table and
the batch sink (SQLite by default, PostgreSQL by URL)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Table, create_engine, event, inspect
from sqlalchemy.engine import Engine


def _sqlite_pragmas(dbapi_connection: Any, _: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


def database_engine(url: str, **options: Any) -> Engine:
    """An SQLAlchemy engine for `url`; on SQLite in WAL mode (readers never block the writer)
    with a busy timeout. The task store, the routing table and the batch sink open theirs here."""
    engine = create_engine(url, **options)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


SCHEMA_LOCK = 0x5C0121  # the PostgreSQL advisory lock that serializes table creation


def create_tables(engine: Engine, *tables: Any) -> None:
    """Create `tables` (sqlalchemy Tables) where missing. On PostgreSQL under an advisory lock:
    API workers of several replicas starting on a fresh database at once otherwise race in
    CREATE TABLE (a UniqueViolation on pg_type that killed a starting worker)."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK})")
        for table in tables:
            table.create(conn, checkfirst=True)


def add_missing_columns(engine: Engine, table: Table) -> list[str]:
    """Add `table`'s nullable columns that its stored table lacks (created by an earlier release,
    before they existed): the names added. Other differences are left to the operator."""
    existing = {column["name"] for column in inspect(engine).get_columns(table.name)}
    quote = engine.dialect.identifier_preparer.quote
    added = []
    with engine.begin() as conn:
        for column in table.columns:
            if column.name in existing or not column.nullable:
                continue
            kind = column.type.compile(dialect=engine.dialect)
            conn.exec_driver_sql(
                f"ALTER TABLE {quote(table.name)} ADD COLUMN {quote(column.name)} {kind}"
            )
            added.append(column.name)
    return added
