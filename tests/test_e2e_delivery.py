"""Results told to real clients by a real `bentoml serve`: server-sent events (httpx-sse),
the WebSocket (websockets), signed webhooks (standardwebhooks) across restarts."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import psutil
import pytest
import websockets
from httpx_sse import connect_sse
from standardwebhooks import Webhook

from .harness import HOST, children, rows, serving, wait_for_status

pytestmark = pytest.mark.e2e
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
METADATA_AS_NUMBER = "2852039166"  # 169.254.169.254 written as one decimal number
TASK_ROWS = 20_000
WS_ROWS = 2_000
MEASURED_ROWS = 100_000
ROW_GAP_S = 0.001


def delivery_env(tmp: Path, **extra: str) -> dict[str, str]:
    return {
        "SCORING_TASK_DATABASE_URL": f"sqlite:///{tmp / 'tasks.db'}",
        "SCORING_TASK_LEASE_S": "3",
        "SCORING_WEBHOOK_SECRET": SECRET,
        "SCORING_WEBHOOK_ALLOWED_HOSTS": json.dumps([HOST, METADATA_AS_NUMBER]),
        "SCORING_WEBHOOK_BACKOFF_S": "2",
        "SCORING_WEBHOOK_POLL_S": "0.2",
        **extra,
    }


@pytest.fixture(scope="module")
def base(demo_models, tmp_path_factory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("delivery")
    with serving(tmp / "serve.log", delivery_env(tmp)) as (url, _):
        yield url


def submit(base: str, instances: list, **extra) -> dict:
    response = httpx.post(f"{base}/v1/tasks", json={"instances": instances, **extra}, timeout=60)
    assert response.status_code == 202, response.text
    return dict(response.json())


def read_events(base: str, task_id: str, last_id: str | None = None, stop_after: int = 0):
    """[(id, event, data)] of the task's stream until its end (or `stop_after` predictions)."""
    headers = {"Last-Event-ID": last_id} if last_id else {}
    seen = []
    with (
        httpx.Client(timeout=60) as client,
        connect_sse(client, "GET", f"{base}/v1/tasks/{task_id}/events", headers=headers) as sse,
    ):
        assert sse.response.headers["content-type"].startswith("text/event-stream")
        for event in sse.iter_sse():
            seen.append((event.id, event.event, json.loads(event.data)))
            chunks = sum(1 for _, kind, _ in seen if kind == "predictions")
            if stop_after and chunks >= stop_after:
                break
    return seen


def chunk_rows(events: list) -> list:
    """The predictions of the `predictions` events, placed at their row indexes."""
    placed: dict[int, object] = {}
    for _, kind, data in events:
        if kind == "predictions":
            for offset, prediction in enumerate(data["predictions"]):
                assert data["start"] + offset not in placed, "a row streamed twice"
                placed[data["start"] + offset] = prediction
    return [placed[i] for i in sorted(placed)]


def test_a_task_streams_progress_and_predictions_and_resumes(base, churn):
    batch = rows(churn, TASK_ROWS, prefix="S")
    batch[123] = {**batch[123], "age": 7}
    task = submit(base, batch)
    assert task["links"]["events"] == f"/v1/tasks/{task['task_id']}/events"
    first = read_events(base, task["task_id"], stop_after=3)  # the client goes away mid-stream
    rest = read_events(base, task["task_id"], last_id=first[-1][0])
    ids = [int(i) for i, _, _ in first + rest]
    assert ids == list(range(1, len(ids) + 1)), "an event missed or repeated across the resume"
    whole = read_events(base, task["task_id"])
    assert [(i, k) for i, k, _ in whole] == [(i, k) for i, k, _ in first + rest]
    assert [k for _, k, _ in whole].count("completed") == 1 and whole[-1][1] == "completed"
    assert "failed" not in [k for _, k, _ in whole]
    progress = [d for _, k, d in whole if k == "progress"]
    assert progress[-1] == {"rows_done": TASK_ROWS, "rows_total": TASK_ROWS}
    assert len(progress) >= 10
    result = httpx.get(f"{base}/v1/tasks/{task['task_id']}/result", timeout=60).json()
    assert chunk_rows(whole) == result["predictions"]
    errors = [e for _, k, d in whole if k == "predictions" for e in d["errors"]]
    assert [e["index"] for e in errors] == [123] and "age" in errors[0]["message"]
    started = time.perf_counter()
    unknown = httpx.get(f"{base}/v1/tasks/nope/events", timeout=10)
    assert unknown.status_code == 404 and time.perf_counter() - started < 1


