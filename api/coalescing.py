"""Natural batching on the caller's side: rows of concurrent requests leave in one runner call.

A request that finds a free slot is sent at once (no timer, so a lone request never waits); rows
that arrive while `max_in_flight` calls are running queue up and leave together as soon as a
slot frees. Under load, batches grow by themselves; at low load, latency is one call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

Rows = Any  # the rows of a request, anything with a len() that `join` concatenates


class Coalescer:
    """`await coalescer(rows)` -> the (len(rows) x k) result of `score` for those rows; the
    rows of the requests that leave together are joined by `join`."""

    def __init__(
        self,
        score: Callable[[Rows], Awaitable[np.ndarray]],
        join: Callable[[list[Rows]], Rows],
        max_rows: int,
        max_in_flight: int,
    ) -> None:
        self.score = score
        self.join = join
        self.max_rows = max_rows
        self.max_in_flight = max_in_flight
        self._queue: list[tuple[Rows, asyncio.Future[np.ndarray]]] = []
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def __call__(self, rows: Rows) -> np.ndarray:
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._queue.append((rows, future))
        if self._in_flight < self.max_in_flight:
            self._launch()
        return await future

    def _launch(self) -> None:
        taken, n_rows = 0, 0
        while taken < len(self._queue) and (
            taken == 0 or n_rows + len(self._queue[taken][0]) <= self.max_rows
        ):
            n_rows += len(self._queue[taken][0])
            taken += 1
        batch, self._queue = self._queue[:taken], self._queue[taken:]
        self._in_flight += 1
        task = asyncio.create_task(self._run(batch))
        self._tasks.add(task)  # keep a reference until done
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[Rows, asyncio.Future[np.ndarray]]]) -> None:
        try:
            result = await self.score(self.join([request_rows for request_rows, _ in batch]))
        except Exception as exc:  # handed to each waiting request, which answers with it
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
        else:
            start = 0
            for request_rows, future in batch:
                if not future.done():  # the request may have been cancelled meanwhile
                    future.set_result(result[start : start + len(request_rows)])
                start += len(request_rows)
        finally:
            self._in_flight -= 1
            if self._queue:
                self._launch()
