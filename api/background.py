"""The API worker's work beside its requests: the warm-up that makes it ready, the durable task
worker, following the routing an admin call stored, and the drift gauges."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from configuration import Settings

if TYPE_CHECKING:
    from api.routing_table import RoutingTable
    from api.scorer import Scorer
    from api.tasks import TaskStore

LOG = logging.getLogger(__name__)


class Background:
    """`start()` on the worker's start-up, `stop()` on its shutdown; `ready` once the warm-up
    passed."""

    def __init__(
        self,
        settings: Settings,
        scorer: Scorer,
        tasks: TaskStore | None = None,
        routing_table: RoutingTable | None = None,
        score_task_rows: Callable[[list[Any]], Awaitable[dict[str, Any]]] | None = None,
        also: tuple[Callable[[], Coroutine[Any, Any, None]], ...] = (),
    ) -> None:
        self.settings = settings
        self.scorer = scorer
        self.tasks = tasks
        self.routing_table = routing_table
        self.score_task_rows = score_task_rows
        self.also = also  # other loops of the worker's (e.g. the runner probe)
        self.ready = False
        self._running: list[asyncio.Task[None]] = []

    def start(self) -> None:
        from api.tasks import TaskWorker

        loops: list[Coroutine[Any, Any, None]] = [
            self.warm_up(),
            self.update_drift_gauges(),
            *(run() for run in self.also),
        ]
        if self.tasks is not None and self.score_task_rows is not None:
            worker = TaskWorker(
                self.tasks,
                self.score_task_rows,
                self.settings.api_max_batch_rows,
                self.settings.task_poll_s,
            )
            loops.append(worker.run())
        if self.routing_table is not None:
            loops.append(self.follow_routing_table(self.routing_table))
        self._running = [asyncio.create_task(loop) for loop in loops]

    async def stop(self) -> None:
        for task in self._running:
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)

    async def warm_up(self) -> None:
        """Score the use case's examples with every arm through the runners until the models
        answer them all (runners may still be starting). /readyz is 503 until then, and stays
        503 if they never do within `warmup_timeout_s`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.warmup_timeout_s
        problem: str | None = "no attempt"
        while loop.time() < deadline:
            problem = await self.scorer.warm(self.scorer.routing)
            if problem is None:
                self.ready = True
                LOG.info("warm-up passed: the models scored the example rows")
                return
            await asyncio.sleep(0.5)
        LOG.error(
            "warm-up failed within %s s (%s): not ready", self.settings.warmup_timeout_s, problem
        )

    async def follow_routing_table(self, table: RoutingTable) -> None:
        """Apply the routing an admin call stored (through this worker or another, or before a
        restart) once it differs from what this worker serves."""
        while True:
            try:
                spec = await asyncio.to_thread(table.read)
                if spec is not None and spec != self.scorer.routing.spec():
                    routing, seconds = await self.scorer.swap(spec)
                    LOG.info("now serving %s (swapped in %.3f s)", routing.spec(), seconds)
            except Exception:  # an unreadable table or a version that cannot load: keep serving
                LOG.exception("cannot apply the stored routing")
            await asyncio.sleep(self.settings.routing_poll_s)

    async def update_drift_gauges(self) -> None:
        while True:
            await asyncio.sleep(self.settings.drift_update_s)
            try:
                self.scorer.monitor.drift_report()
            except Exception:  # the gauges stay as they were; scoring goes on
                LOG.exception("drift update failed")
