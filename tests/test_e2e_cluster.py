"""Scale-out (docs/scale-out.md): two replicas (two API workers each) on one PostgreSQL, behind
HAProxy, scraped by Prometheus (tests/cluster.py). Routing follows across replicas and workers,
tasks run exactly once, a rolling restart fails no request, the metrics add up."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from .cluster import Cluster, Replica, cluster, missing_tools
from .harness import IN_CI, POSTGRES_URL, PROJECT, children, connect, rows, start_process
from .test_e2e_lifecycle import ADMIN, two_versions  # noqa: F401  # the fixture

pytestmark = pytest.mark.e2e
POLL_S = 1.0  # SCORING_ROUTING_POLL_S of the replicas
DRAIN_S = 2.0
LEASE_S = 3.0  # a task whose replica died is claimed again this long after its last renewal


def test_make_cluster_stops_everything_on_ctrl_c(two_versions, tmp_path):  # noqa: F811
    """`make cluster` (python -m tests.cluster): once it says it is up, one Ctrl-C (SIGINT to
    its process group, as a terminal sends it) stops every replica, HAProxy and Prometheus and
    drops its database. Runs before the module's cluster starts (test order)."""
    if missing := missing_tools():
        if IN_CI:
            pytest.fail(f"not installed: {', '.join(missing)}")
        pytest.skip(f"not installed: {', '.join(missing)}")
    log = tmp_path / "make-cluster.log"
    args = [sys.executable, "-m", "tests.cluster", "--replicas", "1", "--api-workers", "1"]
    process = start_process(args, log, two_versions)
    try:
        deadline = time.monotonic() + 240
        while "Ctrl-C stops the cluster" not in log.read_text(errors="replace"):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        database = re.search(r"database: (\S+)", log.read_text())
        assert database
        started = children(process)
        names = {p.name() for p in started}
        assert {"haproxy", "prometheus"} <= names, names
        os.killpg(process.pid, signal.SIGINT)
        began = time.monotonic()
        assert process.wait(timeout=60) == 0, log.read_text()[-3000:]
        took = time.monotonic() - began
        left = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert left == [], left
        with connect(POSTGRES_URL) as conn:
            name = make_url(database[1]).database
            exists = conn.execute(
                text("SELECT count(*) FROM pg_database WHERE datname = :n"), {"n": name}
            ).scalar()
        assert exists == 0
        print(f"\nmake cluster: Ctrl-C stopped {len(started)} processes in {took:.1f} s")
    finally:
        if process.poll() is None:
            process.kill()
        for leftover in children(process):
            leftover.kill()


@pytest.fixture(scope="module")
def replicas(two_versions, postgres_url, tmp_path_factory) -> Iterator[Cluster]:  # noqa: F811
    if missing := missing_tools():
        message = f"not installed: {', '.join(missing)} (.ci/run installs them)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    folder = tmp_path_factory.mktemp("cluster")
    env = {k: v for k, v in two_versions.items() if k not in ("BENTOML_HOME", "SCORING_SEED")} | {
        "SCORING_ROUTING_POLL_S": str(POLL_S),
        "SCORING_DRAIN_S": str(DRAIN_S),
        "SCORING_PREDICTION_LOG_SAMPLE": "0",
        "SCORING_TASK_POLL_S": "0.2",
        "SCORING_TASK_LEASE_S": str(LEASE_S),
        # drift gauges from a few rows, every second: the dashboard test needs one worker's
        # window filled, whichever worker HAProxy and the kernel gave the rows to
        "SCORING_DRIFT_MIN_ROWS": "20",
        "SCORING_DRIFT_UPDATE_S": "1",
    }
    store = Path(two_versions["BENTOML_HOME"])
    with cluster(folder, store, env, replicas=2, api_workers=2, server_url=postgres_url) as c:
        yield c


class Load:
    """Steady traffic through the load balancer in a thread: `clients` concurrent clients,
    each sending 2-row predict_batch requests; every answer (or failure) recorded."""

    def __init__(self, base: str, churn: Any, clients: int = 6) -> None:
        self.base, self.churn, self.clients = base, churn, clients
        self.answers: list[tuple[float, int, set[str]]] = []  # (time, status, versions)
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        async with httpx.AsyncClient(base_url=self.base, timeout=30) as client:

            async def one(i: int) -> None:
                n = 0
                while not self._stop.is_set():
                    row = dict(self.churn.examples[n % 2], customer_id=f"L-{i}-{n}")
                    n += 1
                    try:
                        response = await client.post(
                            "/v1/predict_batch", json={"instances": [row, row]}
                        )
                    except httpx.HTTPError as exc:
                        self.failures.append(repr(exc))
                        continue
                    versions = set()
                    if response.status_code == 200:
                        body = response.json()
                        versions = {p["model_version"] for p in body["predictions"]}
                        versions.add(body["model"]["version"])
                    else:
                        self.failures.append(f"{response.status_code}: {response.text[:200]}")
                    self.answers.append((time.monotonic(), response.status_code, versions))

            await asyncio.gather(*(one(i) for i in range(self.clients)))

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def summary(self) -> str:
        return f"{len(self.answers)} requests, {len(self.failures)} failed"


