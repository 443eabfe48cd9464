"""Several replicas of the service on loopback, as a scaled-out deployment runs them: each
replica a `bentoml serve` with its own BENTOML_HOME (a copy of one model store), all on one
PostgreSQL database (created for the run, dropped after), behind HAProxy (deploy/haproxy.cfg)
and scraped by Prometheus (deploy/prometheus.yml), both Debian's packages.

No pytest here: `make cluster` (python -m tests.cluster) runs the same cluster for people."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import string
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
from sqlalchemy import text
from sqlalchemy.engine import make_url

from .harness import (
    HOST,
    POSTGRES_URL,
    PROJECT,
    READY_TIMEOUT_S,
    NotReady,
    children,
    connect,
    free_port,
    serve_command,
    start_process,
    stop,
    wait_for_http,
)

DEPLOY = PROJECT / "deploy"
TOOLS = ("haproxy", "prometheus")
SCRAPE_INTERVAL_S = 1


def missing_tools() -> list[str]:
    """The cluster's programs (Debian packages) not installed here."""
    return [tool for tool in TOOLS if shutil.which(tool) is None]


@dataclass
class Replica:
    """One `bentoml serve` of the cluster: its own port, BENTOML_HOME and log files."""

    name: str
    port: int
    home: Path
    env: dict[str, str]
    logs: Path
    process: subprocess.Popen | None = None
    starts: int = 0
    workers: list[psutil.Process] = field(default_factory=list)

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def log(self) -> Path:
        return self.logs / f"{self.name}-{self.starts}.log"

    def start(self) -> None:
        self.starts += 1
        env = {**self.env, "BENTOML_HOME": str(self.home)}
        self.process = start_process(serve_command(self.port), self.log, env)

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> float:
        assert self.process is not None
        waited = wait_for_http(f"{self.base}/readyz", self.process, timeout_s, poll_s=0.25)
        self.workers = children(self.process)
        return waited

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30) -> None:
        """`sig` to the server (SIGTERM drains; SIGINT stops at once); SIGKILL also kills its
        workers at once, as a pod's end does. Whatever is left afterwards is SIGKILLed."""
        if self.process is None:
            return
        leftovers = self.workers + children(self.process)
        if sig == signal.SIGKILL:
            for process in [psutil.Process(self.process.pid), *leftovers]:
                with suppress(psutil.NoSuchProcess):
                    process.send_signal(signal.SIGKILL)
            self.process.wait()
        elif self.process.poll() is None:
            stop(self.process, sig, timeout_s)
        for leftover in leftovers:
            with suppress(psutil.NoSuchProcess):
                leftover.send_signal(signal.SIGKILL)
        self.process, self.workers = None, []


@dataclass
class Cluster:
    replicas: list[Replica]
    lb: str  # the load balancer's base URL
    prometheus: str  # Prometheus's base URL
    database_url: str
    processes: dict[str, subprocess.Popen]
    stats_port: int

    def query(self, promql: str) -> dict:
        """Prometheus's answer to an instant query (`status`, `data` or `error`)."""
        response = httpx.get(
            f"{self.prometheus}/api/v1/query", params={"query": promql}, timeout=30
        )
        return dict(response.json())

    def wait_in_pool(self, replica: Replica, timeout_s: float = 30) -> None:
        """Until HAProxy has checked `replica` up (its health checks: rise 2, every 0.5 s)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.server_state(replica) == "UP":
                return
            time.sleep(0.2)
        raise NotReady(f"{replica.name} not back in the load balancer's pool")

    def server_state(self, replica: Replica) -> str:
        """HAProxy's view of a replica (UP, DOWN, ...), from its stats page."""
        csv = httpx.get(f"http://{HOST}:{self.stats_port}/;csv", timeout=10).text
        for line in csv.splitlines():
            fields = line.split(",")
            if len(fields) > 17 and fields[0] == "replicas" and fields[1] == replica.name:
                return fields[17].split(" ")[0]
        return "?"


def render(template: Path, out: Path, **values: str) -> Path:
    out.write_text(string.Template(template.read_text()).substitute(values))
    return out


@contextmanager
def database(server_url: str = POSTGRES_URL) -> Iterator[str]:
    """A fresh PostgreSQL database on `server_url`'s server, dropped afterwards; its URL."""
    name = f"scoring_cluster_{uuid.uuid4().hex[:12]}"
    admin = make_url(server_url)
    with connect(server_url) as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(
            text(f"CREATE DATABASE {name}")
        )
    try:
        yield admin.set(database=name).render_as_string(hide_password=False)
    finally:
        with connect(server_url) as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(
                text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            )


def copy_store(store: Path, home: Path) -> None:
    """A replica's BENTOML_HOME: the models of `store` (as an image bakes them in), nothing
    else (its Prometheus folder, its lock and its bentos are its own)."""
    home.mkdir(parents=True)
    shutil.copytree(store / "models", home / "models")


