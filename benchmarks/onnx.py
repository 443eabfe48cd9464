"""onnxruntime on the served model's ONNX graph (docs/onnx.md), in process, against the service's
own in-process limit, same rows, same batches, one thread each, in one run:
python -m benchmarks.onnx [--passes N]."""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import bentoml
import numpy as np

from benchmarks.inprocess import BATCH_ROWS, rows_per_second
from configuration import current_use_case, get_settings
from runners.artifacts import model_tag, verified_file
from training.data import generate_churn
from training.onnx_export import PROBABILITIES, feeds, session

N_ROWS = 20_480  # as benchmarks.inprocess


def onnx_rows_per_second(flavor: str, passes: int) -> tuple[float, int]:
    """Median rows/s of onnxruntime on the latest stored `flavor` model's graph (the graph's
    inputs built from dict rows included, as the runners' path includes its matrix), and the
    graph's size in bytes."""
    settings, use_case = get_settings(), current_use_case()
    graph = verified_file(bentoml.models.get(model_tag(settings, flavor)), "onnx", settings)
    runtime = session(graph.read_bytes())
    frame = generate_churn(N_ROWS, seed=7).drop(columns=[use_case.target.name])
    records = [
        {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in row.items()}
        for row in frame.to_dict("records")
    ]
    rates = []
    for _ in range(passes):
        began = time.perf_counter()
        for start in range(0, N_ROWS, BATCH_ROWS):
            runtime.run([PROBABILITIES], feeds(use_case, records[start : start + BATCH_ROWS]))
        rates.append(N_ROWS / (time.perf_counter() - began))
    return statistics.median(rates), graph.stat().st_size


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.onnx", description=__doc__)
    parser.add_argument("--passes", type=int, default=5, help="passes over the rows (median)")
    args = parser.parse_args()
    if current_use_case().name != "churn":
        raise SystemExit("benchmarks.onnx generates churn rows: run it with the demo use case")
    limit = rows_per_second(N_ROWS, args.passes)
    print(f"{N_ROWS} churn rows in {BATCH_ROWS}-row batches, 1 thread, median of {args.passes}")
    print(f"{'path':58} {'rows/s':>10} {'vs runners':>10}")
    print(f"{'runners (the service in process, no HTTP)':58} {limit['runners']:10.0f} {1:10.2f}")
    sklearn = "pandas + ColumnTransformer + Booster.inplace_predict"
    print(f"{sklearn:58} {limit['sklearn']:10.0f} {limit['sklearn'] / limit['runners']:10.2f}")
    for flavor in ("xgboost", "sklearn"):
        try:
            rate, size = onnx_rows_per_second(flavor, args.passes)
        except (bentoml.exceptions.NotFound, KeyError) as exc:
            print(f"onnxruntime, {flavor}: no graph ({exc})")
            continue
        label = f"onnxruntime, {flavor} graph ({size:,} bytes)"
        print(f"{label:58} {rate:10.0f} {rate / limit['runners']:10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