def served_versions(replica: Replica, churn: Any, until: float) -> list[tuple[float, str]]:
    """(time, version) of requests to `replica` on a new connection each (so that each of its
    API workers answers some), until `until`."""
    seen = []
    with httpx.Client(base_url=replica.base, timeout=10, headers={"Connection": "close"}) as c:
        while time.monotonic() < until:
            body = c.post("/v1/predict", json={"instance": churn.examples[0]}).json()
            seen.append((time.monotonic(), body["prediction"]["model_version"]))
    return seen


def swap_everywhere(c: Cluster, churn: Any, version: str) -> dict[str, float]:
    """PUT the champion through the load balancer while each replica is asked for its version
    over and over: the seconds after the PUT's answer until the last old answer, per replica."""
    until = time.monotonic() + POLL_S + 10
    with ThreadPoolExecutor(len(c.replicas) * 2) as pool:
        probes = [
            (r, pool.submit(served_versions, r, churn, until)) for r in c.replicas for _ in "ab"
        ]
        time.sleep(1)
        put = httpx.put(
            f"{c.lb}/v1/admin/routing", json={"champion": version}, headers=ADMIN, timeout=120
        )
        answered = time.monotonic()
        assert put.status_code == 200, put.text
        seen: dict[str, list[tuple[float, str]]] = {r.name: [] for r in c.replicas}
        for replica, probe in probes:
            seen[replica.name] += probe.result()
    spread = {}
    for name, answers in seen.items():
        answers.sort()
        assert answers[-1][1] == version and len(answers) > 40, (name, answers[-5:])
        old = [t for t, v in answers if v != version]
        spread[name] = round(max(old, default=answered) - answered, 3)
        late = [v for t, v in answers if t > answered + POLL_S + 5]
        assert set(late) == {version}, (name, late)
    spread["swap_s"] = put.json()["swap_s"]
    return spread


def test_routing_follows_across_replicas_and_workers(replicas, churn):
    c = replicas
    with Load(c.lb, churn) as load:
        time.sleep(1)
        to_2 = swap_everywhere(c, churn, "2")
        time.sleep(1)
        back = swap_everywhere(c, churn, "1")
        time.sleep(1)
    print(f"\nrouting propagation (s after the PUT answered): to 2 {to_2}, back {back}")
    print(f"load through the LB during the swaps: {load.summary()}")
    assert load.failures == [] and len(load.answers) > 100
    assert all(len(versions) == 1 for _, _, versions in load.answers), "mixed versions"
    # every API worker of every replica served the new version soon after the PUT: the poll,
    # the follower's own swap (its runners load the version) and a request; on 2 busy cores the
    # first load of a version took up to ~6 s (docs/scale-out.md), later swaps under 1.5 s
    for spread in (to_2, back):
        assert max(v for k, v in spread.items() if k != "swap_s") < POLL_S + 10, spread


def submit(base: str, instances: list[dict], key: str | None = None) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key else {}
    return httpx.post(
        f"{base}/v1/tasks", json={"instances": instances}, headers=headers, timeout=30
    )


