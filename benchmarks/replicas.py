"""Throughput of 1, 2 and 3 replicas behind HAProxy on this machine (docs/scale-out.md), each
cluster of tests/cluster.py alone under load in turn: python -m benchmarks.replicas.

Every replica is the project as shipped (two API workers) on one PostgreSQL database; wrk sends
1-row and 100-row requests through the load balancer. The cells are interleaved over sweeps
(1, 2, 3 replicas, then again) and reported as medians, as the machine is shared and noisy."""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

from benchmarks.__main__ import BATCH, ensure_demo_model
from benchmarks.load import LoadResult, run_wrk
from configuration import current_use_case
from tests.cluster import cluster, missing_tools

CELLS = [  # (label, rows per request, connections)
    ("1 row, c=32", 1, 32),
    (f"{BATCH} rows, c=8", BATCH, 8),
]


def load(base: str, rows: int, connections: int, duration_s: float) -> LoadResult:
    example = dict(current_use_case().examples[0])
    if rows == 1:
        return run_wrk(f"{base}/v1/predict", {"instance": example}, connections, duration_s)
    body = {"instances": [example] * rows}
    return run_wrk(f"{base}/v1/predict_batch", body, connections, duration_s)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.replicas", description=__doc__)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--sweeps", type=int, default=2, help="starts of each cluster")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per load run")
    args = parser.parse_args()
    if missing := missing_tools():
        raise SystemExit(f"not installed: {', '.join(missing)} (make cluster installs them)")
    ensure_demo_model()
    from bentoml._internal.configuration.containers import BentoMLContainer

    store = Path(BentoMLContainer.bentoml_home.get())
    runs: dict[tuple[int, str], list[LoadResult]] = {}
    for sweep in range(args.sweeps):
        for n in args.replicas:
            folder = Path(tempfile.mkdtemp(prefix="scoring-replicas-"))
            try:
                with cluster(folder, store, replicas=n) as running:
                    load(running.lb, 1, 8, 2)  # lazy initialisation, not measured
                    for label, rows, connections in CELLS:
                        print(f"sweep {sweep + 1}, {n} replica(s): {label} ...", flush=True)
                        result = load(running.lb, rows, connections, args.duration)
                        runs.setdefault((n, label), []).append(result)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
    print(f"\n| replicas | {' | '.join(f'{label} rows/s' for label, _, _ in CELLS)} | errors |")
    print(f"|---:|{'---:|' * len(CELLS)}---:|")
    base = (
        {
            label: statistics.median(r.requests_per_s * rows for r in runs[(1, label)])
            for label, rows, _ in CELLS
        }
        if 1 in args.replicas
        else {}
    )
    for n in args.replicas:
        cells, errors = [], 0
        for label, rows, _ in CELLS:
            rates = [r.requests_per_s * rows for r in runs[(n, label)]]
            errors += sum(r.errors for r in runs[(n, label)])
            median = statistics.median(rates)
            ratio = f" ({median / base[label]:.2f}x)" if base else ""
            spread = f"{min(rates):,.0f}-{max(rates):,.0f}"
            cells.append(f"{median:,.0f}{ratio} [{spread}]")
        print(f"| {n} | {' | '.join(cells)} | {errors} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