def test_a_stream_resumes_and_completes_across_a_killed_server(demo_models, churn, tmp_path):
    """The server scoring the task is killed (SIGKILL, workers too) mid-stream; another one on
    the same database takes the task over and the stream, resumed there, completes."""
    env = delivery_env(tmp_path)
    first_server = serving(tmp_path / "first.log", env)
    base, process = first_server.__enter__()
    try:
        task = submit(base, rows(churn, TASK_ROWS, prefix="K"))
        before = read_events(base, task["task_id"], stop_after=2)
    finally:
        for proc in [psutil.Process(process.pid), *children(process)]:
            with suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGKILL)
        first_server.__exit__(None, None, None)
    with serving(tmp_path / "second.log", env) as (other, _):
        after = read_events(other, task["task_id"], last_id=before[-1][0])
        result = httpx.get(f"{other}/v1/tasks/{task['task_id']}/result", timeout=60).json()
    events = before + after
    assert [int(i) for i, _, _ in events] == list(range(1, len(events) + 1))
    assert events[-1][1] == "completed"
    assert chunk_rows(events) == result["predictions"] and len(result["predictions"]) == TASK_ROWS


async def _ws_scores(base: str, batch: list) -> tuple[dict[int, dict], float, float]:
    """Send `batch` one row per message while reading: (answers by index, seconds to the
    first answer, seconds to the last row sent)."""
    answers: dict[int, dict] = {}
    started = time.perf_counter()
    first_answer = last_sent = 0.0
    async with websockets.connect(base.replace("http", "ws") + "/v1/ws") as ws:

        async def send_all() -> None:
            nonlocal last_sent
            for row in batch:  # as a web page sends them: as they come, 1 ms apart
                await ws.send(json.dumps(row))
                await asyncio.sleep(ROW_GAP_S)
            last_sent = time.perf_counter() - started

        sender = asyncio.create_task(send_all())
        while len(answers) < len(batch):
            message = json.loads(await ws.recv())
            if not answers:
                first_answer = time.perf_counter() - started
            answers[message["index"]] = message
        await sender
    return answers, first_answer, last_sent


def test_the_websocket_answers_each_row_as_predict_batch_does(base, churn):
    batch = rows(churn, WS_ROWS, prefix="W")
    answers, first_answer, last_sent = asyncio.run(_ws_scores(base, batch))
    assert first_answer < last_sent, (first_answer, last_sent)
    online = []
    for start in range(0, WS_ROWS, 1000):
        response = httpx.post(
            f"{base}/v1/predict_batch", json={"instances": batch[start : start + 1000]}, timeout=60
        )
        online += response.json()["predictions"]
    assert [answers[i]["prediction"] for i in range(WS_ROWS)] == online
    print(f"websocket: first answer {first_answer * 1000:.0f} ms, last row sent {last_sent:.2f} s")


