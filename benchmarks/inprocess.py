"""The in-process limit: preprocess + predict on batches in one process, one thread, no HTTP."""

from __future__ import annotations

import asyncio
import statistics
import time

import numpy as np
import skops.io

from configuration import current_use_case
from runners.artifacts import SKOPS_TRUSTED_TYPES, verified_file
from training.data import generate_churn

BATCH_ROWS = 1024


def rows_per_second(n_rows: int = 20_480, passes: int = 5) -> dict[str, float]:
    """Median rows/s over `passes` of `n_rows`, in BATCH_ROWS batches, for two paths:
    `sklearn`: pandas frame + the fitted ColumnTransformer + Booster.inplace_predict;
    `runners`: the runner services' own code (dict rows in, probabilities out)."""
    from runners.preprocessor import Preprocessor
    from runners.xgboost_runner import XGBoostRunner

    use_case = current_use_case()
    frame = generate_churn(n_rows, seed=7).drop(columns=[use_case.target.name])
    records = [
        {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in row.items()}
        for row in frame.to_dict("records")
    ]
    preprocessor, model = Preprocessor.inner(), XGBoostRunner.inner()
    transformer = skops.io.load(verified_file(preprocessor.model), trusted=SKOPS_TRUSTED_TYPES)
    booster = model.boosters[model.model.info.labels["registered_version"]]
    # the runners' inputs carry the registry version of each row in column 0
    preprocessor_version = np.full((BATCH_ROWS, 1), preprocessor.version, dtype=object)
    model_version = np.full((BATCH_ROWS, 1), float(model.model.info.labels["registered_version"]))

    def sklearn_path(start: int) -> None:
        chunk = use_case.frame(frame.iloc[start : start + BATCH_ROWS])
        booster.inplace_predict(transformer.transform(chunk))

    def runner_path(start: int) -> None:
        matrix = use_case.matrix(records[start : start + BATCH_ROWS])
        raw = np.hstack([preprocessor_version[: len(matrix)], matrix])
        features = asyncio.run(preprocessor.transform(raw))
        asyncio.run(model.predict_proba(np.hstack([model_version[: len(features)], features])))

    results = {}
    for name, step in (("sklearn", sklearn_path), ("runners", runner_path)):
        rates = []
        for _ in range(passes):
            began = time.perf_counter()
            for start in range(0, n_rows, BATCH_ROWS):
                step(start)
            rates.append(n_rows / (time.perf_counter() - began))
        results[name] = statistics.median(rates)
    return results
