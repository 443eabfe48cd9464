"""Benchmark the scoring service as a real `bentoml serve` process, as shipped ("default") and
lean, beside the servers a user would pick instead (the plain FastAPI app and Seldon MLServer
with adaptive batching, benchmarks/peers.py), same model, each alone under wrk in turn, in
interleaved sweeps; then the in-process limit: python -m benchmarks [--duration S] [--sweeps N]
[--baseline GIT-REF] (the project at that commit, as shipped, measured beside this one)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

from api.v2 import request_for
from benchmarks.inprocess import rows_per_second
from benchmarks.load import LoadResult, PeakRss, run_wrk
from benchmarks.peers import (
    MLSERVER_MODEL,
    mlserver,
    mlserver_probabilities,
    mlserver_request,
    plain_fastapi,
)
from configuration import current_use_case
from tests.harness import PROJECT, NotReady, run_cli, serving

BATCH = 100  # rows per bulk request
CELLS = [  # (label, rows per request, connections), in this order on each server
    ("1 row, c=1 (fresh)", 1, 1),
    ("1 row, c=64", 1, 64),
    ("100 rows, c=8", BATCH, 8),
    ("100 rows, c=64", BATCH, 64),
    ("1 row, c=1 (after bursts)", 1, 1),
]
V2 = "V2 "  # the project's Open Inference Protocol infer, each right after its /v1 twin
V2_CELLS = {"1 row, c=64", "100 rows, c=8", "100 rows, c=64"}
DEFAULT, LEAN, PLAIN, MLSERVER = "project, default", "project, lean", "plain FastAPI", "MLServer"
KEYS = {"default": DEFAULT, "lean": LEAN, "plain": PLAIN, "mlserver": MLSERVER}  # --servers
LEAN_ENV = {"SCORING_MONITORING": "false", "SCORING_PREDICTION_LOG_SAMPLE": "0"}
READY_TIMEOUT_S = 180
POLL_S = 0.02  # a cold start is timed to the poll that sees it ready
SERVER_ENV = {"BENTOML_DO_NOT_TRACK": "true"}
WARM_UP = 20  # first requests pay lazy initialisation; not measured
PARITY = 1e-5  # each peer must answer the project's probabilities on the example


@dataclass(frozen=True)
class Cell:
    load: LoadResult
    cpu_ms_per_request: float  # CPU time of the server's processes / requests answered


@dataclass
class Target:
    """A started server: its base URL, the pid whose process tree does the work, and how it
    is called (rows -> path, JSON body)."""

    base: str
    pid: int
    request: Callable[[list[dict[str, Any]]], tuple[str, dict[str, Any]]]
    cold_start_s: float | None = None


def v1_request(rows: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    if len(rows) == 1:
        return "/v1/predict", {"instance": rows[0]}
    return "/v1/predict_batch", {"instances": rows}


def v2_request(rows: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    use_case = current_use_case()
    return f"/v2/models/{use_case.name}/infer", request_for(use_case, rows)


@contextmanager
def project(log: Path, env: dict[str, str], cwd: Path = PROJECT) -> Iterator[Target]:
    began = time.perf_counter()
    with serving(
        log, {**SERVER_ENV, **env}, timeout_s=READY_TIMEOUT_S, poll_s=POLL_S, cwd=cwd
    ) as server:
        seconds = time.perf_counter() - began
        yield Target(server.base, server.process.pid, v1_request, seconds)


@contextmanager
def plain(log: Path) -> Iterator[Target]:
    with plain_fastapi(log) as (base, pid):
        yield Target(base, pid, v1_request)


@contextmanager
def mlserver_target(log: Path, folder: Path) -> Iterator[Target]:
    use_case = current_use_case()

    def request(rows: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
        return f"/v2/models/{MLSERVER_MODEL}/infer", mlserver_request(use_case, rows)

    with mlserver(folder, log) as (base, pid):
        yield Target(base, pid, request)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and all its descendants."""
    root = psutil.Process(pid)
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def probabilities(target: Target, row: dict[str, Any]) -> list[float]:
    path, body = target.request([row])
    answer = httpx.post(target.base + path, json=body, timeout=30).json()
    if "outputs" in answer:  # MLServer
        return mlserver_probabilities(answer)[0]
    return list(answer["prediction"]["probabilities"].values())