def test_a_bad_row_is_reported_by_index_and_the_socket_stays_open(base, churn):
    async def session() -> list[dict]:
        async with websockets.connect(base.replace("http", "ws") + "/v1/ws") as ws:
            good = dict(churn.examples[0])
            await ws.send(json.dumps([good, {**good, "age": 7}, good]))
            first = [json.loads(await ws.recv()) for _ in range(3)]
            await ws.send("not json")
            await ws.send(json.dumps(good))
            return first + [json.loads(await ws.recv()) for _ in range(2)]

    messages = asyncio.run(session())
    by_index = {m["index"]: m for m in messages[:3]}
    assert by_index[1]["type"] == "error" and by_index[1]["code"] == "invalid_input"
    assert "age" in by_index[1]["message"]
    assert by_index[0]["type"] == by_index[2]["type"] == "prediction"
    assert messages[3]["code"] == "invalid_json"
    assert messages[4]["type"] == "prediction" and messages[4]["index"] == 3


def test_a_socket_follows_a_task(base, churn):
    task = submit(base, rows(churn, 1500, prefix="F"))

    async def follow() -> list[dict]:
        async with websockets.connect(base.replace("http", "ws") + "/v1/ws") as ws:
            await ws.send(json.dumps({"follow": task["task_id"]}))
            seen = [json.loads(await ws.recv())]
            while seen[-1]["event"] not in ("completed", "failed"):
                seen.append(json.loads(await ws.recv()))
            return seen

    seen = asyncio.run(follow())
    assert [m["id"] for m in seen] == list(range(1, len(seen) + 1))
    assert seen[-1]["event"] == "completed" and seen[-1]["data"]["rows"] == 1500