def test_tasks_run_exactly_once_across_replicas(replicas, churn):
    c = replicas
    batches = {i: rows(churn, 30, prefix=f"T{i}") for i in range(12)}
    ids: dict[int, str] = {}
    with httpx.Client(base_url=c.lb, timeout=30) as client:  # round-robin through the LB
        for i, batch in batches.items():
            headers = {"Idempotency-Key": f"key-{i}"} if i % 2 else {}
            response = client.post("/v1/tasks", json={"instances": batch}, headers=headers)
            assert response.status_code == 202, response.text
            ids[i] = response.json()["task_id"]
    # the same key sent to both replicas at once: one task
    raced = {i: rows(churn, 30, prefix=f"R{i}") for i in range(6)}
    with ThreadPoolExecutor(2 * len(raced)) as pool:
        answers = {
            i: [pool.submit(submit, r.base, batch, f"race-{i}") for r in c.replicas]
            for i, batch in raced.items()
        }
        for i, futures in answers.items():
            responses = [f.result() for f in futures]
            assert sorted(r.status_code for r in responses) == [200, 202], responses
            (task_id,) = {r.json()["task_id"] for r in responses}
            ids[100 + i] = task_id
            batches[100 + i] = raced[i]
    deadline = time.monotonic() + 90
    with httpx.Client(base_url=c.lb, timeout=30) as client:
        for i, task_id in ids.items():
            while (status := client.get(f"/v1/tasks/{task_id}").json())["status"] != "succeeded":
                assert status["status"] != "failed" and time.monotonic() < deadline, status
                time.sleep(0.2)
            assert status["attempts"] == 1, status
            result = client.get(f"/v1/tasks/{task_id}/result").json()
            direct = client.post("/v1/predict_batch", json={"instances": batches[i]}).json()
            assert [p["probabilities"] for p in result["predictions"]] == [
                p["probabilities"] for p in direct["predictions"]
            ]
    with connect(c.database_url) as conn:
        tasks = conn.execute(text("SELECT count(*), max(attempts) FROM scoring_tasks")).one()
        claims = conn.execute(
            text("SELECT count(*) FROM scoring_task_events WHERE kind = 'completed'")
        ).scalar()
    assert tuple(tasks) == (len(ids), 1) and claims == len(ids), (tasks, claims)
    print(f"\n{len(ids)} tasks over {len(c.replicas)} replicas: 0 double claims")


def task_status(base: str, task_id: str) -> dict:
    return dict(httpx.get(f"{base}/v1/tasks/{task_id}", timeout=30).json())


def task_events(database_url: str, task_id: str, kind: str) -> int:
    with connect(database_url) as conn:
        return int(
            conn.execute(
                text("SELECT count(*) FROM scoring_task_events WHERE task_id = :t AND kind = :k"),
                {"t": task_id, "k": kind},
            ).scalar()
            or 0
        )


def claimer(replicas: list[Replica], task_id: str) -> Replica | None:
    """The replica whose log says one of its workers claimed `task_id`."""
    found = [r for r in replicas if f"task {task_id}: claimed" in r.log.read_text(errors="replace")]
    return found[0] if len(found) == 1 else None


def test_a_task_on_a_killed_replica_is_finished_by_another(replicas, churn):
    """A long task (many chunks) is submitted through the load balancer; once the replica that
    claimed it has stored a chunk, that replica is SIGKILLed (workers and all): the other claims
    the task after the lease, resumes after the last stored chunk, completes it once, and the
    result equals predict_batch's."""
    c = replicas
    instances = rows(churn, 60_000, prefix="K")
    response = submit(c.lb, instances)
    assert response.status_code == 202, response.text
    task_id = response.json()["task_id"]
    deadline = time.monotonic() + 90
    while not task_events(c.database_url, task_id, "progress"):
        assert time.monotonic() < deadline, task_status(c.lb, task_id)
        time.sleep(0.05)
    owner = claimer(c.replicas, task_id)
    assert owner is not None, [r.log for r in c.replicas]
    (other,) = [r for r in c.replicas if r is not owner]
    killed_at = time.monotonic()
    owner.stop(signal.SIGKILL)
    stored = task_events(c.database_url, task_id, "progress")
    status = task_status(other.base, task_id)
    assert status["status"] == "running", status  # killed mid-task, not after it
    deadline = time.monotonic() + 120
    while (status := task_status(other.base, task_id))["status"] != "succeeded":
        assert status["status"] != "failed" and time.monotonic() < deadline, status
        time.sleep(0.2)
    took = time.monotonic() - killed_at
    assert status["attempts"] == 2, status  # the killed attempt, then the other replica's
    assert claimer([other], task_id) is other
    resumed = re.search(
        rf"task {task_id}: claimed by pid \d+, (\d+) of 60000 rows already stored",
        other.log.read_text(errors="replace"),
    )
    assert resumed and int(resumed[1]) > 0  # resumed after the stored chunks, not from row 0
    result = httpx.get(f"{other.base}/v1/tasks/{task_id}/result", timeout=60).json()
    assert len(result["predictions"]) == len(instances) and result["errors"] == []
    sample = instances[::997]
    direct = httpx.post(
        f"{other.base}/v1/predict_batch", json={"instances": sample}, timeout=60
    ).json()
    assert [p["probabilities"] for p in result["predictions"][::997]] == [
        p["probabilities"] for p in direct["predictions"]
    ]
    assert task_events(c.database_url, task_id, "completed") == 1
    print(
        f"\ntask of a SIGKILLed replica ({stored} chunks stored at the kill) finished by the "
        f"other {took:.1f} s after the kill (lease {LEASE_S:.0f} s)"
    )
    owner.start()
    owner.wait_ready()
    c.wait_in_pool(owner)
    c.wait_in_pool(other)