def start_haproxy(
    folder: Path, port: int, stats_port: int, replicas: list[Replica]
) -> subprocess.Popen:
    """HAProxy with deploy/haproxy.cfg, and a stats page (which replicas are up) on its own
    port, in a second file of the run only."""
    servers = "\n".join(f"    server {r.name} {HOST}:{r.port}" for r in replicas)
    config = render(
        DEPLOY / "haproxy.cfg", folder / "haproxy.cfg", listen=f"{HOST}:{port}", servers=servers
    )
    stats = folder / "haproxy-stats.cfg"
    stats.write_text(
        f"frontend stats\n    bind {HOST}:{stats_port}\n    stats enable\n    stats uri /\n"
    )
    files = ["-f", str(config), "-f", str(stats)]
    check = subprocess.run(["haproxy", "-c", *files], capture_output=True, text=True, check=False)
    if check.returncode != 0:
        raise RuntimeError(f"haproxy rejected {config}: {check.stdout}{check.stderr}")
    return start_process(["haproxy", "-db", *files], folder / "haproxy.log")


def start_prometheus(folder: Path, port: int, replicas: list[Replica]) -> subprocess.Popen:
    """Prometheus with deploy/prometheus.yml, every replica a target labelled with its name."""
    targets = [{"targets": [f"{HOST}:{r.port}"], "labels": {"replica": r.name}} for r in replicas]
    config = render(
        DEPLOY / "prometheus.yml",
        folder / "prometheus.yml",
        scrape_interval=f"{SCRAPE_INTERVAL_S}s",
        static_configs=json.dumps(targets),
    )
    args = [
        "prometheus",
        f"--config.file={config}",
        f"--storage.tsdb.path={folder / 'prometheus-data'}",
        f"--web.listen-address={HOST}:{port}",
    ]
    return start_process(args, folder / "prometheus.log")


@contextmanager
def cluster(
    folder: Path,
    store: Path,
    env: Mapping[str, str] | None = None,
    *,
    replicas: int = 2,
    api_workers: int = 2,
    server_url: str = POSTGRES_URL,
) -> Iterator[Cluster]:
    """`replicas` replicas (each `api_workers` API workers, its own copy of the model store
    `store`, a BENTOML_HOME) on a fresh PostgreSQL database of `server_url`'s server, behind
    HAProxy, scraped by Prometheus; files and logs in `folder`. Everything is stopped (and the
    database dropped) afterwards, also on failure."""
    if missing := missing_tools():
        raise RuntimeError(
            f"not installed: {', '.join(missing)} (apt-get install {' '.join(missing)})"
        )
    with ExitStack() as stack:
        database_url = stack.enter_context(database(server_url))
        shared = {
            **(env or {}),
            "SCORING_TASK_DATABASE_URL": database_url,
            "SCORING_API_WORKERS": str(api_workers),
        }
        started: list[Replica] = []
        for i in range(1, replicas + 1):
            home = folder / f"r{i}" / "bentoml"
            copy_store(store, home)
            started.append(Replica(f"r{i}", free_port(), home, dict(shared), folder))
        stack.callback(lambda: [r.stop(signal.SIGINT) for r in started])
        for replica in started:  # all at once: they load their models side by side
            replica.start()
        for replica in started:
            replica.wait_ready()
        processes: dict[str, subprocess.Popen] = {}

        def stop_tools() -> None:
            for process in processes.values():
                if process.poll() is None:
                    stop(process, signal.SIGTERM, 10)

        stack.callback(stop_tools)
        lb_port, stats_port, prometheus_port = free_port(), free_port(), free_port()
        processes["haproxy"] = start_haproxy(folder, lb_port, stats_port, started)
        processes["prometheus"] = start_prometheus(folder, prometheus_port, started)
        lb = f"http://{HOST}:{lb_port}"
        prometheus = f"http://{HOST}:{prometheus_port}"
        wait_for_http(f"{lb}/readyz", processes["haproxy"], 30)
        wait_for_http(f"{prometheus}/-/ready", processes["prometheus"], 60)
        running = Cluster(started, lb, prometheus, database_url, processes, stats_port)
        for replica in started:
            running.wait_in_pool(replica)
        yield running


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.cluster",
        description="Replicas of the service behind HAProxy, scraped by Prometheus, on one "
        "PostgreSQL database (docs/scale-out.md); Ctrl-C stops everything.",
    )
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--api-workers", type=int, default=2)
    args = parser.parse_args()

    def stop_cluster(signum: int, frame: object) -> None:
        """Ctrl-C, or SIGTERM, stops everything: further signals are ignored meanwhile. Set
        explicitly, as a shell script's background job starts with SIGINT ignored."""
        for each in (signal.SIGINT, signal.SIGTERM):
            signal.signal(each, signal.SIG_IGN)
        raise KeyboardInterrupt

    for each in (signal.SIGINT, signal.SIGTERM):
        signal.signal(each, stop_cluster)
    from bentoml._internal.configuration.containers import BentoMLContainer

    store = Path(BentoMLContainer.bentoml_home.get())
    folder = Path(tempfile.mkdtemp(prefix="scoring-cluster-"))
    try:
        with cluster(folder, store, replicas=args.replicas, api_workers=args.api_workers) as c:
            for replica in c.replicas:
                print(f"{replica.name}: {replica.base}  (log {replica.log})")
            print(f"load balancer: {c.lb}\nprometheus: {c.prometheus}\ndatabase: {c.database_url}")
            print("Ctrl-C stops the cluster", flush=True)
            with suppress(KeyboardInterrupt):
                while all(r.process is None or r.process.poll() is None for r in c.replicas):
                    time.sleep(1)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    main()
