"""The processes tests and benchmarks start: a real `bentoml serve` (start, wait, stop), the
project's CLIs (`python -m training ...`, `python -m batch ...`), the machine's PostgreSQL, and
reading what a served process answers. No pytest here: `python -m benchmarks` uses it too."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine
from sqlalchemy.engine import Connection

PROJECT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
HOST = "127.0.0.1"
SERVICE = "service:Scoring"
POSTGRES_URL = os.environ.get(
    "SCORING_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
CLI_TIMEOUT_S = 600
READY_TIMEOUT_S = 120
STOP_TIMEOUT_S = 20
POLL_S = 0.1
SHOWN_LOG_CHARS = 5000


class NotReady(RuntimeError):
    """A started process exited, or did not answer, before it was ready."""


class Server(NamedTuple):
    """A ready `bentoml serve`: its base URL and its process."""

    base: str
    process: subprocess.Popen


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def start_process(
    args: list[str],
    log: Path,
    env: Mapping[str, str] | None = None,
    *,
    cwd: Path = PROJECT,
    inherit_env: bool = True,
) -> subprocess.Popen:
    """Start `args` in a session of its own, stdout and stderr into `log`; the environment is
    this one's updated with `env` (only `env` without `inherit_env`)."""
    with log.open("wb") as output:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            args,
            cwd=cwd,
            env={**(os.environ if inherit_env else {}), **(env or {})},
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_for_http(
    url: str, process: subprocess.Popen, timeout_s: float, poll_s: float = POLL_S
) -> float:
    """Poll `url` until it answers 200; seconds waited. Raises NotReady on timeout or exit."""
    start = time.monotonic()
    # one client for all polls: `httpx.get` builds a client (and an SSL context) per call, 26 ms
    # of CPU, which at short intervals took half a core from the starting server
    with httpx.Client(timeout=1.0) as client:
        while time.monotonic() - start < timeout_s:
            if process.poll() is not None:
                raise NotReady(f"process exited with {process.returncode} before {url} was ready")
            try:
                if client.get(url).status_code == 200:
                    return time.monotonic() - start
            except httpx.TransportError:
                pass
            time.sleep(poll_s)
    raise NotReady(f"{url} not ready within {timeout_s} s")


def stop(
    process: subprocess.Popen, sig: int = signal.SIGTERM, timeout_s: float = STOP_TIMEOUT_S
) -> None:
    """Send `sig`; SIGKILL if the process has not exited within `timeout_s`."""
    process.send_signal(sig)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def serve_command(port: int, target: str = SERVICE, python: str = sys.executable) -> list[str]:
    """`bentoml serve` of `target` (the project's service, or a Bento's folder) on HOST:`port`."""
    return [python, "-m", "bentoml", "serve", target, "--host", HOST, "--port", str(port)]


def children(process: subprocess.Popen) -> list[psutil.Process]:
    try:
        return psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def show_log(log: Path) -> None:
    """The end of a process's output, when SCORING_TEST_SHOW_LOGS asks for it."""
    if os.environ.get("SCORING_TEST_SHOW_LOGS"):
        print(log.read_text(errors="replace")[-SHOWN_LOG_CHARS:])


@contextmanager
def serving(
    log: Path,
    env: Mapping[str, str] | None = None,
    *,
    port: int | None = None,
    timeout_s: float = READY_TIMEOUT_S,
    poll_s: float = POLL_S,
    cwd: Path = PROJECT,
) -> Iterator[Server]:
    """A ready `bentoml serve` of the service on `port` (default: a free one) with `env` added
    to this environment, its output in `log` (`cwd`: another checkout of the project to serve).
    Stopped afterwards with SIGINT if still running (at once: no drain); whatever is left of it
    then, its workers included, is SIGKILLed. With a BENTOML_HOME set, the server gets a home of
    its own over that one's store (`own_bentoml_home`)."""
    port = port or free_port()
    home = own_bentoml_home({**os.environ, **(env or {})}.get("BENTOML_HOME"), log)
    if home is not None:
        env = {**(env or {}), "BENTOML_HOME": str(home)}
    process = start_process(serve_command(port), log, env, cwd=cwd)
    workers: list[psutil.Process] = []
    try:
        base = f"http://{HOST}:{port}"
        wait_for_http(f"{base}/readyz", process, timeout_s, poll_s)
        workers = children(process)
        yield Server(base, process)
    finally:
        if process.poll() is None:
            workers += children(process)
            stop(process, signal.SIGINT)
        for leftover in workers:
            with suppress(psutil.NoSuchProcess):
                leftover.send_signal(signal.SIGKILL)
        show_log(log)
        if home is not None:
            shutil.rmtree(home, ignore_errors=True)  # the links only: the store stays


