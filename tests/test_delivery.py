"""The store side of told results, without a process: task events (chunks as they are stored,
one terminal event, resume after a crash), webhook deliveries (one per event, exclusive
claims, backoff, attempts recorded) and the SSRF guard. (Real clients: test_e2e_delivery.py.)"""

from __future__ import annotations

import asyncio
import ipaddress
import json

import pytest

from api.egress import RefusedURL, address_refusal, check_url, host_allowed
from api.tasks import LostLease, TaskStore, TaskWorker
from api.webhooks import DeliveryStore

from .test_tasks import LEASE_S, Clock, store, url  # noqa: F401  (fixtures)

BACKOFF_S = 2.0


@pytest.fixture
def clock() -> Clock:
    return Clock()


def body(rows: list[int], bad: tuple[int, ...] = ()) -> dict:
    """A predict_batch body for `rows`: row r answers {"r": r}; `bad` positions are errors."""
    return {
        "predictions": [None if i in bad else {"r": r} for i, r in enumerate(rows)],
        "errors": [{"index": i, "code": "invalid_input", "message": "x"} for i in bad],
        "model": {"name": "m"},
        "contract_version": 4,
    }


def kinds(tasks: TaskStore, task_id: str) -> list[str]:
    return [e.kind for e in tasks.events_after(task_id, 0, limit=1000)]


def test_chunks_are_events_as_stored_and_the_result_merges_them(url, store):  # noqa: F811
    tasks = store(url)
    task, _ = tasks.submit(b"[]", 5, None)
    tasks.claim()
    tasks.store_chunk(task.id, 0, body([0, 1, 2], bad=(1,)), 5)
    assert tasks.rows_stored(task.id) == 3
    first = tasks.events_after(task.id, 0)
    assert [(e.seq, e.kind) for e in first] == [(1, "predictions"), (2, "progress")]
    assert json.loads(first[1].data) == {"rows_done": 3, "rows_total": 5}
    tasks.store_chunk(task.id, 3, body([3, 4], bad=(0,)), 5)
    with pytest.raises(LostLease):  # a second worker storing the same chunk
        tasks.store_chunk(task.id, 3, body([3, 4]), 5)
    result = tasks.stored_result(task.id)
    assert result["predictions"] == [{"r": 0}, None, {"r": 2}, None, {"r": 4}]
    assert [e["index"] for e in result["errors"]] == [1, 3]  # from the task's start
    tasks.finish(task.id, json.dumps(result), errors=2)
    tasks.finish(task.id, json.dumps(result), errors=2)  # not running any more: no new event
    assert kinds(tasks, task.id) == ["predictions", "progress"] * 2 + ["completed"]
    assert [e.seq for e in tasks.events_after(task.id, 4)] == [5]  # Last-Event-ID: 4


def test_a_failed_task_ends_with_one_failed_event(url, store, clock):  # noqa: F811
    tasks = store(url, max_attempts=2, clock=clock)
    crashed, _ = tasks.submit(b"[1]", 1, None)
    tasks.claim()
    tasks.retry_or_fail(crashed.id, "boom")  # attempts remain: queued, no event
    assert kinds(tasks, crashed.id) == []
    tasks.claim()
    clock.advance(LEASE_S + 1)  # its worker died twice: given up
    assert tasks.claim() is None
    assert kinds(tasks, crashed.id) == ["failed"]


def test_a_new_attempt_resumes_after_the_stored_chunks(url, store, clock):  # noqa: F811
    tasks = store(url, clock=clock)
    tasks.submit(json.dumps(list(range(7))).encode(), 7, None)
    task_id, _ = tasks.claim()  # type: ignore[misc]
    tasks.store_chunk(task_id, 0, body([0, 1, 2]), 7)  # the first worker died after a chunk
    clock.advance(LEASE_S + 1)
    scored: list[list[int]] = []

    async def score(rows: list) -> dict:
        scored.append(rows)
        return body(rows)

    claimed = tasks.claim()
    assert claimed is not None
    asyncio.run(TaskWorker(tasks, score, chunk_rows=3, poll_s=1).work(*claimed))
    assert scored == [[3, 4, 5], [6]]  # never the stored chunk again
    assert tasks.get(task_id).status == "succeeded"  # type: ignore[union-attr]
    result = json.loads(tasks.result(task_id) or "{}")
    assert [p["r"] for p in result["predictions"]] == list(range(7))
    assert kinds(tasks, task_id).count("predictions") == 3


def deliveries(tasks: TaskStore, clock: Clock) -> DeliveryStore:
    return DeliveryStore(tasks, max_attempts=3, backoff_s=BACKOFF_S, backoff_cap_s=3.0)


