"""Benchmark the scoring service as a real `bentoml serve` process, against the in-process limit
and a naive FastAPI baseline, all in one run: python -m benchmarks [--duration S] [--repeat N]."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import httpx

from api.v2 import request_for
from benchmarks.inprocess import rows_per_second
from benchmarks.load import LoadResult, PeakRss, run_wrk
from configuration import current_use_case
from tests.harness import (
    HOST,
    NotReady,
    Server,
    cli_command,
    free_port,
    run_cli,
    serving,
    start_process,
    stop,
    wait_for_http,
)

ROWS_PER_BATCH_REQUEST = 100
V2 = "V2 "  # label prefix: the same rows through the Open Inference Protocol's infer
SCENARIOS = [  # (label, rows per request, connections); each V2 cell right after its /v1 twin
    ("1 row, c=1 (fresh)", 1, 1),
    ("1 row, c=8", 1, 8),
    ("1 row, c=64", 1, 64),
    (f"{V2}1 row, c=64", 1, 64),
    ("100 rows, c=1", ROWS_PER_BATCH_REQUEST, 1),
    ("100 rows, c=8", ROWS_PER_BATCH_REQUEST, 8),
    (f"{V2}100 rows, c=8", ROWS_PER_BATCH_REQUEST, 8),
    ("100 rows, c=64", ROWS_PER_BATCH_REQUEST, 64),
    (f"{V2}100 rows, c=64", ROWS_PER_BATCH_REQUEST, 64),
    ("1 row, c=1 (after bursts)", 1, 1),
    (f"{V2}1 row, c=1 (after bursts)", 1, 1),
]
COLD_STARTS = 3  # starts of `bentoml serve` timed to /readyz (median)
READY_TIMEOUT_S = 180
POLL_S = 0.02  # a cold start is timed to the poll that sees it ready
SERVER_ENV = {"BENTOML_DO_NOT_TRACK": "true"}


def ensure_demo_model() -> None:
    import bentoml

    try:
        bentoml.models.get("churn-xgboost:latest")
    except bentoml.exceptions.NotFound:
        print("no demo model in the BentoML store: training it (python -m training demo)")
        if run_cli("training", "demo", capture=False).returncode != 0:
            raise SystemExit("python -m training demo failed") from None


@contextmanager
def scoring_service(log: Path) -> Iterator[tuple[Server, float]]:
    """A ready `bentoml serve` of the service; (it, seconds from its start until /readyz
    answered 200)."""
    began = time.perf_counter()
    with serving(log, SERVER_ENV, timeout_s=READY_TIMEOUT_S, poll_s=POLL_S) as server:
        yield server, time.perf_counter() - began


@contextmanager
def naive_fastapi(log: Path) -> Iterator[str]:
    """The naive FastAPI baseline under uvicorn, ready; its base URL."""
    port = free_port()
    args = ["benchmarks.naive_fastapi:app", "--host", HOST, "--port", str(port)]
    process = start_process(
        cli_command("uvicorn", *args, "--log-level", "warning"), log, SERVER_ENV
    )
    try:
        base = f"http://{HOST}:{port}"
        wait_for_http(f"{base}/docs", process, READY_TIMEOUT_S, POLL_S)
        yield base
    finally:
        stop(process)


def median_result(results: list[LoadResult]) -> LoadResult:
    return LoadResult(
        requests_per_s=statistics.median(r.requests_per_s for r in results),
        p50_ms=statistics.median(r.p50_ms for r in results),
        p99_ms=statistics.median(r.p99_ms for r in results),
        errors=sum(r.errors for r in results),
        requests=sum(r.requests for r in results),
    )


def measure(
    url: str, rows: int, connections: int, duration: float, repeat: int, v2: bool = False
) -> LoadResult:
    use_case = current_use_case()
    example = dict(use_case.examples[0])
    if v2:  # /v1's rows as one input per feature
        path, body = f"/v2/models/{use_case.name}/infer", request_for(use_case, [example] * rows)
    elif rows == 1:
        path, body = "/v1/predict", {"instance": example}
    else:
        path, body = "/v1/predict_batch", {"instances": [example] * rows}
    return median_result([run_wrk(url + path, body, connections, duration) for _ in range(repeat)])


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per load run")
    parser.add_argument("--repeat", type=int, default=1, help="runs per scenario (median)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    ensure_demo_model()
    logs = Path(os.environ.get("TMPDIR", "/tmp"))
    try:
        return benchmark(args, logs)
    except NotReady as exc:
        raise SystemExit(f"{exc}; the servers' output is in {logs}/bench-*.log") from None


def benchmark(args: argparse.Namespace, logs: Path) -> int:
    print("in-process limit (1 core, 1024-row batches) ...", flush=True)
    limit = rows_per_second()

    # cold start is one noisy sample per start: take the median of a few (the last start serves)
    cold_starts: list[float] = []
    for _ in range(COLD_STARTS - 1):
        with scoring_service(logs / "bench-service.log") as (_, seconds):
            cold_starts.append(seconds)
    results: dict[str, LoadResult] = {}
    with scoring_service(logs / "bench-service.log") as (service, seconds):
        cold_starts.append(seconds)
        url = service.base
        with httpx.Client() as client:  # first requests pay lazy initialisation; not measured
            for _ in range(20):
                client.post(f"{url}/v1/predict", json={"instance": current_use_case().examples[0]})
        with PeakRss(service.process.pid) as rss:
            for label, rows, connections in SCENARIOS:
                print(f"service: {label} ...", flush=True)
                v2 = label.startswith(V2)
                results[label] = measure(url, rows, connections, args.duration, args.repeat, v2)
    cold_start = statistics.median(cold_starts)

    naive_results = {}
    with naive_fastapi(logs / "bench-naive.log") as naive_url:
        for label, connections in (
            ("naive FastAPI, 1 row, c=1", 1),
            ("naive FastAPI, 1 row, c=64", 64),
        ):
            print(f"{label} ...", flush=True)
            naive_results[label] = measure(naive_url, 1, connections, args.duration, args.repeat)

    print()
    print(f"{'scenario':34} {'req/s':>9} {'rows/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    for label, result in {**results, **naive_results}.items():
        rows = ROWS_PER_BATCH_REQUEST if "100 rows" in label else 1
        print(
            f"{label:34} {result.requests_per_s:9.0f} {result.requests_per_s * rows:10.0f} "
            f"{result.p50_ms:8.2f} {result.p99_ms:8.2f} {result.errors:7d}"
        )
    ours = results["1 row, c=64"].requests_per_s
    baseline = naive_results["naive FastAPI, 1 row, c=64"].requests_per_s
    batch_rows = results["100 rows, c=8"].requests_per_s * ROWS_PER_BATCH_REQUEST
    print()
    print(
        f"cold start to /readyz: {cold_start:.2f} s (median of {COLD_STARTS}: "
        f"{', '.join(f'{s:.2f}' for s in cold_starts)}); peak RSS of all service processes: "
        f"{rss.peak_bytes / 2**20:.0f} MiB"
    )
    print(
        f"in-process limit: {limit['sklearn']:.0f} rows/s (pandas + ColumnTransformer + "
        f"inplace_predict), {limit['runners']:.0f} rows/s (the runners' own code)"
    )
    print(
        f"ratio 1 row c=64 vs naive FastAPI: {ours / baseline:.1f}x; "
        f"100 rows c=8 vs in-process limit: {batch_rows / limit['runners']:.2f}"
    )
    v2_ratios = ", ".join(
        f"{label}: {results[V2 + label].requests_per_s / results[label].requests_per_s:.2f}"
        for label, *_ in SCENARIOS
        if V2 + label in results
    )
    print(f"V2 (Open Inference Protocol) vs /v1 throughput, same rows: {v2_ratios}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "service": {k: asdict(v) for k, v in results.items()},
                    "naive": {k: asdict(v) for k, v in naive_results.items()},
                    "cold_start_s": cold_start,
                    "cold_starts_s": cold_starts,
                    "peak_rss_mib": rss.peak_bytes / 2**20,
                    "in_process_rows_per_s": limit,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
