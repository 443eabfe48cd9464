"""Signed webhooks of task events, at least once: a delivery per subscribed event in the task
store, claimed under a lease (one replica sends it), each attempt recorded, retried with
exponential backoff up to a cap, signed as Standard Webhooks specifies (`standardwebhooks`)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from pydantic_core import to_json
from sqlalchemy import (
    Column,
    DateTime,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from api import metrics
from api.egress import RefusedURL, check_url
from api.tasks import TERMINAL_EVENTS, TaskStore, _aware
from configuration.database import create_tables

if TYPE_CHECKING:
    import httpx

    from configuration import Settings

LOG = logging.getLogger(__name__)
BATCH = 20  # deliveries created or claimed per look
MAX_ERROR_CHARS = 200


class DeliveryStore:
    """The `scoring_webhook_deliveries` table, beside the tasks."""

    def __init__(
        self, tasks: TaskStore, *, max_attempts: int, backoff_s: float, backoff_cap_s: float
    ) -> None:
        self.tasks = tasks
        self.engine = tasks.engine
        self.clock: Callable[[], datetime] = tasks.clock
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.backoff_cap_s = backoff_cap_s
        self.lease = tasks.lease
        self.table = Table(
            "scoring_webhook_deliveries",
            tasks.metadata,
            Column("id", String(40), primary_key=True),  # the webhook-id header
            Column("task_id", String(36), nullable=False, index=True),
            Column("seq", Integer, nullable=False),  # the task event delivered
            Column("event", String(16), nullable=False),
            Column("url", Text, nullable=False),
            Column("payload", Text, nullable=False),
            # pending (waiting for next_attempt_at), sending (leased), delivered, failed
            Column("status", String(12), nullable=False),
            Column("attempts", Integer, nullable=False),
            Column("next_attempt_at", DateTime(timezone=True), nullable=False),
            Column("lease_until", DateTime(timezone=True)),
            Column("log", Text, nullable=False),  # JSON list: one entry per attempt
            Column("delivered_at", DateTime(timezone=True)),
            UniqueConstraint("task_id", "seq"),
        )
        create_tables(self.engine, self.table)

    def enqueue(self) -> int:
        """A pending delivery for each subscribed terminal event that has none yet; how many.
        Replicas may race: the unique (task, event) keeps one."""
        e, w, d = self.tasks.events.c, self.tasks.webhooks.c, self.table.c
        with self.engine.connect() as conn:
            due = conn.execute(
                select(e.task_id, e.seq, e.kind, e.data, w.url, w.events)
                .join(self.tasks.webhooks, w.task_id == e.task_id)
                .outerjoin(self.table, (d.task_id == e.task_id) & (d.seq == e.seq))
                .where(e.kind.in_(TERMINAL_EVENTS) & d.id.is_(None))
                .limit(BATCH)
            ).all()
        created = 0
        for row in due:
            if row.kind not in row.events.split(","):
                continue
            moment = self.clock()
            payload = {
                "type": f"task.{row.kind}",
                "timestamp": moment.isoformat(),
                "data": json.loads(row.data),
            }
            try:
                with self.engine.begin() as conn:
                    conn.execute(
                        insert(self.table).values(
                            id=f"msg_{uuid.uuid4().hex}",
                            task_id=row.task_id,
                            seq=row.seq,
                            event=row.kind,
                            url=row.url,
                            payload=to_json(payload).decode(),
                            status="pending",
                            attempts=0,
                            next_attempt_at=moment,
                            log="[]",
                        )
                    )
                created += 1
            except IntegrityError:  # another replica created it
                pass
        return created

    def claim(self) -> Any | None:
        """The oldest due delivery, now leased to the caller (a conditional update only one
        caller wins): pending and due, or sending under an expired lease (its sender died)."""
        d = self.table.c
        moment = self.clock()
        claimable = ((d.status == "pending") & (d.next_attempt_at <= moment)) | (
            (d.status == "sending") & (d.lease_until < moment)
        )
        with self.engine.begin() as conn:
            candidate = conn.execute(
                select(d.id).where(claimable).order_by(d.next_attempt_at).limit(1)
            ).scalar_one_or_none()
            if candidate is None:
                return None
            won = conn.execute(
                update(self.table)
                .where((d.id == candidate) & claimable)
                .values(status="sending", attempts=d.attempts + 1, lease_until=moment + self.lease)
            ).rowcount
            if won != 1:
                return None
            return conn.execute(select(self.table).where(d.id == candidate)).one()

    def record(self, delivery_id: str, status_code: int | None, error: str | None) -> str:
        """Record an attempt; the delivery's new status (delivered, pending: retried later,
        failed: no attempt left)."""
        d = self.table.c
        moment = self.clock()
        with self.engine.begin() as conn:
            row = conn.execute(select(d.attempts, d.log).where(d.id == delivery_id)).one()
            log = [*json.loads(row.log), {"at": moment.isoformat(), "status_code": status_code}]
            if error is not None:
                log[-1]["error"] = error[:MAX_ERROR_CHARS]
            values: dict[str, Any] = {"log": json.dumps(log), "lease_until": None}
            if status_code is not None and 200 <= status_code < 300:
                values.update(status="delivered", delivered_at=moment)
            elif row.attempts >= self.max_attempts:
                values.update(status="failed")
            else:
                wait = min(self.backoff_s * 2 ** (row.attempts - 1), self.backoff_cap_s)
                values.update(status="pending", next_attempt_at=moment + timedelta(seconds=wait))
            conn.execute(update(self.table).where(d.id == delivery_id).values(**values))
        return str(values["status"])

    def of_task(self, task_id: str) -> list[dict[str, Any]]:
        """The task's deliveries as GET /v1/tasks/{id} shows them."""
        d = self.table.c
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(self.table).where(d.task_id == task_id).order_by(d.seq)
            ).all()
        return [
            {
                "webhook_id": row.id,
                "event": row.event,
                "status": "pending" if row.status == "sending" else row.status,
                "attempts": json.loads(row.log),
                "next_attempt_at": None
                if row.status in ("delivered", "failed")
                else _iso(row.next_attempt_at),
                "delivered_at": _iso(row.delivered_at),
            }
            for row in rows
        ]

    def purge(self) -> None:
        """Deliveries of tasks that no longer exist (past their retention)."""
        ids = select(self.tasks.table.c.id)
        with self.engine.begin() as conn:
            conn.execute(delete(self.table).where(self.table.c.task_id.not_in(ids)))


