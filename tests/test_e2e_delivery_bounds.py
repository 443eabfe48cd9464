"""The bounds of the delivery routes on a real `bentoml serve` with small limits: a heartbeat on
an idle event stream, the WebSocket's message size and idle timeout closing with RFC 6455
codes and a reason, and WebSocket connections counted against the concurrency limit."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import websockets

from .harness import rows, serving

pytestmark = pytest.mark.e2e
LIMITS = {
    "SCORING_EVENTS_HEARTBEAT_S": "0.5",
    "SCORING_WS_MAX_MESSAGE_BYTES": "2000",
    "SCORING_WS_IDLE_TIMEOUT_S": "1",
    "SCORING_API_MAX_CONCURRENCY": "2",
}


@pytest.fixture(scope="module")
def base(demo_models, tmp_path_factory) -> Iterator[str]:
    tmp: Path = tmp_path_factory.mktemp("bounds")
    env = {"SCORING_TASK_DATABASE_URL": f"sqlite:///{tmp / 'tasks.db'}", **LIMITS}
    with serving(tmp / "serve.log", env) as (url, _):
        yield url


def socket_url(base: str) -> str:
    return base.replace("http", "ws") + "/v1/ws"


def test_an_idle_event_stream_sends_heartbeat_comments(base, churn):
    """A task queued behind a long one has nothing to say for a while: its stream sends
    comment lines (`: ping`) every SCORING_EVENTS_HEARTBEAT_S, then its events."""
    with httpx.Client(base_url=base, timeout=60) as client:
        long = client.post("/v1/tasks", json={"instances": rows(churn, 30_000)}).json()
        queued = client.post("/v1/tasks", json={"instances": rows(churn, 3)}).json()
        comments, events = 0, []
        with client.stream("GET", f"/v1/tasks/{queued['task_id']}/events") as stream:
            for line in stream.iter_lines():
                if line.startswith(":"):
                    comments += 1
                elif line.startswith("event:"):
                    events.append(line.split(":", 1)[1].strip())
                    if events[-1] in ("completed", "failed"):
                        break
        assert client.get(f"/v1/tasks/{long['task_id']}").json()["status"] == "succeeded"
    assert comments >= 1, "no heartbeat while the task waited"
    assert events[-1] == "completed" and "predictions" in events


def test_a_message_over_the_size_limit_closes_with_1009_and_a_reason(base, churn):
    async def run() -> websockets.frames.Close | None:
        async with websockets.connect(socket_url(base)) as ws:
            await ws.send('{"instances": [' + ",".join(['"' + "x" * 100 + '"'] * 30) + "]}")
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    await asyncio.wait_for(ws.recv(), 10)
            return closed.value.rcvd

    closed = asyncio.run(run())
    assert closed is not None and closed.code == 1009
    assert "2000 bytes" in closed.reason


def test_an_idle_socket_is_closed_normally_with_a_reason(base):
    async def run() -> tuple[websockets.frames.Close | None, float]:
        async with websockets.connect(socket_url(base)) as ws:
            started = time.monotonic()
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)
            return closed.value.rcvd, time.monotonic() - started

    closed, waited = asyncio.run(run())
    assert closed is not None and closed.code == 1000 and "idle" in closed.reason
    assert 0.9 <= waited < 5


def test_sockets_count_against_the_concurrency_limit(base):
    """Two open sockets fill SCORING_API_MAX_CONCURRENCY=2: a third handshake is refused with
    429, and a socket closed frees its place."""

    async def run() -> int:
        first = await websockets.connect(socket_url(base))
        second = await websockets.connect(socket_url(base))
        try:
            with pytest.raises(websockets.InvalidStatus) as refused:
                await websockets.connect(socket_url(base))
        finally:
            await second.close()
        await asyncio.sleep(0.2)
        third = await websockets.connect(socket_url(base))  # raises if the place stayed taken
        await third.close()
        await first.close()
        return refused.value.response.status_code

    assert asyncio.run(run()) == 429
