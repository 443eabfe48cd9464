"""How the worker processes of `bentoml serve` start and stop, for the API and the runners alike.

`bentoml serve` runs a circus arbiter (the server process) that starts one worker per service,
each in a session of its own, and on SIGTERM or SIGINT sends SIGTERM to every worker at once
(no SIGKILL before BentoML's graceful_timeout, a day). Here:
- a worker exits when its server process disappears (`kill -9` of it would otherwise leave the
  workers serving and holding the port);
- a worker drains on SIGTERM: `draining()` turns True at once (the API's /readyz answers 503)
  and uvicorn's own SIGTERM handling (close the listener, finish the requests in flight, exit)
  runs `drain_s` later; the runners drain longer, so that they answer while the API does;
- Ctrl-C (SIGINT to the server process) stops the workers with SIGINT, which they obey at once;
- the runners' Unix sockets stay until the workers have stopped (BentoML deletes them first);
- the API caches whether its runners answer (`RunnerProbe`), for /readyz.

Nothing here runs outside a worker: the server process only imports the services, and tests
build them in-process."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import suppress
from types import FrameType
from typing import Any

import bentoml

from configuration import Settings

LOG = logging.getLogger(__name__)
# A worker's parent is its server process. Read when the worker imports the services, before
# its models load, so that a server killed during the load is noticed too.
SERVER_PID = os.getppid()
PARENT_POLL_S = 0.5  # how often a worker checks that its server process is still there
EXIT_GRACE_S = 3.0  # then how long its orderly stop may take before it exits regardless


class _State:
    started = False
    draining = False


_STATE = _State()


def in_worker() -> bool:
    """Whether this process is a worker of `bentoml serve` (not its server process, and not a
    test's in-process service)."""
    return bentoml.server_context.worker_index is not None


def draining() -> bool:
    """True from the SIGTERM on: this worker still serves, but should get no new traffic."""
    return _STATE.draining


def runner_drain_s(settings: Settings) -> float:
    """A runner's drain: the API's, plus the inference deadline of the calls the API's last
    requests may still make (0 when the API does not drain)."""
    if settings.drain_s <= 0:
        return 0.0
    return settings.drain_s + settings.inference_deadline_ms / 1000


def settle_heap(young_objects: int) -> None:
    """Call once a worker has loaded what it keeps: `gc.freeze()` leaves those objects out of
    every future collection, and the youngest generation is collected every `young_objects`
    allocations instead of Python's 700 (with requests of hundreds of short-lived objects, the
    collections cost the API worker ~17% of its throughput: docs/performance.md)."""
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(young_objects, middle, oldest)


def start_worker(drain_s: float) -> None:
    """Call at the end of a service's `__init__` (BentoML builds the instance in the worker's
    main thread, inside its event loop, after uvicorn installed its signal handlers): in a
    worker, exit with the server process and drain `drain_s` seconds on SIGTERM; elsewhere,
    nothing."""
    if not in_worker() or _STATE.started:
        return
    _STATE.started = True
    exit_with_server()
    drain_on_sigterm(drain_s)


def exit_with_server() -> None:
    """A daemon thread that stops this worker once its server process is gone (the worker is
    then re-parented): SIGINT, which uvicorn obeys at once without the drain (the port must
    be free for the next server), then `os._exit` if the orderly stop hangs."""

    def watch() -> None:
        while os.getppid() == SERVER_PID:
            time.sleep(PARENT_POLL_S)
        LOG.warning("the server process (pid %d) is gone: this worker stops", SERVER_PID)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(EXIT_GRACE_S)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-server", daemon=True).start()


def drain_on_sigterm(drain_s: float) -> None:
    """Replace the SIGTERM handler (uvicorn's) with one that sets `draining()` at once and
    calls uvicorn's `drain_s` later. A second SIGTERM changes nothing; SIGINT keeps uvicorn's
    handler and stops at once, also during a drain."""
    if drain_s <= 0 or threading.current_thread() is not threading.main_thread():
        return
    stop = signal.getsignal(signal.SIGTERM)
    if not callable(stop):  # not under uvicorn: nothing to defer
        LOG.warning("SIGTERM handler is %r, not uvicorn's: no drain", stop)
        return
    loop = asyncio.get_running_loop()

    def begin() -> None:
        LOG.info("SIGTERM: not ready from now on; serving for %.1f s more, then stopping", drain_s)
        loop.call_later(drain_s, stop, signal.SIGTERM, None)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        # a signal handler: no logging (locks), only a flag and a hand-over to the loop
        if not _STATE.draining:
            _STATE.draining = True
            loop.call_soon_threadsafe(begin)

    signal.signal(signal.SIGTERM, on_sigterm)


def prepare_server_process() -> None:
    """In the server process, before its arbiter starts (a `bentoml.on_deployment` hook)."""
    stop_workers_at_once_on_sigint()
    remove_runner_sockets_last()
    claim_metrics_folder()


_METRICS_LOCK: list[Any] = []  # the open lock file: held for the server process's lifetime


def claim_metrics_folder(folder: str | None = None) -> bool:
    """Warn when another live server uses the same BENTOML_HOME; whether this one is alone.
    BentoML empties the Prometheus multiprocess folder under BENTOML_HOME when a server starts
    (before this hook) and every server then reads all the files in it: two servers on one
    BENTOML_HOME mix their metrics. Each server holds an exclusive lock on a file beside the
    folder (released by the kernel when it exits, SIGKILL included); a second one logs an error
    naming the first's pid. Not a refusal: test suites run throwaway servers side by side."""
    import fcntl

    from bentoml._internal.configuration.containers import BentoMLContainer

    folder = folder or BentoMLContainer.prometheus_multiproc_dir.get()
    lock = open(f"{folder}.lock", "a+")  # noqa: SIM115  # held open until this process exits
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        owner = lock.read().strip() or "?"
        lock.close()
        LOG.error(
            "another `bentoml serve` (pid %s) uses this BENTOML_HOME: its Prometheus "
            "multiprocess folder %s was just emptied, and /metrics of both servers now mixes "
            "their metrics. Give each server its own BENTOML_HOME (docs/scale-out.md).",
            owner,
            folder,
        )
        return False
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    _METRICS_LOCK.append(lock)
    return True


def stop_workers_at_once_on_sigint() -> None:
    """Make Ctrl-C stop the workers with SIGINT instead of circus's SIGTERM, which they would
    drain (and end a drain under way). The workers run in sessions of their own, so the
    terminal's SIGINT reaches only the server process; its circus then stops every watcher
    with the watcher's `stop_signal`."""
    from circus.sighandler import SysHandler

    if not callable(getattr(SysHandler, "handle_int", None)):
        LOG.warning("circus has no SIGINT handler to extend: Ctrl-C drains like SIGTERM")
        return

    def handle_int(handler: Any) -> None:
        arbiter = handler.controller.arbiter
        for watcher in arbiter.iter_watchers():
            watcher.stop_signal = signal.SIGINT
            if getattr(arbiter, "_stopping", False):  # Ctrl-C during a SIGTERM's drain: now
                for process in list(watcher.processes.values()):
                    with suppress(Exception):  # already gone
                        process.send_signal(signal.SIGINT)
        handler.quit()

    SysHandler.handle_int = handle_int  # type: ignore[method-assign]


def remove_runner_sockets_last() -> None:
    """BentoML's arbiter deletes the folder of the runners' Unix sockets as soon as it starts
    to stop, before circus stops the workers: while they drain, the API could not open a new
    connection to a runner (its calls fell back, `model_not_ready`). Run that clean-up once
    the workers are gone instead."""
    from bentoml._internal.utils.circus import Arbiter
    from circus.arbiter import Arbiter as CircusArbiter

    if getattr(Arbiter, "_cleanup_last", False):
        return
    start = Arbiter.start

    def start_then_clean_up(arbiter: Any, cb: Any = None) -> None:
        try:
            start(arbiter, cb)  # returns once the arbiter has stopped every worker
        finally:
            arbiter.exit_stack.__exit__(None, None, None)

    def stop(arbiter: Any) -> Any:  # BentoML's, without the early clean-up
        return CircusArbiter.stop(arbiter)

    Arbiter.start = start_then_clean_up  # type: ignore[method-assign,assignment]
    Arbiter.stop = stop  # type: ignore[method-assign,assignment]
    Arbiter._cleanup_last = True  # type: ignore[attr-defined]


class RunnerProbe:
    """Whether every runner the API calls answers its /readyz. `run()` asks them every
    `period_s` (each within `timeout_s`: a dead runner worker's socket, held by the server
    process, still accepts connections and never answers); `ready` caches the answer for
    `__is_ready__`, so a load balancer's probe costs no call to the runners. In-process
    (tests), the runners are local objects: always ready."""

    def __init__(
        self,
        runners: Callable[[], Mapping[str, Any]],
        period_s: float = 0.25,
        timeout_s: float = 0.5,
    ) -> None:
        self._runners = runners
        self.period_s = period_s
        self.timeout_s = timeout_s
        self.ready = True

    async def run(self) -> None:
        from _bentoml_impl.client import RemoteProxy

        remote = {n: r for n, r in self._runners().items() if isinstance(r, RemoteProxy)}
        while remote:
            answers = await asyncio.gather(*(self._answers(r) for r in remote.values()))
            silent = [name for name, answered in zip(remote, answers, strict=True) if not answered]
            if silent and self.ready:
                LOG.warning("not ready: no answer from %s", ", ".join(silent))
            elif not silent and not self.ready:
                LOG.info("the runners answer again: ready")
            self.ready = not silent
            await asyncio.sleep(self.period_s)

    async def _answers(self, runner: Any) -> bool:
        try:
            # BentoML's own timeout (which logs a warning each time) later than ours
            ready = runner.is_ready(timeout=2 * self.timeout_s)
            return bool(await asyncio.wait_for(ready, self.timeout_s))
        except Exception:  # no answer in time, refused, reset: not ready
            return False
