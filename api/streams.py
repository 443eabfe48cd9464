"""Results told as they are produced: a task's events read from the task store (server-sent
events and WebSocket followers, from any replica), and the scoring WebSocket with its bounds."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from pydantic_core import to_json
from starlette.websockets import WebSocket, WebSocketDisconnect

from api.tasks import TERMINAL_EVENTS, TaskEvent, TaskStore

if TYPE_CHECKING:
    from configuration import Settings

LOG = logging.getLogger(__name__)
# RFC 6455 close codes (1013, "try again later", is in the IANA registry RFC 6455 set up)
NORMAL, GOING_AWAY, UNSUPPORTED_DATA, POLICY, TOO_BIG, INTERNAL, TRY_LATER = (
    1000,
    1001,
    1003,
    1008,
    1009,
    1011,
    1013,
)


async def task_events(
    store: TaskStore, task_id: str, after: int, poll_s: float
) -> AsyncIterator[TaskEvent]:
    """The task's events numbered above `after`, as they are stored, up to and including the
    terminal one; ends early if the task disappears (past its retention)."""
    while True:
        events = await asyncio.to_thread(store.events_after, task_id, after)
        for event in events:
            yield event
            if event.kind in TERMINAL_EVENTS:
                return
        if events:
            after = events[-1].seq
            continue
        if await asyncio.to_thread(store.get, task_id) is None:
            return
        await asyncio.sleep(poll_s)


async def sse_events(store: TaskStore, task_id: str, after: int, poll_s: float):
    """The task's events as sse-starlette events (`id`, `event`, JSON `data`)."""
    from sse_starlette import ServerSentEvent

    async for event in task_events(store, task_id, after, poll_s):
        yield ServerSentEvent(data=event.data, event=event.kind, id=str(event.seq))


ScoreRows = Callable[[list[Any]], Awaitable[dict[str, Any]]]