def _iso(value: datetime | None) -> str | None:
    return None if value is None else _aware(value).isoformat()


class WebhookSender:
    """Runs in each API worker: creates the deliveries of new terminal events, claims due ones
    and sends each, signed, to the address its URL resolves to now (checked again: DNS may have
    changed since the submit), without following redirects."""

    def __init__(self, store: DeliveryStore, settings: Settings) -> None:
        from standardwebhooks import Webhook

        assert settings.webhook_secret is not None
        self.store = store
        self.settings = settings
        self.signer = Webhook(settings.webhook_secret.get_secret_value())
        self.allowlist = tuple(settings.webhook_allowed_hosts)

    async def run(self) -> None:
        import httpx

        timeout = httpx.Timeout(
            self.settings.webhook_read_timeout_s, connect=self.settings.webhook_connect_timeout_s
        )
        purged_at = 0.0
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=False) as client:
            while True:
                try:
                    if time.monotonic() - purged_at > self.settings.task_retention_s / 24:
                        purged_at = time.monotonic()
                        await asyncio.to_thread(self.store.purge)
                    await asyncio.to_thread(self.store.enqueue)
                    while (delivery := await asyncio.to_thread(self.store.claim)) is not None:
                        await self.send(client, delivery)
                except Exception:  # the database is unreachable: try again later
                    LOG.exception("webhook deliveries unavailable")
                await asyncio.sleep(self.settings.webhook_poll_s)

    async def send(self, client: httpx.AsyncClient, delivery: Any) -> None:
        import httpx

        status_code: int | None = None
        error: str | None = None
        try:
            target = await check_url(delivery.url, self.allowlist)
            moment = self.store.clock()
            headers = {
                "webhook-id": delivery.id,
                "webhook-timestamp": str(int(moment.timestamp())),
                "webhook-signature": self.signer.sign(delivery.id, moment, delivery.payload),
                "content-type": "application/json",
                "host": target.host if target.port in (80, 443) else f"{target.host}:{target.port}",
            }
            response = await client.post(
                target.pinned_url(),
                content=delivery.payload.encode(),
                headers=headers,
                extensions={"sni_hostname": target.host},
            )
            status_code = response.status_code
            if not 200 <= status_code < 300:
                error = f"answered {status_code}"
        except RefusedURL as exc:
            error = str(exc)
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        status = await asyncio.to_thread(self.store.record, delivery.id, status_code, error)
        LOG.info(
            "webhook %s (task %s, %s): %s",
            delivery.id,
            delivery.task_id,
            delivery.event,
            status if error is None else f"{status} ({error})",
        )
        metrics.webhook_deliveries().labels(
            outcome={"delivered": "sent", "pending": "retried", "failed": "failed"}[status]
        ).inc()
