"""Stopping a real `bentoml serve`: workers exit when their server process is killed (the port
is free again), SIGTERM drains (`/readyz` 503 at once, requests answered for SCORING_DRAIN_S),
SIGINT stops at once, and `/readyz` follows the runners (503 while one is unreachable). The
Kubernetes manifest's grace period covers the drain."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from subprocess import Popen
from urllib.parse import urlparse

import httpx
import psutil
import pytest
import yaml

from .harness import PROJECT, free_port, serving


def alive(process: psutil.Process) -> bool:
    """Running (an exited orphan may linger as a zombie until something reaps it)."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def worker(process: Popen, service: str) -> psutil.Process:
    """The worker process of `service` ("scoring" for the API) under a server."""
    for child in psutil.Process(process.pid).children():
        cmdline = child.cmdline()
        if "--service-name" in cmdline and cmdline[cmdline.index("--service-name") + 1] == service:
            return child
    raise AssertionError(f"no {service} worker under {process.pid}")


@pytest.mark.e2e
def test_workers_exit_with_a_killed_server_and_sigint_stops_at_once(demo_models, tmp_path):
    """`kill -9` of the server process: every worker (API and runners) exits within seconds,
    and a new server binds the same port. SIGINT (Ctrl-C) stops it without the drain, and
    BentoML's clean-up (the runners' socket folder) still runs."""
    port = free_port()
    with serving(tmp_path / "killed.log", port=port) as (_, process):
        workers = psutil.Process(process.pid).children(recursive=True)
        assert len(workers) == 3  # the API, the preprocessor and the model
        process.send_signal(signal.SIGKILL)
        process.wait()
        killed = time.monotonic()
        while any(alive(w) for w in workers) and time.monotonic() - killed < 5:
            time.sleep(0.1)
        survivors = [w.pid for w in workers if alive(w)]
        assert not survivors, (
            f"workers still running 5 s after their server was killed: {survivors}"
        )
        print(f"workers gone {time.monotonic() - killed:.2f} s after the kill")

    drain = {"SCORING_DRAIN_S": "5"}
    with serving(tmp_path / "again.log", drain, port=port) as (base, process):
        assert httpx.get(f"{base}/readyz", timeout=5).status_code == 200
        runner_map = json.loads(worker(process, "scoring").environ()["BENTOML_RUNNER_MAP"])
        sockets = [Path(urlparse(uri).path) for uri in runner_map.values() if "file:" in uri]
        assert len(sockets) == 2 and all(path.exists() for path in sockets)
        started = time.monotonic()
        process.send_signal(signal.SIGINT)
        process.wait(timeout=15)
        stopped = time.monotonic() - started
        print(f"SIGINT: stopped in {stopped:.2f} s")
        assert stopped < 4  # not the 5 s drain
        assert not sockets[0].parent.exists()  # BentoML's clean-up ran, after the workers


