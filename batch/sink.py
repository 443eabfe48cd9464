"""Where batch scores go: SQLAlchemy tables (SQLite by default, PostgreSQL by URL), one
transaction per chunk that also advances the job's progress, so a chunk lands whole or not."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import repeat
from typing import Any

import pyarrow as pa
import pyarrow.csv
from sqlalchemy import (
    Column,
    DateTime,
    Engine,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection

from configuration.database import add_missing_columns, database_engine

JOBS_TABLE = "scoring_jobs"
PREDICTION_COLUMNS = (
    "job_id",
    "key",
    "label",
    "score",
    "probabilities",
    "model_name",
    "model_version",
    "fallback_reason",
    "scored_at",
)
REJECT_COLUMNS = ("job_id", "row_number", "key", "reason")
# the prediction columns that vary by row, as the scoring step hands them over
SCORE_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("label", pa.string()),
        ("score", pa.float64()),
        ("probabilities", pa.string()),
        ("fallback_reason", pa.string()),
    ]
)
# the prediction columns all rows of a chunk share
SHARED_TYPES = {
    "job_id": pa.string(),
    "model_name": pa.string(),
    "model_version": pa.string(),
    "scored_at": pa.timestamp("us", tz="UTC"),
}


@dataclass(frozen=True)
class ScoredChunk:
    """One chunk's predictions: `columns` (Arrow, SCORE_SCHEMA) vary by row; `shared` holds the
    values all its rows have (job_id, model_name, model_version, scored_at). Kept columnar until
    the sink: each database gets the form it loads fastest."""

    columns: pa.Table
    shared: dict[str, Any]

    def __len__(self) -> int:
        return self.columns.num_rows

    def table(self) -> pa.Table:
        """All PREDICTION_COLUMNS, in order."""
        n = len(self)
        arrays = [
            pa.repeat(pa.scalar(self.shared[name], type=SHARED_TYPES[name]), n)
            if name in self.shared
            else self.columns[name]
            for name in PREDICTION_COLUMNS
        ]
        return pa.table(arrays, names=list(PREDICTION_COLUMNS))


def now() -> datetime:
    return datetime.now(UTC)


class Sink:
    """The output table, its `<table>_rejects` companion and the shared job table."""

    def __init__(self, url: str, table: str) -> None:
        self.engine: Engine = database_engine(url)  # readers (progress) never block the job
        self.metadata = MetaData()
        self.predictions = Table(
            table,
            self.metadata,
            Column("job_id", String(64), primary_key=True),
            Column("key", String(256), primary_key=True),
            Column("label", String(128)),  # NULL: a 'no decision' fallback
            Column("score", Float),  # NULL with probabilities: a fallback without them
            Column("probabilities", Text),  # JSON object: class -> probability
            Column("model_name", String(128), nullable=False),
            Column("model_version", String(64), nullable=False),
            Column("fallback_reason", String(64)),
            Column("scored_at", DateTime(timezone=True), nullable=False),
        )
        self.rejects = Table(
            f"{table}_rejects",
            self.metadata,
            Column("job_id", String(64), primary_key=True),
            Column("row_number", Integer, primary_key=True),
            Column("key", String(256)),
            Column("reason", Text, nullable=False),
        )
        self.jobs = Table(
            JOBS_TABLE,
            self.metadata,
            Column("job_id", String(64), primary_key=True),
            Column("output_table", String(128), nullable=False),
            Column("use_case", String(64), nullable=False),
            Column("model", String(256), nullable=False),
            Column("data_sha256", String(64)),  # the model's training data (lineage)
            Column("source", Text, nullable=False),
            Column("chunk_rows", Integer, nullable=False),
            Column("chunks_done", Integer, nullable=False),
            Column("rows_scored", Integer, nullable=False),
            Column("rows_rejected", Integer, nullable=False),
            Column("status", String(16), nullable=False),  # running | finished
            Column("started_at", DateTime(timezone=True), nullable=False),
            Column("finished_at", DateTime(timezone=True)),
        )
        self.metadata.create_all(self.engine)
        add_missing_columns(self.engine, self.jobs)  # a job table from an earlier release

    def job(self, job_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(self.jobs).where(self.jobs.c.job_id == job_id)).first()
        return dict(row._mapping) if row else None

    def start(self, job_id: str, fields: dict[str, Any], force: bool) -> dict[str, Any]:
        """The job's record: created, reset (force), or as left by an earlier run."""
        with self.engine.begin() as conn:
            if force:
                for table in (self.predictions, self.rejects, self.jobs):
                    conn.execute(delete(table).where(table.c.job_id == job_id))
            existing = conn.execute(select(self.jobs).where(self.jobs.c.job_id == job_id)).first()
            if existing is None:
                record = {
                    "job_id": job_id,
                    **fields,
                    "chunks_done": 0,
                    "rows_scored": 0,
                    "rows_rejected": 0,
                    "status": "running",
                    "started_at": now(),
                    "finished_at": None,
                }
                conn.execute(insert(self.jobs).values(record))
                return record
        return dict(existing._mapping)

    def write_chunk(
        self, job_id: str, chunk_index: int, scored: ScoredChunk, rejected: Sequence[tuple]
    ) -> None:
        """Scores and rejects of one chunk plus the progress marker, in one transaction."""
        with self.engine.begin() as conn:
            self._insert_scores(conn, scored)
            self._insert(conn, self.rejects, REJECT_COLUMNS, rejected)
            jobs = self.jobs.c
            conn.execute(
                update(self.jobs)
                .where(jobs.job_id == job_id, jobs.chunks_done == chunk_index)
                .values(
                    chunks_done=chunk_index + 1,
                    rows_scored=jobs.rows_scored + len(scored),
                    rows_rejected=jobs.rows_rejected + len(rejected),
                )
            )

    def finish(self, job_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(self.jobs)
                .where(self.jobs.c.job_id == job_id)
                .values(status="finished", finished_at=now())
            )

    def _insert_scores(self, conn: Connection, scored: ScoredChunk) -> None:
        """PostgreSQL: COPY of the chunk as CSV written by Arrow. SQLite: the driver's
        executemany on plain tuples, the values shared by the chunk converted once. Others:
        SQLAlchemy's insert."""
        if not len(scored):
            return
        dialect = conn.dialect
        table, names = self.predictions.name, ", ".join(f'"{c}"' for c in PREDICTION_COLUMNS)
        if dialect.name == "postgresql":
            csv = io.BytesIO()  # strings quoted, nulls empty and unquoted: what COPY reads
            options = pyarrow.csv.WriteOptions(include_header=False)
            pyarrow.csv.write_csv(scored.table(), csv, options)
            cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
            with cursor.copy(f'COPY "{table}" ({names}) FROM STDIN (FORMAT csv)') as copy:
                copy.write(csv.getbuffer())
            return
        driver = dialect.name == "sqlite"  # values go to the driver as SQLAlchemy binds them
        columns: list[Any] = []
        for name in PREDICTION_COLUMNS:
            if name in scored.shared:
                column_type = self.predictions.c[name].type.dialect_impl(dialect)
                process = column_type.bind_processor(dialect) if driver else None
                value = scored.shared[name]
                columns.append(repeat(process(value) if process else value))
            else:
                columns.append(scored.columns[name].to_pylist())
        rows = list(zip(*columns, strict=False))  # repeat() stops with the row columns
        if driver:
            marks = ", ".join("?" * len(PREDICTION_COLUMNS))
            statement = f'INSERT INTO "{table}" ({names}) VALUES ({marks})'
            conn.exec_driver_sql(statement, rows)
        else:
            self._insert(conn, self.predictions, PREDICTION_COLUMNS, rows)

    def _insert(
        self, conn: Connection, table: Table, columns: Sequence[str], rows: Sequence[tuple]
    ) -> None:
        if not rows:
            return
        if conn.dialect.name == "postgresql":  # COPY: the fast path into PostgreSQL
            cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
            names = ", ".join(f'"{c}"' for c in columns)
            with cursor.copy(f'COPY "{table.name}" ({names}) FROM STDIN') as copy:
                for row in rows:
                    copy.write_row(row)
            return
        conn.execute(insert(table), [dict(zip(columns, row, strict=True)) for row in rows])
