"""Durable async scoring tasks: submit a large batch, get a task id at once, poll, fetch the result.

State lives in a database through SQLAlchemy (SQLite by default; PostgreSQL by URL when several
replicas share the queue), so queued, running and finished tasks survive a restart. A worker
claims a task with a lease it renews while it works; a task whose worker died is claimed again
once its lease has expired, at most `max_attempts` times, then marked failed. Finished tasks and
their results are deleted `retention_s` after they were submitted. Submitting again with the
same idempotency key returns the existing task (a different payload under the same key is a
conflict). The routing an admin call set lives in the same database
(`api/routing_table.py`).

Each task has an event log beside it (`scoring_task_events`): every scored chunk (`predictions`)
and `progress` as the worker stores it, then one terminal `completed` or `failed`, numbered per
task from 1. The streams (`api/streams.py`) read it, so they work from any replica and across
restarts; a worker that takes over a task resumes after the last stored chunk. A task's webhook
subscription (`scoring_task_webhooks`) is stored with it; `api/webhooks.py` delivers.

Only the API worker needs this module (and SQLAlchemy): `service.py` imports it where the API
worker uses it, so that the runner workers, which import `service.py` too, start faster.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic_core import to_json
from sqlalchemy import (
    Column,
    DateTime,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from configuration.database import create_tables, database_engine

LOG = logging.getLogger(__name__)
PURGE_EVERY_S = 60.0

TaskStatus = Literal["queued", "running", "succeeded", "failed"]
TERMINAL_EVENTS = ("completed", "failed")


@dataclass(frozen=True)
class TaskEvent:
    """One stored event of a task: `seq` counts from 1 per task (the SSE `id`), `data` is JSON."""

    seq: int
    kind: str
    data: str


class LostLease(RuntimeError):
    """Another worker stored this chunk first: the caller no longer owns the task."""


class IdempotencyConflict(ValueError):
    """An idempotency key was reused with a different payload."""


@dataclass(frozen=True)
class Task:
    id: str
    status: TaskStatus
    rows: int
    attempts: int
    idempotency_key: str | None
    created_at: datetime
    updated_at: datetime
    expires_at: datetime
    error: str | None

    def public(self) -> dict[str, Any]:
        """The task as the status route shows it."""
        return {
            "task_id": self.id,
            "status": self.status,
            "rows": self.rows,
            "attempts": self.attempts,
            "idempotency_key": self.idempotency_key,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "expires_at": self.expires_at.isoformat(),
            "error": self.error,
        }


def now() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime) -> datetime:
    """SQLite gives naive datetimes back: they were stored in UTC."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def task_body(task: Task, contract_version: int, prefix: str) -> dict[str, Any]:
    """A task as the API answers it (`TaskInfo`), with links to its status and result."""
    base = f"{prefix}/tasks/{task.id}"
    return {
        **task.public(),
        "contract_version": contract_version,
        "links": {"status": base, "result": f"{base}/result", "events": f"{base}/events"},
    }