@pytest.mark.e2e
def test_sigterm_drains_keep_alive_traffic_then_stops(demo_models, churn, tmp_path):
    """SIGTERM under concurrency-8 keep-alive load: /readyz 503 at once, every request sent
    within SCORING_DRAIN_S answered, then the listener closes and the server exits."""
    drain_s = 3.0
    row = dict(churn.examples[0])
    # (sent, done, the status, the fallback's reason, or the exception's name) per request
    outcomes: list[tuple[float, float, int | str]] = []
    stopping = threading.Event()

    def load(base: str) -> None:
        with httpx.Client(base_url=base, timeout=15) as client:
            while not stopping.is_set():
                sent = time.monotonic()
                try:
                    response = client.post("/v1/predict", json={"instance": row})
                    result: int | str = response.status_code
                    if result == 200 and response.json()["prediction"]["source"] != "model":
                        result = response.json()["prediction"]["fallback_reason"]
                except httpx.HTTPError as exc:
                    result = type(exc).__name__
                    time.sleep(0.01)  # connection refused: do not spin
                outcomes.append((sent, time.monotonic(), result))

    with serving(tmp_path / "serve.log", {"SCORING_DRAIN_S": str(drain_s)}) as (base, process):
        threads = [threading.Thread(target=load, args=(base,)) for _ in range(8)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(1.0)
            sigterm = time.monotonic()
            process.send_signal(signal.SIGTERM)
            not_ready: float | None = None
            with httpx.Client(timeout=0.5) as probe:
                while not_ready is None and time.monotonic() - sigterm < 2:
                    try:
                        if probe.get(f"{base}/readyz").status_code == 503:
                            not_ready = time.monotonic() - sigterm
                    except httpx.HTTPError:
                        pass
                    time.sleep(0.02)
            process.wait(timeout=drain_s + 15)
            exited = time.monotonic() - sigterm
        finally:
            stopping.set()
            for thread in threads:
                thread.join(timeout=30)

    before = [o for o in outcomes if o[0] < sigterm]
    during = [o for o in outcomes if sigterm <= o[0] < sigterm + drain_s]
    failed = [o for o in during if o[2] != 200]
    answered = [o for o in outcomes if o[0] >= sigterm and o[2] == 200]
    last_answer = max((o[1] for o in answered), default=sigterm) - sigterm
    after = Counter(o[2] for o in outcomes if o[0] >= sigterm + drain_s)
    print(
        f"drain: {len(before)} requests before SIGTERM, {len(during)} sent during the drain, "
        f"{len(answered)} answered by the model after SIGTERM (the last {last_answer:.2f} s "
        f"after it), {len(failed)} failed; /readyz 503 after {not_ready} s; exited after "
        f"{exited:.2f} s; sent after the drain: {dict(after)}"
    )
    assert {o[2] for o in before} == {200}
    assert not failed, failed[:5]
    assert len(during) > 50 and last_answer >= drain_s - 0.2
    assert not_ready is not None and not_ready < 0.5
    assert exited < drain_s + 5


@pytest.mark.e2e
def test_readyz_follows_the_runners(demo_models, churn, tmp_path):
    """/readyz answers 503 within ~1 s of a runner worker's death, 200 once it is back."""
    with serving(tmp_path / "serve.log") as (base, process):
        preprocessor = worker(process, "preprocessor")
        with httpx.Client(timeout=0.5) as probe:

            def status() -> int | None:
                try:
                    return probe.get(f"{base}/readyz").status_code
                except httpx.HTTPError:  # no answer within 0.5 s
                    return None

            assert status() == 200
            preprocessor.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            not_ready: float | None = None
            while not_ready is None and time.monotonic() - killed < 3:
                if status() == 503:
                    not_ready = time.monotonic() - killed
                time.sleep(0.02)
            print(f"/readyz 503 {not_ready} s after the preprocessor was killed")
            assert not_ready is not None and not_ready < 1.0
            while status() != 200:  # the arbiter respawns the worker (outside a container)
                assert time.monotonic() - killed < 60, "not ready again within 60 s"
                time.sleep(0.1)
            print(f"/readyz 200 again {time.monotonic() - killed:.2f} s after the kill")
        assert worker(process, "preprocessor").pid != preprocessor.pid
        response = httpx.post(
            f"{base}/v1/predict", json={"instance": churn.examples[0]}, timeout=30
        )
        assert response.status_code == 200
        assert response.json()["prediction"]["source"] == "model"


def test_the_manifest_grace_period_covers_the_drain():
    """Kubernetes SIGKILLs a pod terminationGracePeriodSeconds after its SIGTERM: the API's
    drain, the runners' longer one and the requests in flight must fit in it."""
    from configuration import Settings
    from runners.lifecycle import runner_drain_s

    manifest = (PROJECT / "deploy" / "kubernetes.yaml").read_text()
    docs = {doc["kind"]: doc for doc in yaml.safe_load_all(manifest)}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"][8:].lower(): e["value"] for e in container["env"] if "value" in e}
    settings = Settings(**{k: v for k, v in env.items() if k in Settings.model_fields})
    assert settings.drain_s == Settings.model_fields["drain_s"].default == 5
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]  # before the SIGTERM
    assert pre_stop < settings.drain_s  # a short wait: the drain does the rest
    needed = pre_stop + runner_drain_s(settings) + settings.request_timeout_s + 5  # + the stop
    assert pod["terminationGracePeriodSeconds"] >= needed


def test_runners_drain_longer_than_the_api_unless_it_does_not_drain():
    from configuration import Settings
    from runners.lifecycle import runner_drain_s

    assert runner_drain_s(Settings(drain_s=5, inference_deadline_ms=2000)) == 7
    assert runner_drain_s(Settings(drain_s=0)) == 0