def measure(target: Target, rows: int, connections: int, duration: float, v2: bool) -> Cell:
    example = dict(current_use_case().examples[0])
    path, body = (v2_request if v2 else target.request)([example] * rows)
    before = cpu_seconds(target.pid)
    load = run_wrk(target.base + path, body, connections, duration)
    spent = cpu_seconds(target.pid) - before
    return Cell(load, 1000 * spent / max(load.requests, 1))


def run_server(
    name: str, target: Target, duration: float, reference: list[float] | None
) -> dict[str, Cell]:
    """Every cell on one started server (the project's default also its V2 twins)."""
    example = dict(current_use_case().examples[0])
    with httpx.Client() as client:
        for _ in range(WARM_UP):
            path, body = target.request([example])
            client.post(target.base + path, json=body, timeout=30).raise_for_status()
    if reference is not None:  # the same model answers: otherwise the comparison means nothing
        mine = probabilities(target, example)
        gap = max(abs(a - b) for a, b in zip(mine, reference, strict=True))
        if gap > PARITY:
            raise SystemExit(f"{name} answers {mine}, the project {reference}: not the same model")
    cells = {}
    for label, rows, connections in CELLS:
        print(f"{name}: {label} ...", flush=True)
        cells[label] = measure(target, rows, connections, duration, v2=False)
        if name == DEFAULT and label in V2_CELLS:
            print(f"{name}: {V2}{label} ...", flush=True)
            cells[V2 + label] = measure(target, rows, connections, duration, v2=True)
    return cells


def ensure_demo_model() -> None:
    import bentoml

    try:
        bentoml.models.get("churn-xgboost:latest")
    except bentoml.exceptions.NotFound:
        print("no demo model in the BentoML store: training it (python -m training demo)")
        if run_cli("training", "demo", capture=False).returncode != 0:
            raise SystemExit("python -m training demo failed") from None


def spread(values: list[float], fmt: str) -> str:
    """The median, and the range when there is more than one value."""
    middle = format(statistics.median(values), fmt)
    if len(values) == 1 or min(values) == max(values):
        return middle
    return f"{middle} [{format(min(values), fmt)}-{format(max(values), fmt)}]"


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per load run")
    parser.add_argument("--sweeps", type=int, default=2, help="sweeps over all servers")
    parser.add_argument(
        "--servers",
        default=",".join(KEYS),
        help=f"comma-separated subset of {','.join(KEYS)}, in the order they run",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument(
        "--baseline",
        metavar="GIT-REF",
        help="also serve the project at this commit (a temporary git worktree), as shipped",
    )
    args = parser.parse_args()
    if current_use_case().name != "churn":
        raise SystemExit("the benchmark serves the demo: run it with the default use case")
    ensure_demo_model()
    logs = Path(os.environ.get("TMPDIR", "/tmp"))
    try:
        with baseline_checkout(args.baseline) as baseline:
            return benchmark(args, logs, baseline)
    except NotReady as exc:
        raise SystemExit(f"{exc}; the servers' output is in {logs}/bench-*.log") from None


@contextmanager
def baseline_checkout(ref: str | None) -> Iterator[tuple[str, Path] | None]:
    """(label, folder) of a detached worktree of the project at `ref`, removed afterwards."""
    if ref is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="bench-baseline-") as scratch:
        folder = Path(scratch) / "project"
        git = ["git", "-C", str(PROJECT)]
        subprocess.run([*git, "worktree", "add", "-q", "--detach", str(folder), ref], check=True)
        try:
            commit = subprocess.run(
                [*git, "rev-parse", "--short", ref], capture_output=True, text=True, check=True
            ).stdout.strip()
            yield f"project @{commit}, default", folder
        finally:
            subprocess.run([*git, "worktree", "remove", "--force", str(folder)], check=True)