class TaskStore:
    """The `scoring_tasks` table and the only operations on it."""

    def __init__(
        self,
        url: str,
        *,
        retention_s: float,
        lease_s: float,
        max_attempts: int,
        clock: Callable[[], datetime] = now,
    ) -> None:
        """`clock` gives every time this store reads (UTC, timezone-aware): leases, retention
        and timestamps; tests pass one they advance."""
        self.engine: Engine = database_engine(url, pool_pre_ping=True)
        self.clock = clock
        self.retention = timedelta(seconds=retention_s)
        self.lease = timedelta(seconds=lease_s)
        self.max_attempts = max_attempts
        metadata = MetaData()
        self.table = Table(
            "scoring_tasks",
            metadata,
            Column("id", String(36), primary_key=True),
            Column("idempotency_key", String(128), unique=True),
            Column("payload_sha256", String(64), nullable=False),
            Column("status", String(16), nullable=False, index=True),
            Column("rows", Integer, nullable=False),
            Column("attempts", Integer, nullable=False),
            Column("payload", Text, nullable=False),  # JSON: the submitted instances
            Column("result", Text),  # JSON: the response body, once succeeded
            Column("error", Text),
            Column("created_at", DateTime(timezone=True), nullable=False),
            Column("updated_at", DateTime(timezone=True), nullable=False),
            Column("lease_until", DateTime(timezone=True)),
            Column("expires_at", DateTime(timezone=True), nullable=False, index=True),
        )
        self.events = Table(
            "scoring_task_events",
            metadata,
            Column("task_id", String(36), nullable=False),
            Column("seq", Integer, nullable=False),
            Column("kind", String(16), nullable=False),
            # first row of a `predictions` chunk: one chunk per start, whoever stores it
            Column("row_start", Integer),
            Column("data", Text, nullable=False),
            Column("created_at", DateTime(timezone=True), nullable=False),
            PrimaryKeyConstraint("task_id", "seq"),
            UniqueConstraint("task_id", "row_start"),
        )
        self.webhooks = Table(
            "scoring_task_webhooks",
            metadata,
            Column("task_id", String(36), primary_key=True),
            Column("url", Text, nullable=False),
            Column("events", String(64), nullable=False),  # comma-separated event kinds
        )
        self.metadata = metadata  # api/webhooks.py adds its deliveries table to it
        create_tables(self.engine, *metadata.sorted_tables)

    def close(self) -> None:
        self.engine.dispose()

    # ---- submit and read -----------------------------------------------------------------
    def submit(
        self,
        payload: bytes,
        rows: int,
        key: str | None,
        webhook: tuple[str, tuple[str, ...]] | None = None,
    ) -> tuple[Task, bool]:
        """(task, created). With a known `key`, the existing task (created False). `webhook`:
        (url, event kinds) to deliver this task's events to."""
        digest = hashlib.sha256(payload + (to_json(webhook) if webhook else b"")).hexdigest()
        if key is not None and (existing := self._by_key(key)) is not None:
            return self._same_payload(existing, digest), False
        created = self.clock()
        values = {
            "id": str(uuid.uuid4()),
            "idempotency_key": key,
            "payload_sha256": digest,
            "status": "queued",
            "rows": rows,
            "attempts": 0,
            "payload": payload.decode(),
            "created_at": created,
            "updated_at": created,
            "expires_at": created + self.retention,
        }
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(self.table).values(**values))
                if webhook is not None:
                    subscription = {"url": webhook[0], "events": ",".join(webhook[1])}
                    conn.execute(insert(self.webhooks).values(task_id=values["id"], **subscription))
        except IntegrityError:  # the same key, submitted concurrently: that one won
            existing = self._by_key(str(key)) if key is not None else None
            if existing is None:
                raise
            return self._same_payload(existing, digest), False
        task = self.get(str(values["id"]))
        assert task is not None
        return task, True

    def _same_payload(self, task_id: str, digest: str) -> Task:
        with self.engine.connect() as conn:
            stored = conn.execute(
                select(self.table.c.payload_sha256).where(self.table.c.id == task_id)
            ).scalar_one()
        if stored != digest:
            raise IdempotencyConflict("this idempotency key was used for a different payload")
        task = self.get(task_id)
        assert task is not None
        return task

    def _by_key(self, key: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(
                select(self.table.c.id).where(self.table.c.idempotency_key == key)
            ).scalar_one_or_none()

    def get(self, task_id: str) -> Task | None:
        """The task, unless unknown or past its retention."""
        t = self.table.c
        with self.engine.connect() as conn:
            row = conn.execute(
                select(
                    t.id,
                    t.status,
                    t.rows,
                    t.attempts,
                    t.idempotency_key,
                    t.created_at,
                    t.updated_at,
                    t.expires_at,
                    t.error,
                ).where(t.id == task_id)
            ).one_or_none()
        if row is None or _aware(row.expires_at) <= self.clock():
            return None
        return Task(
            id=row.id,
            status=row.status,
            rows=row.rows,
            attempts=row.attempts,
            idempotency_key=row.idempotency_key,
            created_at=_aware(row.created_at),
            updated_at=_aware(row.updated_at),
            expires_at=_aware(row.expires_at),
            error=row.error,
        )

    def result(self, task_id: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(
                select(self.table.c.result).where(self.table.c.id == task_id)
            ).scalar_one_or_none()

    def webhook(self, task_id: str) -> tuple[str, tuple[str, ...]] | None:
        """(url, event kinds) the task's events are delivered to, if any."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(self.webhooks.c.url, self.webhooks.c.events).where(
                    self.webhooks.c.task_id == task_id
                )
            ).one_or_none()
        return None if row is None else (row.url, tuple(row.events.split(",")))

    def events_after(self, task_id: str, after: int, limit: int = 100) -> list[TaskEvent]:
        """The task's events numbered above `after`, oldest first, at most `limit`."""
        e = self.events.c
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(e.seq, e.kind, e.data)
                .where((e.task_id == task_id) & (e.seq > after))
                .order_by(e.seq)
                .limit(limit)
            ).all()
        return [TaskEvent(row.seq, row.kind, row.data) for row in rows]

    def _append(self, conn: Any, task_id: str, kind: str, data: Any, row_start: int | None = None):
        """Add an event after the task's last one, in `conn`'s transaction; its number."""
        e = self.events.c
        last = conn.execute(select(func.max(e.seq)).where(e.task_id == task_id)).scalar()
        seq = int(last or 0) + 1
        conn.execute(
            insert(self.events).values(
                task_id=task_id,
                seq=seq,
                kind=kind,
                row_start=row_start,
                data=to_json(data).decode(),
                created_at=self.clock(),
            )
        )
        return seq

    # ---- the worker's side ------------------------------------------------------------------
    def claim(self) -> tuple[str, str] | None:
        """(task id, payload) of the oldest claimable task, now leased to the caller: queued,
        or running under an expired lease (its worker died). Safe across replicas: the claim
        is a conditional update that only one caller can win."""
        t = self.table.c
        self._give_up_on_crash_loops()
        for _ in range(5):  # lost races: try the next candidate
            moment = self.clock()
            claimable = or_(
                t.status == "queued", (t.status == "running") & (t.lease_until < moment)
            )
            with self.engine.begin() as conn:
                candidate = conn.execute(
                    select(t.id, t.payload).where(claimable).order_by(t.created_at).limit(1)
                ).one_or_none()
                if candidate is None:
                    return None
                won = conn.execute(
                    update(self.table)
                    .where((t.id == candidate.id) & claimable)
                    .values(
                        status="running",
                        attempts=t.attempts + 1,
                        lease_until=moment + self.lease,
                        updated_at=moment,
                    )
                ).rowcount
            if won == 1:
                return candidate.id, candidate.payload
        return None

    def _give_up_on_crash_loops(self) -> None:
        """A task whose worker died `max_attempts` times fails instead of being claimed again."""
        t = self.table.c
        moment = self.clock()
        error = f"abandoned after {self.max_attempts} attempts"
        abandoned = (
            (t.status == "running") & (t.lease_until < moment) & (t.attempts >= self.max_attempts)
        )
        with self.engine.begin() as conn:
            for task_id in conn.execute(select(t.id).where(abandoned)).scalars().all():
                won = conn.execute(
                    update(self.table)
                    .where((t.id == task_id) & abandoned)
                    .values(status="failed", error=error, updated_at=moment, lease_until=None)
                ).rowcount
                if won:
                    failed = {"task_id": task_id, "status": "failed", "error": error}
                    self._append(conn, task_id, "failed", failed)

    def rows_stored(self, task_id: str) -> int:
        """Rows of the task whose chunks are stored already (where a new attempt resumes)."""
        e = self.events.c
        with self.engine.connect() as conn:
            data = conn.execute(
                select(e.data)
                .where((e.task_id == task_id) & (e.kind == "predictions"))
                .order_by(e.seq.desc())
                .limit(1)
            ).scalar_one_or_none()
        if data is None:
            return 0
        chunk = json.loads(data)
        return int(chunk["start"]) + len(chunk["predictions"])

    def store_chunk(self, task_id: str, start: int, body: dict[str, Any], total: int) -> None:
        """Store a scored chunk (predict_batch's body for rows `start`...; error indexes
        counted from the task's start) and the progress it makes, and renew the lease. Raises
        LostLease when another worker stored this chunk first."""
        chunk = {**body, "start": start, "errors": shifted(body["errors"], start)}
        done = {"rows_done": start + len(body["predictions"]), "rows_total": total}
        moment = self.clock()
        try:
            with self.engine.begin() as conn:
                self._append(conn, task_id, "predictions", chunk, row_start=start)
                self._append(conn, task_id, "progress", done)
                conn.execute(
                    update(self.table)
                    .where((self.table.c.id == task_id) & (self.table.c.status == "running"))
                    .values(lease_until=moment + self.lease, updated_at=moment)
                )
        except IntegrityError as exc:
            raise LostLease(
                f"chunk {start} of task {task_id} was stored by another worker"
            ) from exc

    def stored_result(self, task_id: str) -> dict[str, Any]:
        """The task's stored chunks merged into predict_batch's shape."""
        e = self.events.c
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(e.data)
                .where((e.task_id == task_id) & (e.kind == "predictions"))
                .order_by(e.row_start)
            ).scalars()
            chunks = [json.loads(data) for data in rows]
        merged: dict[str, Any] = {**chunks[0], "predictions": [], "errors": []}
        merged.pop("start")
        for chunk in chunks:
            merged["predictions"].extend(chunk["predictions"])
            merged["errors"].extend(chunk["errors"])
        return merged

    def renew(self, task_id: str) -> None:
        """Extend the lease of a task the caller is still working on."""
        moment = self.clock()
        with self.engine.begin() as conn:
            conn.execute(
                update(self.table)
                .where((self.table.c.id == task_id) & (self.table.c.status == "running"))
                .values(lease_until=moment + self.lease, updated_at=moment)
            )

    def finish(self, task_id: str, result: str, errors: int = 0) -> None:
        """Store the result and the `completed` event."""
        rows = self.table.c.rows
        with self.engine.begin() as conn:
            total = conn.execute(select(rows).where(self.table.c.id == task_id)).scalar_one()
            done = {"task_id": task_id, "status": "succeeded", "rows": total, "errors": errors}
            if self._close(task_id, conn, status="succeeded", result=result):
                self._append(conn, task_id, "completed", done)

    def retry_or_fail(self, task_id: str, error: str) -> None:
        """After a failed attempt: queued again while attempts remain, else failed."""
        with self.engine.connect() as conn:
            attempts = conn.execute(
                select(self.table.c.attempts).where(self.table.c.id == task_id)
            ).scalar_one()
        with self.engine.begin() as conn:
            if attempts < self.max_attempts:
                self._close(task_id, conn, status="queued", error=error)
                return
            error = f"{error} (after {attempts} attempts)"
            if self._close(task_id, conn, status="failed", error=error):
                failed = {"task_id": task_id, "status": "failed", "error": error}
                self._append(conn, task_id, "failed", failed)

    def _close(self, task_id: str, conn: Any, **values: Any) -> bool:
        """Update a running task in `conn`'s transaction; whether it was running."""
        return bool(
            conn.execute(
                update(self.table)
                .where((self.table.c.id == task_id) & (self.table.c.status == "running"))
                .values(**values, lease_until=None, updated_at=self.clock())
            ).rowcount
        )

    def purge(self) -> int:
        """Delete tasks past their retention; how many."""
        expired = self.table.c.expires_at <= self.clock()
        with self.engine.begin() as conn:
            ids = select(self.table.c.id).where(expired).scalar_subquery()
            for table in (self.events, self.webhooks):
                conn.execute(delete(table).where(table.c.task_id.in_(ids)))
            return int(conn.execute(delete(self.table).where(expired)).rowcount)