def test_rolling_restart_fails_no_request_and_kill_only_in_flight(replicas, churn):
    c = replicas
    put = httpx.put(f"{c.lb}/v1/admin/routing", json={"champion": "2"}, headers=ADMIN, timeout=60)
    assert put.status_code == 200, put.text
    time.sleep(POLL_S + 2 * put.json()["swap_s"] + 1)
    timings = {}
    with Load(c.lb, churn) as rolling:
        time.sleep(1)
        for replica in c.replicas:  # one at a time: SIGTERM (drain), start, back in the pool
            started = time.monotonic()
            replica.stop(signal.SIGTERM)
            replica.start()
            replica.wait_ready()
            c.wait_in_pool(replica)
            timings[replica.name] = round(time.monotonic() - started, 1)
        time.sleep(1)
    print(f"\nrolling restart: {rolling.summary()}; per replica (s): {timings}")
    assert rolling.failures == [] and len(rolling.answers) > 100, rolling.failures[:5]
    for replica in c.replicas:  # restarted on the stored routing
        model = httpx.get(f"{replica.base}/v1/model", timeout=30).json()
        assert model["serving"]["version"] == "2"

    victim = c.replicas[0]
    with Load(c.lb, churn) as killed:
        time.sleep(2)
        victim.stop(signal.SIGKILL)
        time.sleep(3)
    print(f"SIGKILL of one replica under load: {killed.summary()}: {killed.failures[:3]}")
    # only requests in flight on the killed replica may fail: at most one per client
    assert len(killed.failures) <= killed.clients and len(killed.answers) > 50
    victim.start()
    victim.wait_ready()
    c.wait_in_pool(victim)
    back = httpx.put(f"{c.lb}/v1/admin/routing", json={"champion": "1"}, headers=ADMIN, timeout=60)
    assert back.status_code == 200


def prometheus_sum(c: Cluster, promql: str) -> float:
    answer = c.query(promql)
    assert answer["status"] == "success", answer
    result = answer["data"]["result"]
    return float(result[0]["value"][1]) if result else 0.0


def test_metrics_add_up_in_prometheus(replicas, churn):
    c = replicas
    total = "sum(scoring_predictions_total)"
    up = c.query("up")["data"]["result"]
    assert sorted(s["metric"]["replica"] for s in up if s["value"][1] == "1") == ["r1", "r2"]
    time.sleep(2.5)  # a scrape after the last request of an earlier test
    before = prometheus_sum(c, total)
    sent = 0
    with httpx.Client(base_url=c.lb, timeout=30) as client:
        for i in range(40):
            response = client.post("/v1/predict_batch", json={"instances": rows(churn, 5, f"M{i}")})
            assert response.status_code == 200
            sent += 5
    deadline = time.monotonic() + 15
    while (after := prometheus_sum(c, total)) < before + sent and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(2.5)
    after = prometheus_sum(c, total)
    per_replica = c.query("sum by (replica) (scoring_predictions_total)")["data"]["result"]
    print(f"\nrows sent {sent}; sum over replicas {before} -> {after}; {per_replica}")
    assert after - before == sent
    assert len(per_replica) == len(c.replicas)
    deadline = time.monotonic() + 15  # the next drift update (1 s) and scrape (1 s)
    while not c.query("scoring_drift_psi")["data"]["result"] and time.monotonic() < deadline:
        time.sleep(0.5)

    dashboard = json.loads((PROJECT / "deploy" / "grafana-dashboard.json").read_text())
    empty = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            answer = c.query(target["expr"])
            assert answer["status"] == "success", (panel["title"], answer)
            if not answer["data"]["result"]:
                empty.append(panel["title"])
    print(f"dashboard: {len(dashboard['panels'])} panels evaluated; empty: {empty}")
    # no fallback, no shadow challenger: those panels have no samples to show
    expected_empty = {"Fallbacks/s by reason", "Shadow agreement rate"}
    assert set(empty) <= expected_empty | {"Fallback share"}, empty
