"""The routing an admin call set, in the task database: every API worker (and every replica on a
shared PostgreSQL) applies it, and it outlives a restart."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Column, DateTime, Integer, MetaData, Table, Text, select
from sqlalchemy.engine import Engine

from configuration.database import create_tables


class RoutingTable:
    """The routing an admin call set, shared by the API workers (and replicas on a shared
    database) and kept across restarts: one row in `scoring_routing`."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine  # the task store's: one pool and the same SQLite settings
        metadata = MetaData()
        self.table = Table(
            "scoring_routing",
            metadata,
            Column("id", Integer, primary_key=True),
            Column("spec", Text, nullable=False),
            Column("updated_at", DateTime(timezone=True), nullable=False),
        )
        create_tables(self.engine, *metadata.sorted_tables)

    def read(self) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            spec = conn.execute(select(self.table.c.spec).where(self.table.c.id == 1)).scalar()
        return None if spec is None else dict(json.loads(spec))

    def write(self, spec: dict[str, Any]) -> None:
        values = {"spec": json.dumps(spec, sort_keys=True), "updated_at": datetime.now(UTC)}
        with self.engine.begin() as conn:
            updated = conn.execute(
                self.table.update().where(self.table.c.id == 1).values(**values)
            ).rowcount
            if not updated:
                conn.execute(self.table.insert().values(id=1, **values))