def server_rss(base: str) -> int:
    port = int(base.rsplit(":", 1)[1])
    for conn in psutil.net_connections("tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == "LISTEN" and conn.pid:
            arbiter = psutil.Process(conn.pid)
            return sum(p.memory_info().rss for p in [arbiter, *arbiter.children(recursive=True)])
    raise AssertionError("no process listens on the server's port")


def test_a_client_that_stops_reading_is_not_read_from(base, churn):
    """A client sends and never reads: the server stops reading it (backpressure), so the
    server's memory stays flat while the client could send 120 MB."""
    message = json.dumps(rows(churn, 200, prefix="R"))  # ~120 kB
    attempted = 1000

    async def flood() -> int:
        sent = 0
        async with websockets.connect(
            # no compression: the bytes sent are the bytes the server would have to hold
            base.replace("http", "ws") + "/v1/ws",
            max_queue=1,
            write_limit=2**16,
            compression=None,
        ) as ws:
            with suppress(TimeoutError):
                async with asyncio.timeout(8):
                    for _ in range(attempted):
                        await ws.send(message)
                        sent += 1
            grown = server_rss(base) - before
            await ws.close()
        return sent, grown

    before = server_rss(base)
    sent, grown = asyncio.run(flood())
    megabytes = grown / 2**20
    print(f"stalled client: {sent} of {attempted} messages sent, server RSS +{megabytes:.1f} MB")
    assert sent < attempted / 4, "the server read everything a non-reading client sent"
    assert megabytes < 80


class Receiver(BaseHTTPRequestHandler):
    """Answers 500 to the first two deliveries, then 200; keeps every request."""

    received: list[tuple[dict, bytes, int]] = []
    times: list[float] = []
    first_seen = threading.Event()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        status = 500 if len(self.received) < 2 else 200
        self.received.append((dict(self.headers), body, status))
        self.times.append(time.time())
        self.first_seen.set()
        self.send_response(status)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_webhooks_are_signed_retried_across_a_restart_and_delivered_once(
    demo_models, churn, tmp_path
):
    receiver = ThreadingHTTPServer((HOST, 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    hook = f"http://{HOST}:{receiver.server_address[1]}/hook"
    env = delivery_env(tmp_path)
    try:
        with serving(tmp_path / "first.log", env) as (base, _):
            for url in ("http://hooks.example.com/x", f"http://{METADATA_AS_NUMBER}/x"):
                refused = httpx.post(
                    f"{base}/v1/tasks", json={"instances": [], "webhook": {"url": url}}
                )
                assert refused.status_code == 403, refused.text
                assert "webhook.url refused" in refused.json()["error"]["message"]
            webhook = {"url": hook, "events": ["completed"]}
            task = submit(base, rows(churn, 300, prefix="H"), webhook=webhook)
            assert Receiver.first_seen.wait(30), "no delivery within 30 s"
        # restarted between the first attempt (500) and the next ones
        with serving(tmp_path / "second.log", env) as (base, _):
            deadline = time.monotonic() + 60
            while (info := wait_for_status(base, task["task_id"], "succeeded"))["webhook"][
                "deliveries"
            ][0]["status"] != "delivered":
                assert time.monotonic() < deadline, info
                time.sleep(0.2)
            metrics = httpx.get(f"{base}/metrics").text
    finally:
        receiver.shutdown()
        receiver.server_close()
    (delivery,) = info["webhook"]["deliveries"]
    assert [a["status_code"] for a in delivery["attempts"]] == [500, 500, 200]
    assert [status for _, _, status in Receiver.received] == [500, 500, 200]
    verifier = Webhook(SECRET)
    for headers, body, _ in Receiver.received:
        payload = verifier.verify(body, {k.lower(): v for k, v in headers.items()})
        assert payload["type"] == "task.completed"
        assert payload["data"]["task_id"] == task["task_id"]
        assert headers["webhook-id"] == delivery["webhook_id"]  # the same id on every retry
    assert 'scoring_webhook_deliveries_total{outcome="sent"} 1.0' in metrics
    finished = datetime.fromisoformat(info["updated_at"]).timestamp()
    print(f"webhook: first attempt {Receiver.times[0] - finished:.2f} s after completion")


def test_delivery_rates_of_a_100k_row_job(base, churn):
    """Not a benchmark: the rates of each pattern in one run, printed for the docs."""
    batch = rows(churn, MEASURED_ROWS, prefix="M")
    requests = [batch[i : i + 1000] for i in range(0, MEASURED_ROWS, 1000)]
    with httpx.Client(base_url=base, timeout=60) as client, ThreadPoolExecutor(2) as pool:
        started = time.perf_counter()
        list(pool.map(lambda r: client.post("/v1/predict_batch", json={"instances": r}), requests))
        batch_rate = MEASURED_ROWS / (time.perf_counter() - started)
    started = time.perf_counter()
    task = submit(base, batch)
    first_event = 0.0
    streamed = 0
    with (
        httpx.Client(timeout=60) as client,
        connect_sse(client, "GET", f"{base}/v1/tasks/{task['task_id']}/events") as sse,
    ):
        for event in sse.iter_sse():
            if event.event == "predictions":
                first_event = first_event or time.perf_counter() - started
                streamed += len(json.loads(event.data)["predictions"])
    sse_rate = streamed / (time.perf_counter() - started)

    async def socket() -> tuple[float, float]:
        answered, first = 0, 0.0
        begun = time.perf_counter()
        async with websockets.connect(base.replace("http", "ws") + "/v1/ws") as ws:

            async def send_all() -> None:
                for request in requests:
                    await ws.send(json.dumps(request))

            sender = asyncio.create_task(send_all())
            while answered < MEASURED_ROWS:
                json.loads(await ws.recv())
                answered += 1
                first = first or time.perf_counter() - begun
            await sender
        return MEASURED_ROWS / (time.perf_counter() - begun), first

    ws_rate, ws_first = asyncio.run(socket())
    assert streamed == MEASURED_ROWS
    print(
        f"{MEASURED_ROWS} rows: predict_batch {batch_rate:,.0f} rows/s (1000-row requests, 2 "
        f"clients); SSE {sse_rate:,.0f} rows/s incl. submit, first chunk {first_event:.2f} s "
        f"after submit; WebSocket {ws_rate:,.0f} rows/s, first prediction {ws_first * 1000:.0f} ms"
    )
