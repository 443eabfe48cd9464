"""The durable task store on SQLite and on a real PostgreSQL: idempotency, exclusive claims,
leases, bounded attempts, retention. (Across a real restart: tests/test_e2e_production.py.)"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from api.tasks import IdempotencyConflict, TaskStore, merge

from .harness import connect

RETENTION_S = 3600.0
LEASE_S = 30.0
CLAIM_PAUSE_TIMEOUT_S = 60
DELIVERY_TABLES = ("scoring_webhook_deliveries", "scoring_task_webhooks", "scoring_task_events")
CLOCK_START = datetime(2030, 1, 1, tzinfo=UTC)  # any instant: a store compares only its own times


class Clock:
    """A clock that stands still until the test moves it: `advance(seconds)`."""

    def __init__(self) -> None:
        self.moment = CLOCK_START

    def __call__(self) -> datetime:
        return self.moment

    def advance(self, seconds: float) -> None:
        self.moment += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'tasks.db'}"
    postgres_url = request.getfixturevalue("postgres_url")
    with connect(postgres_url, begin=True) as conn:
        for table in (*DELIVERY_TABLES, "scoring_tasks"):
            conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
    return postgres_url


@pytest.fixture
def store():
    """store(url, **options) -> a TaskStore, closed after the test."""
    opened: list[TaskStore] = []

    def open_store(url: str, **options) -> TaskStore:
        settings = {"retention_s": RETENTION_S, "lease_s": LEASE_S, "max_attempts": 3, **options}
        opened.append(TaskStore(url, **settings))
        return opened[-1]

    yield open_store
    for tasks in opened:
        tasks.close()


def test_an_idempotency_key_gives_the_same_task_and_refuses_another_payload(url, store):
    tasks = store(url)
    first, created = tasks.submit(b"[1, 2]", 2, "key-1")
    again, created_again = tasks.submit(b"[1, 2]", 2, "key-1")
    assert created and not created_again and again.id == first.id
    with pytest.raises(IdempotencyConflict):
        tasks.submit(b"[3]", 1, "key-1")
    other, created_other = tasks.submit(b"[1, 2]", 2, None)
    assert created_other and other.id != first.id


def test_each_task_is_claimed_by_exactly_one_worker(url, store):
    """Two stores (as two replicas would have) claim from four threads at once."""
    submitted = {store(url).submit(f"[{i}]".encode(), 1, None)[0].id for i in range(40)}
    replicas = [store(url), store(url)]
    claimed: list[str] = []
    lock = threading.Lock()

    def worker(tasks: TaskStore) -> None:
        while (task := tasks.claim()) is not None:
            with lock:
                claimed.append(task[0])
            tasks.finish(task[0], "{}")

    threads = [threading.Thread(target=worker, args=(replicas[i % 2],)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed) == sorted(submitted)  # every task once, none twice


def test_a_task_whose_worker_died_is_claimed_again_then_given_up(url, store, clock):
    tasks = store(url, max_attempts=2, clock=clock)
    task, _ = tasks.submit(b"[1]", 1, None)
    assert tasks.claim() == (task.id, "[1]")
    assert tasks.claim() is None  # leased to the first worker
    clock.advance(LEASE_S + 1)  # the first worker died: its lease expires
    assert tasks.claim() == (task.id, "[1]")
    assert tasks.get(task.id).attempts == 2  # type: ignore[union-attr]
    clock.advance(LEASE_S + 1)  # died again: no attempt left
    assert tasks.claim() is None
    failed = tasks.get(task.id)
    assert failed is not None and failed.status == "failed"
    assert "abandoned after 2 attempts" in str(failed.error)


def test_a_renewed_lease_keeps_the_task(url, store, clock):
    tasks = store(url, clock=clock)
    task, _ = tasks.submit(b"[1]", 1, None)
    tasks.claim()
    for _ in range(3):  # 1.5 leases in all: without the renewals it would have expired
        clock.advance(LEASE_S / 2)
        tasks.renew(task.id)
    assert tasks.claim() is None


def test_a_failed_attempt_is_retried_while_attempts_remain(url, store):
    tasks = store(url, max_attempts=2)
    task, _ = tasks.submit(b"[1]", 1, None)
    tasks.claim()
    tasks.retry_or_fail(task.id, "boom")
    assert tasks.get(task.id).status == "queued"  # type: ignore[union-attr]
    tasks.claim()
    tasks.retry_or_fail(task.id, "boom")
    final = tasks.get(task.id)
    assert final is not None and final.status == "failed" and "after 2 attempts" in str(final.error)


def test_results_are_kept_until_retention_then_deleted(url, store, clock):
    tasks = store(url, clock=clock)
    task, _ = tasks.submit(b"[1]", 1, None)
    tasks.claim()
    tasks.finish(task.id, '{"predictions": [1]}')
    assert tasks.get(task.id).status == "succeeded"  # type: ignore[union-attr]
    assert tasks.result(task.id) == '{"predictions": [1]}'
    clock.advance(RETENTION_S + 1)
    assert tasks.get(task.id) is None
    assert tasks.purge() == 1
    assert tasks.result(task.id) is None


def test_chunk_results_merge_with_row_indexes_from_the_start():
    bodies = [
        {"predictions": [1, None], "errors": [{"index": 1, "code": "invalid_input"}], "m": 1},
        {"predictions": [None, 4], "errors": [{"index": 0, "code": "invalid_input"}], "m": 1},
    ]
    merged = merge(bodies, chunk_rows=2)
    assert merged["predictions"] == [1, None, None, 4]
    assert [e["index"] for e in merged["errors"]] == [1, 2]
    assert merged["m"] == 1


class TestTaskRoutes:
    """In process, through the API service."""

    def test_more_rows_than_the_cap_is_413(self, api_client, churn, monkeypatch):
        import service

        capped = service.SETTINGS.model_copy(update={"task_max_rows": 5})
        monkeypatch.setattr(service, "SETTINGS", capped)
        rows = [dict(churn.examples[0])] * 6
        response = api_client.post("/v1/tasks", json={"instances": rows})
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "payload_too_large"

    def test_a_task_is_scored_like_predict_batch(self, api_client, churn, monkeypatch):
        rows = [dict(churn.examples[i % 2], customer_id=f"T-{i}") for i in range(1200)]
        rows[700] = {**rows[700], "age": 7}
        with monkeypatch.context() as paused:  # the service's worker claims nothing meanwhile
            polled = threading.Event()

            def claim_nothing(tasks: TaskStore) -> None:
                polled.set()

            paused.setattr(TaskStore, "claim", claim_nothing)
            # a poll after the pause began: no claim from before it can still take the task
            assert polled.wait(CLAIM_PAUSE_TIMEOUT_S), "the task worker never polled"
            submitted = api_client.post("/v1/tasks", json={"instances": rows})
            assert submitted.status_code == 202
            task_id = submitted.json()["task_id"]
            early = api_client.get(f"/v1/tasks/{task_id}/result")
            assert early.status_code == 409, early.text  # not finished: no result yet
            assert early.json()["error"]["code"] == "conflict"
            assert api_client.get(f"/v1/tasks/{task_id}").json()["status"] == "queued"
        deadline = time.monotonic() + 60
        while api_client.get(f"/v1/tasks/{task_id}").json()["status"] != "succeeded":
            assert time.monotonic() < deadline, "task not done within 60 s"
            time.sleep(0.1)
        result = api_client.get(f"/v1/tasks/{task_id}/result").json()
        online = api_client.post("/v1/predict_batch", json={"instances": rows[600:800]}).json()
        assert result["predictions"][600:800] == online["predictions"]
        assert [e["index"] for e in result["errors"]] == [700]  # counted from the task's start
        assert result["predictions"][700] is None

    def test_unknown_tasks_are_404(self, api_client):
        for path in ("/v1/tasks/nope", "/v1/tasks/nope/result"):
            response = api_client.get(path)
            assert response.status_code == 404
            assert response.json()["error"]["code"] == "not_found"
