"""Production behaviour against real `bentoml serve` processes: the inference deadline,
the concurrency limit (429), readiness after warm-up, and async tasks that survive a kill."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import pytest

from .harness import histogram, metric_total, rows, serving, wait_for_status

pytestmark = pytest.mark.e2e


def test_deadline_concurrency_limit_and_readiness(demo_models, churn, tmp_path):
    """A 5 ms inference deadline and at most 2 requests in progress."""
    env = {"SCORING_INFERENCE_DEADLINE_MS": "5", "SCORING_API_MAX_CONCURRENCY": "2"}
    with serving(tmp_path / "serve.log", env) as (base, _):
        metrics = httpx.get(f"{base}/metrics", timeout=30).text
        # ready means the warm-up rows went through both runners (the deadline does not apply)
        warmed, _ = histogram(metrics, "scoring_runner_batch_rows", runner="xgboost")
        assert warmed >= len(churn.examples)

        started = time.monotonic()
        response = httpx.post(
            f"{base}/v1/predict_batch", json={"instances": rows(churn, 1000)}, timeout=30
        )
        assert response.status_code == 200
        answers = response.json()["predictions"]
        assert {a["fallback_reason"] for a in answers} == {"timeout"}
        assert {a["source"] for a in answers} == {"fallback"}
        assert time.monotonic() - started < 5  # answered at the deadline, not BentoML's 10 s
        metrics = httpx.get(f"{base}/metrics", timeout=30).text
        assert metric_total(metrics, "scoring_fallbacks_total", reason="timeout") >= 1000

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=base, timeout=60) as client:
                body = {"instances": rows(churn, 1000)}
                return await asyncio.gather(
                    *(client.post("/v1/predict_batch", json=body) for _ in range(30))
                )

        statuses = [r.status_code for r in asyncio.run(burst())]
        assert set(statuses) == {200, 429}, statuses
        refused = next(r for r in asyncio.run(burst()) if r.status_code == 429).json()
        assert refused["error"]["code"] == "too_many_requests"
        assert refused["contract_version"] == churn.contract_version
        # the late work finished in the background and the service is healthy
        assert httpx.get(f"{base}/readyz", timeout=30).status_code == 200


def test_tasks_survive_a_kill_of_the_service(demo_models, churn, tmp_path):
    env = {
        "SCORING_TASK_DATABASE_URL": f"sqlite:///{tmp_path / 'tasks.db'}",
        "SCORING_TASK_LEASE_S": "2",
    }
    big = rows(churn, 30_000, prefix="B")
    with serving(tmp_path / "first.log", env) as (base, process):
        small = httpx.post(
            f"{base}/v1/tasks",
            json={"instances": rows(churn, 100, prefix="S")},
            headers={"Idempotency-Key": "small"},
            timeout=30,
        ).json()
        wait_for_status(base, small["task_id"], "succeeded")
        submitted = httpx.post(
            f"{base}/v1/tasks",
            json={"instances": big},
            headers={"Idempotency-Key": "big"},
            timeout=60,
        )
        assert submitted.status_code == 202
        task_id = submitted.json()["task_id"]
        wait_for_status(base, task_id, "running", poll_s=0.02)
        kill_tree(process.pid)
    with serving(tmp_path / "second.log", env) as (base, _):
        kept = httpx.get(f"{base}/v1/tasks/{small['task_id']}/result", timeout=30)
        assert kept.status_code == 200 and len(kept.json()["predictions"]) == 100
        status = wait_for_status(base, task_id, "succeeded", timeout_s=180)
        assert status["attempts"] == 2  # the killed attempt, then this one
        result = httpx.get(f"{base}/v1/tasks/{task_id}/result", timeout=60).json()
        assert [p["key"] for p in result["predictions"]] == [r["customer_id"] for r in big]
        assert result["errors"] == []
        again = httpx.post(
            f"{base}/v1/tasks",
            json={"instances": big},
            headers={"Idempotency-Key": "big"},
            timeout=60,
        )
        assert again.status_code == 200 and again.json()["task_id"] == task_id


def kill_tree(pid: int) -> None:
    """SIGKILL a server and all its processes at once (BentoML's workers run in sessions of
    their own, so a process-group kill would miss them)."""
    import psutil

    parent = psutil.Process(pid)
    processes = [parent, *parent.children(recursive=True)]
    for process in processes:
        process.send_signal(signal.SIGKILL)
    psutil.wait_procs(processes, timeout=10)