def finished_task(tasks: TaskStore, events: tuple[str, ...]) -> str:
    task, _ = tasks.submit(b"[]", 0, None, ("http://127.0.0.1:9/hook", events))
    tasks.claim()
    tasks.store_chunk(task.id, 0, body([]), 0)
    tasks.finish(task.id, "{}")
    return task.id


def test_one_delivery_per_subscribed_event_claimed_by_one_sender(url, store, clock):  # noqa: F811
    tasks = store(url, clock=clock)
    sent = finished_task(tasks, ("completed",))
    finished_task(tasks, ("failed",))  # completed, but only failures were asked for
    replicas = [deliveries(tasks, clock), deliveries(store(url, clock=clock), clock)]
    assert replicas[0].enqueue() == 1 and replicas[1].enqueue() == 0
    claimed = replicas[0].claim()
    assert claimed is not None and claimed.task_id == sent and claimed.event == "completed"
    assert json.loads(claimed.payload)["type"] == "task.completed"
    assert replicas[1].claim() is None  # leased
    clock.advance(LEASE_S + 1)  # its sender died: claimed again, the same webhook id
    again = replicas[1].claim()
    assert again is not None and again.id == claimed.id and again.attempts == 2


def test_failed_attempts_back_off_then_give_up_each_recorded(url, store, clock):  # noqa: F811
    tasks = store(url, clock=clock)
    task_id = finished_task(tasks, ("completed", "failed"))
    store_ = deliveries(tasks, clock)
    store_.enqueue()
    first = store_.claim()
    assert store_.record(first.id, 500, "answered 500") == "pending"
    assert store_.claim() is None  # not due before the backoff
    clock.advance(BACKOFF_S)
    assert store_.record(store_.claim().id, None, "ConnectTimeout") == "pending"
    clock.advance(3.0)  # 2 * BACKOFF_S, capped at 3 s
    assert store_.record(store_.claim().id, 503, "answered 503") == "failed"
    clock.advance(3600)
    assert store_.claim() is None
    (shown,) = store_.of_task(task_id)
    assert shown["status"] == "failed" and shown["next_attempt_at"] is None
    assert [a["status_code"] for a in shown["attempts"]] == [500, None, 503]


def test_a_2xx_delivers(url, store, clock):  # noqa: F811
    tasks = store(url, clock=clock)
    task_id = finished_task(tasks, ("completed",))
    store_ = deliveries(tasks, clock)
    store_.enqueue()
    assert store_.record(store_.claim().id, 204, None) == "delivered"
    assert store_.of_task(task_id)[0]["delivered_at"] is not None


@pytest.mark.parametrize(
    ("host", "allowed"),
    [("hooks.example.com", True), ("a.hooks.example.com", True), ("evil.com", False),
     ("example.com.evil.com", False), ("HOOKS.example.com.", True)],
)  # fmt: skip
def test_the_host_allowlist(host, allowed):
    assert host_allowed(host, ("hooks.example.com", "*.hooks.example.com")) is allowed


@pytest.mark.parametrize(
    "address", ["127.0.0.1", "10.1.2.3", "192.168.0.1", "169.254.1.1", "::1", "fe80::1", "0.0.0.0"]
)
def test_non_public_addresses_need_the_address_itself_listed(address):
    ip = ipaddress.ip_address(address)
    assert address_refusal(ip, ("*",)) is not None
    assert address_refusal(ip, (address,)) is None
    assert address_refusal(ipaddress.ip_address("93.184.216.34"), ()) is None


def test_metadata_addresses_are_never_called():
    for address in ("169.254.169.254", "fd00:ec2::254"):
        ip = ipaddress.ip_address(address)
        assert "metadata" in str(address_refusal(ip, (address, "*")))


@pytest.mark.parametrize(
    ("url_", "reason"),
    [
        ("http://2852039166/hook", "metadata"),  # 169.254.169.254 as one decimal number
        ("http://0xa9fea9fe/hook", "metadata"),
        ("http://evil.example/hook", "allowlist"),
        ("ftp://127.0.0.1/hook", "http(s)"),
        ("http://user:pw@127.0.0.1/hook", "credentials"),
    ],
)
def test_urls_refused_at_submit(url_, reason):
    allowlist = ("127.0.0.1", "2852039166", "0xa9fea9fe")
    with pytest.raises(RefusedURL, match=reason.replace("(", r"\(").replace(")", r"\)")):
        asyncio.run(check_url(url_, allowlist))
    target = asyncio.run(check_url("http://127.0.0.1:8123/hook?x=1", allowlist))
    assert target.pinned_url() == "http://127.0.0.1:8123/hook?x=1"