def benchmark(args: argparse.Namespace, logs: Path, baseline: tuple[str, Path] | None) -> int:
    keys = [key.strip() for key in args.servers.split(",")]
    if unknown := set(keys) - set(KEYS):
        raise SystemExit(f"unknown servers: {sorted(unknown)}; known: {', '.join(KEYS)}")
    names = [KEYS[key] for key in keys]
    starts: dict[str, Callable[[], AbstractContextManager[Target]]] = {
        DEFAULT: lambda: project(logs / "bench-service.log", {}),
        LEAN: lambda: project(logs / "bench-service-lean.log", LEAN_ENV),
        PLAIN: lambda: plain(logs / "bench-plain.log"),
        MLSERVER: lambda: mlserver_target(logs / "bench-mlserver.log", logs / "bench-mlserver"),
    }
    if baseline is not None:
        label, folder = baseline
        names.insert(names.index(DEFAULT) + 1 if DEFAULT in names else 0, label)
        starts[label] = lambda: project(logs / "bench-baseline.log", {}, folder)
    runs: dict[str, list[dict[str, Cell]]] = {name: [] for name in names}
    cold_starts: dict[str, list[float]] = {name: [] for name in names}  # seconds, by server
    peak_rss = 0
    reference: list[float] | None = None
    for sweep in range(args.sweeps):
        for name in names:
            print(f"sweep {sweep + 1}/{args.sweeps}: {name}", flush=True)
            with starts[name]() as target:
                if target.cold_start_s is not None:
                    cold_starts[name].append(target.cold_start_s)
                with PeakRss(target.pid) as rss:
                    runs[name].append(run_server(name, target, args.duration, reference))
                if name == DEFAULT:
                    peak_rss = max(peak_rss, rss.peak_bytes)
                if reference is None and name in (DEFAULT, LEAN):
                    reference = probabilities(target, dict(current_use_case().examples[0]))
    print("in-process limit (1 core, 1024-row batches) ...", flush=True)
    limit = rows_per_second()
    report(names, runs, args.sweeps)
    summary(runs, cold_starts, peak_rss, limit)
    if args.json:
        figures = {
            name: {label: [asdict(c) for c in (r[label] for r in sweeps)] for label in sweeps[0]}
            for name, sweeps in runs.items()
        }
        args.json.write_text(
            json.dumps(
                {
                    "servers": figures,
                    "cold_starts_s": cold_starts,
                    "peak_rss_mib": peak_rss / 2**20,
                    "in_process_rows_per_s": limit,
                },
                indent=2,
            )
        )
    return 0


def values(runs: list[dict[str, Cell]], label: str, what: str) -> list[float]:
    """One figure of one cell over the sweeps: `p50`, `p99`, `req/s`, `rows/s` or `cpu`."""
    rows = BATCH if "100 rows" in label else 1
    pick: dict[str, Callable[[Cell], float]] = {
        "p50": lambda c: c.load.p50_ms,
        "p99": lambda c: c.load.p99_ms,
        "req/s": lambda c: c.load.requests_per_s,
        "rows/s": lambda c: c.load.requests_per_s * rows,
        "cpu": lambda c: c.cpu_ms_per_request,
    }
    return [pick[what](run[label]) for run in runs]