class TaskWorker:
    """Runs in each API worker: claims tasks one at a time and scores them with `score`
    (rows -> response body), renewing the lease between chunks. Purges expired tasks."""

    def __init__(
        self,
        store: TaskStore,
        score: Callable[[list[Any]], Awaitable[dict[str, Any]]],
        chunk_rows: int,
        poll_s: float,
    ) -> None:
        self.store = store
        self.score = score
        self.chunk_rows = chunk_rows
        self.poll_s = poll_s

    async def run(self) -> None:
        purged_at = 0.0
        loop = asyncio.get_running_loop()
        while True:
            try:
                if loop.time() - purged_at > PURGE_EVERY_S:
                    purged_at = loop.time()
                    await asyncio.to_thread(self.store.purge)
                claimed = await asyncio.to_thread(self.store.claim)
            except Exception:  # the database is unreachable: try again later
                LOG.exception("task store unavailable")
                claimed = None
            if claimed is None:
                await asyncio.sleep(self.poll_s)
                continue
            await self.work(*claimed)

    async def work(self, task_id: str, payload: str) -> None:
        """Score the task chunk by chunk after the chunks already stored (an earlier attempt's),
        storing each as it is scored, then the merged result."""
        try:
            instances = json.loads(payload)
            total = len(instances)
            stored = await asyncio.to_thread(self.store.rows_stored, task_id)
            # which process took which task: the line an operator looks for after a crash
            LOG.info(
                "task %s: claimed by pid %d, %d of %d rows already stored",
                task_id,
                os.getpid(),
                stored,
                total,
            )
            # a task of 0 rows is scored once too: its result is predict_batch's empty answer
            starts = range(stored, total, self.chunk_rows) or ([0] if total == 0 else [])
            for start in starts:
                body = await self.score(instances[start : start + self.chunk_rows])
                await asyncio.to_thread(self.store.store_chunk, task_id, start, body, total)
            result = await asyncio.to_thread(self.store.stored_result, task_id)
            done = to_json(result).decode()
            await asyncio.to_thread(self.store.finish, task_id, done, len(result["errors"]))
            LOG.info("task %s: %d rows scored", task_id, total)
        except LostLease:
            LOG.warning("task %s: another worker took it over", task_id)
        except Exception:
            LOG.exception("task %s failed", task_id)
            await asyncio.to_thread(
                self.store.retry_or_fail, task_id, "scoring failed; see the service log"
            )


def shifted(errors: list[Any], offset: int) -> list[dict[str, Any]]:
    """Row errors (RowError or dicts) as dicts, their indexes moved by `offset`."""
    moved = []
    for error in errors:
        error = error if isinstance(error, dict) else error.model_dump()
        moved.append({**error, "index": error["index"] + offset})
    return moved


def merge(bodies: list[dict[str, Any]], chunk_rows: int) -> dict[str, Any]:
    """Chunk responses (predict_batch's shape) as one, row indexes counted from the start."""
    merged: dict[str, Any] = {**bodies[0], "predictions": [], "errors": []} if bodies else {}
    for number, body in enumerate(bodies):
        merged["predictions"].extend(body["predictions"])
        for error in body["errors"]:
            error = error if isinstance(error, dict) else error.model_dump()
            merged["errors"].append({**error, "index": error["index"] + number * chunk_rows})
    return merged