def own_bentoml_home(store: str | None, log: Path) -> Path | None:
    """A BENTOML_HOME for one server over the model and Bento store of `store` (links to its
    models/ and bentos/), so that its Prometheus multiprocess folder is its own: BentoML
    empties that folder under BENTOML_HOME when a server starts, and /metrics reads every file
    in it, so servers of one home wipe and mix each other's metrics (docs/scale-out.md)."""
    if store is None:
        return None
    home = Path(tempfile.mkdtemp(prefix=f"{log.stem}-home-", dir=log.parent))
    for name in ("models", "bentos"):
        shared = Path(store) / name
        shared.mkdir(parents=True, exist_ok=True)
        (home / name).symlink_to(shared, target_is_directory=True)
    return home


def cli_command(module: str, *args: str) -> list[str]:
    """`python -m module args` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def run_python(
    *args: str,
    env: Mapping[str, str] | None = None,
    unset: Iterable[str] = (),
    timeout_s: float = CLI_TIMEOUT_S,
    capture: bool = True,
) -> subprocess.CompletedProcess[str]:
    """This interpreter with `args` in the project folder, to its end: this environment without
    `unset`, with `env`; output captured as text unless `capture` is off."""
    removed = set(unset)
    inherited = {k: v for k, v in os.environ.items() if k not in removed}
    return subprocess.run(
        [sys.executable, *args],
        cwd=PROJECT,
        env={**inherited, **(env or {})},
        capture_output=capture,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def run_cli(module: str, *args: str, **options: Any) -> subprocess.CompletedProcess[str]:
    """`python -m module args` (training, batch, bentoml, ...) as `run_python` runs it."""
    return run_python("-m", module, *args, **options)


def build_bento(env: Mapping[str, str] | None = None) -> str:
    """`bentoml build` of this project into the store of BENTOML_HOME; the Bento's tag."""
    result = run_cli("bentoml", "build", "--output", "tag", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1].removeprefix("__tag__:")


@contextmanager
def connect(url: str, begin: bool = False) -> Iterator[Connection]:
    """A connection whose engine (and pool) is disposed afterwards."""
    engine = create_engine(url)
    try:
        with engine.begin() if begin else engine.connect() as conn:
            yield conn
    finally:
        engine.dispose()


def histogram(metrics_text: str, name: str, **labels: str) -> tuple[float, float]:
    """(sum, count) of a Prometheus histogram, over the series that carry `labels`."""
    totals = {"sum": 0.0, "count": 0.0}
    for family in text_string_to_metric_families(metrics_text):
        if family.name != name:
            continue
        for sample in family.samples:
            kind = sample.name.rsplit("_", 1)[-1]
            if kind in totals and labels.items() <= sample.labels.items():
                totals[kind] += sample.value
    return totals["sum"], totals["count"]


def metric_total(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` that carry `labels`, in Prometheus text."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def rows(use_case: Any, n: int, prefix: str = "C") -> list[dict]:
    """`n` rows: the use case's examples in turn, each with a key of its own."""
    return [dict(use_case.examples[i % 2], customer_id=f"{prefix}-{i}") for i in range(n)]


def wait_for_status(
    base: str, task_id: str, wanted: str, timeout_s: float = 60, poll_s: float = 0.2
) -> dict:
    """The task's status once it is `wanted`; AssertionError if it failed or took too long."""
    deadline = time.monotonic() + timeout_s
    status: dict = {}
    while time.monotonic() < deadline:
        status = httpx.get(f"{base}/v1/tasks/{task_id}", timeout=30).json()
        if status["status"] == wanted:
            return dict(status)
        assert status["status"] != "failed", status
        time.sleep(poll_s)
    raise AssertionError(f"task {task_id} not {wanted} within {timeout_s} s: {status}")


def random_rows(use_case: Any, n: int, seed: int = 0, missing: float = 0.15) -> list[dict]:
    """`n` valid rows drawn at random within the use case's bounds and categories (every
    category and both booleans appear), a nullable value missing (None) with probability
    `missing`; keys `R-<i>`, personal data where the use case has it."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        row: dict[str, Any] = {}
        for f in use_case.features:
            if f.name == use_case.key:
                row[f.name] = f"R-{i}"
            elif f.pii:
                row[f.name] = f"person-{i}@example.com"
            elif f.nullable and rng.random() < missing:
                row[f.name] = None
            elif f.type == "numeric":
                row[f.name] = round(float(rng.uniform(f.min, f.max)), 2)
            elif f.type == "categorical":
                pick = i if i < len(f.categories) else int(rng.integers(len(f.categories)))
                row[f.name] = str(f.categories[pick])
            elif f.type == "boolean":
                row[f.name] = bool(rng.random() < 0.5)
            else:
                row[f.name] = "x" * int(rng.integers(0, min(f.max_length, 8) + 1))
        out.append(row)
    return out