class ScoringSocket:
    """One WebSocket connection: each text message is a row (an object), a list of rows, or
    `{"follow": task_id, "after": n}`. Rows are numbered from 0 across the connection; each
    answer is sent as soon as its message is scored:
    `{"type": "prediction", "index", "prediction", "model"}` or
    `{"type": "error", "index", "code", "message", "details"}`; followed tasks send
    `{"type": "event", "task_id", "id", "event", "data"}`.

    Bounded: at most `ws_max_in_flight` messages scored or waiting to be sent (the server stops
    reading beyond it, so a client that does not read is not read from), messages up to
    `ws_max_message_bytes` (else close 1009), closed after `ws_idle_timeout_s` with nothing
    received or in flight (1000)."""

    def __init__(
        self, websocket: WebSocket, score: ScoreRows, store: TaskStore, settings: Settings
    ) -> None:
        self.websocket = websocket
        self.score = score
        self.store = store
        self.settings = settings
        self.slots = asyncio.Semaphore(settings.ws_max_in_flight)
        self.outbox: asyncio.Queue[bytes] = asyncio.Queue(settings.ws_max_in_flight)
        self.next_index = 0
        self.running: set[asyncio.Task[None]] = set()

    async def serve(self) -> None:
        await self.websocket.accept()
        sender = asyncio.create_task(self._send_all())
        try:
            await self._read_all()
        except WebSocketDisconnect:
            pass
        finally:
            for task in self.running:
                task.cancel()
            await asyncio.gather(*self.running, return_exceptions=True)
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)

    async def _read_all(self) -> None:
        idle = self.settings.ws_idle_timeout_s
        while True:
            await self.slots.acquire()  # backpressure: no read while the client is behind
            self.slots.release()
            try:
                message = await asyncio.wait_for(self.websocket.receive(), idle)
            except TimeoutError:
                if self.running or not self.outbox.empty():
                    continue
                await self.close(NORMAL, f"idle for {idle:g} s")
                return
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                await self.close(UNSUPPORTED_DATA, "send JSON text messages, not binary")
                return
            if len(text.encode()) > self.settings.ws_max_message_bytes:
                limit = self.settings.ws_max_message_bytes
                await self.close(TOO_BIG, f"a message is at most {limit} bytes")
                return
            await self._handle(text)

    async def _handle(self, text: str) -> None:
        try:
            payload = json.loads(text)
        except ValueError:
            await self._put(
                {
                    "type": "error",
                    "index": None,
                    "code": "invalid_json",
                    "message": "a message must be JSON: a row, a list of rows or "
                    '{"follow": task_id}',
                    "details": [],
                }
            )
            return
        if isinstance(payload, dict) and set(payload) <= {"follow", "after"} and payload:
            self._start(self._follow(payload))
            return
        rows = payload if isinstance(payload, list) else [payload]
        if len(rows) > self.settings.max_batch_rows:
            await self._put(
                {
                    "type": "error",
                    "index": self.next_index,
                    "code": "payload_too_large",
                    "message": f"{len(rows)} rows exceed the cap of {self.settings.max_batch_rows}",
                    "details": [],
                }
            )
            self.next_index += len(rows)
            return
        first, self.next_index = self.next_index, self.next_index + len(rows)
        await self.slots.acquire()
        self._start(self._score(first, rows), holds_slot=True)

    def _start(self, work: Awaitable[None], holds_slot: bool = False) -> None:
        task = asyncio.ensure_future(work)
        self.running.add(task)

        def done(finished: asyncio.Future[None]) -> None:
            self.running.discard(task)
            if holds_slot:
                self.slots.release()
            if not finished.cancelled() and finished.exception() is not None:
                LOG.error("websocket work failed", exc_info=finished.exception())

        task.add_done_callback(done)

    async def _score(self, first: int, rows: list[Any]) -> None:
        body = await self.score(rows)
        errors = {e.index: e for e in body["errors"]}
        for offset, prediction in enumerate(body["predictions"]):
            index = first + offset
            if offset in errors:
                error = errors[offset]
                await self._put(
                    {
                        "type": "error",
                        "index": index,
                        "code": error.code,
                        "message": error.message,
                        "details": error.details,
                    }
                )
            else:
                await self._put(
                    {
                        "type": "prediction",
                        "index": index,
                        "prediction": prediction,
                        "model": body["model"],
                    }
                )

    async def _follow(self, payload: dict[str, Any]) -> None:
        task_id, after = payload.get("follow"), payload.get("after", 0)
        if not isinstance(task_id, str) or not isinstance(after, int):
            await self._put(
                {
                    "type": "error",
                    "index": None,
                    "code": "invalid_input",
                    "message": "follow: a task id (string), after: an event id (integer)",
                    "details": [],
                }
            )
            return
        if await asyncio.to_thread(self.store.get, task_id) is None:
            await self._put(
                {
                    "type": "error",
                    "index": None,
                    "code": "not_found",
                    "message": f"no task {task_id}",
                    "details": [],
                }
            )
            return
        async for event in task_events(self.store, task_id, after, self.settings.events_poll_s):
            await self._put(
                {
                    "type": "event",
                    "task_id": task_id,
                    "id": event.seq,
                    "event": event.kind,
                    "data": json.loads(event.data),
                }
            )

    async def _put(self, message: dict[str, Any]) -> None:
        await self.outbox.put(to_json(message))

    async def _send_all(self) -> None:
        while True:
            message = await self.outbox.get()
            try:
                await self.websocket.send_text(message.decode())
            except (WebSocketDisconnect, RuntimeError):
                return

    async def close(self, code: int, reason: str) -> None:
        # answers already scored are sent first (bounded by the outbox)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained(), self.settings.ws_idle_timeout_s)
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):
            await self.websocket.close(code, reason)

    async def _drained(self) -> None:
        while not self.outbox.empty():
            await asyncio.sleep(0.01)