def report(names: list[str], runs: dict[str, list[dict[str, Cell]]], sweeps: int) -> None:
    columns = [
        ("1 row c=1 p50 ms", "1 row, c=1 (fresh)", "p50", ".2f"),
        ("after bursts", "1 row, c=1 (after bursts)", "p50", ".2f"),
        ("1 row c=64 req/s", "1 row, c=64", "req/s", ",.0f"),
        ("p99 ms", "1 row, c=64", "p99", ".0f"),
        ("100 rows c=8 rows/s", "100 rows, c=8", "rows/s", ",.0f"),
        ("100 rows c=64 rows/s", "100 rows, c=64", "rows/s", ",.0f"),
        ("CPU ms / 100-row req", "100 rows, c=8", "cpu", ".2f"),
    ]
    print(f"\nmedian [range] of {sweeps} sweeps, each server alone in turn\n")
    print("| server | " + " | ".join(title for title, *_ in columns) + " | errors |")
    print("|---|" + "---:|" * (len(columns) + 1))
    for name in names:
        cells = [spread(values(runs[name], label, what), fmt) for _, label, what, fmt in columns]
        errors = sum(c.load.errors for run in runs[name] for c in run.values())
        print(f"| {name} | " + " | ".join(cells) + f" | {errors} |")
    if DEFAULT in runs:
        v2 = [label for label, *_ in CELLS if V2 + label in runs[DEFAULT][0]]
        print("\n| project, default | " + " | ".join(f"{V2}{label}" for label in v2) + " |")
        print("|---|" + "---:|" * len(v2))
        ratios = [
            statistics.median(values(runs[DEFAULT], V2 + label, "req/s"))
            / statistics.median(values(runs[DEFAULT], label, "req/s"))
            for label in v2
        ]
        print("| V2 vs /v1 throughput | " + " | ".join(f"{r:.2f}" for r in ratios) + " |")


def summary(
    runs: dict[str, list[dict[str, Cell]]],
    cold_starts: dict[str, list[float]],
    peak_rss: int,
    limit: dict[str, float],
) -> None:
    def median(name: str, label: str, what: str) -> float:
        return statistics.median(values(runs[name], label, what))

    print()
    if DEFAULT in runs and MLSERVER in runs:
        for label in ("100 rows, c=8", "100 rows, c=64", "1 row, c=64"):
            ratio = median(DEFAULT, label, "rows/s") / median(MLSERVER, label, "rows/s")
            print(f"{label}: default {ratio:.2f}x MLServer (target >= 2x)")
        print(f"1 row, c=64: default p99 {median(DEFAULT, '1 row, c=64', 'p99'):.0f} ms (< 100)")
    if DEFAULT in runs and PLAIN in runs:
        for label in ("1 row, c=1 (fresh)", "1 row, c=1 (after bursts)"):
            ours, theirs = median(DEFAULT, label, "p50"), median(PLAIN, label, "p50")
            print(f"{label}: default p50 {ours:.2f} ms, plain FastAPI {theirs:.2f} ms (<=)")
        ratio = median(DEFAULT, "1 row, c=64", "req/s") / median(PLAIN, "1 row, c=64", "req/s")
        print(f"1 row, c=64: default {ratio:.1f}x plain FastAPI")
    if DEFAULT in runs and LEAN in runs:
        cost = ", ".join(
            f"{label} {median(DEFAULT, label, 'req/s') / median(LEAN, label, 'req/s'):.2f}"
            for label, *_ in CELLS
        )
        print(f"monitoring: default / lean throughput (target >= 0.90): {cost}")
    for name in runs:
        if name.startswith("project @") and DEFAULT in runs:
            gain = ", ".join(
                f"{label} {median(DEFAULT, label, 'req/s') / median(name, label, 'req/s'):.2f}"
                for label, *_ in CELLS
            )
            cpu = (median(DEFAULT, "100 rows, c=8", "cpu"), median(name, "100 rows, c=8", "cpu"))
            print(f"this checkout vs {name[8:]} throughput: {gain}")
            print(f"CPU ms per 100-row request: {cpu[0]:.2f} now, {cpu[1]:.2f} at {name[8:]}")
    ours = [s for name in (DEFAULT, LEAN) for s in cold_starts.get(name, [])]
    if ours:
        print(
            f"cold start to /readyz: {statistics.median(ours):.2f} s (median of {len(ours)} "
            f"starts of this checkout); peak RSS of the default's processes: "
            f"{peak_rss / 2**20:.0f} MiB"
        )
    for name, starts in cold_starts.items():
        if name.startswith("project @") and starts:
            print(f"cold start of {name[8:]}: {statistics.median(starts):.2f} s")
    print(
        f"in-process limit (1 core): {limit['runners']:,.0f} rows/s through the runners' code, "
        f"{limit['sklearn']:,.0f} through pandas + ColumnTransformer + inplace_predict"
    )


if __name__ == "__main__":
    sys.exit(main())
