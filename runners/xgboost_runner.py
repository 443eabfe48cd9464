"""XGBoost runner: a native Booster, one thread per worker, `inplace_predict` on batches."""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

import bentoml
import numpy as np

from configuration import get_settings
from runners.artifacts import Versions, model_tag, pin_versions, verified_file
from runners.batching import (
    bind_apis_once,
    by_version,
    constant_media_types,
    isolate_failures,
    service_options,
)
from runners.lifecycle import runner_drain_s, settle_heap, start_worker
from runners.metrics import batch_rows

SETTINGS = get_settings()


def import_xgboost_without_sklearn() -> ModuleType:
    """xgboost imports scikit-learn (and so scipy.stats and pandas: 3.5 s and 140 MB here) just
    to offer its sklearn wrappers, which a Booster does not use. Unless this process already
    has scikit-learn, import xgboost with it hidden."""
    if "sklearn" in sys.modules:
        import xgboost

        return xgboost
    sys.modules["sklearn"] = None  # type: ignore[assignment]  # makes `import sklearn` fail
    try:
        import xgboost
    finally:
        del sys.modules["sklearn"]
    return xgboost


def load_booster(model: bentoml.Model, threads: int) -> Any:
    """A stored XGBoost model as a Booster with `threads` threads."""
    booster = import_xgboost_without_sklearn().Booster(model_file=str(verified_file(model)))
    booster.set_param({"nthread": threads})
    return booster


def predictor(booster: Any) -> Callable[[np.ndarray], np.ndarray]:
    """features (n x d) -> probabilities (n x k)."""

    def predict(features: np.ndarray) -> np.ndarray:
        # float32 is what XGBoost compares with its (float32) split values anyway: the same
        # answers, and numpy's conversion is cheaper than XGBoost's (~10% of a large batch)
        features = np.asarray(features, dtype=np.float32)
        scores = np.asarray(booster.inplace_predict(features), dtype=np.float64)
        if scores.ndim == 1:  # binary:logistic returns P(positive class) only
            return np.column_stack([1.0 - scores, scores])
        return scores

    return predict


def load_predictor(model: bentoml.Model, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    """A stored XGBoost model as features (n x d) -> probabilities (n x k)."""
    return predictor(load_booster(model, threads))


def explainer(booster: Any, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    """features (n x d) -> TreeSHAP contributions (n x k' x d+1, the last column the bias)
    to the margin; k' = 1 for binary models (the positive class's log-odds)."""
    xgboost = import_xgboost_without_sklearn()

    def contributions(features: np.ndarray) -> np.ndarray:
        matrix = xgboost.DMatrix(features, nthread=threads)
        values = np.asarray(booster.predict(matrix, pred_contribs=True), dtype=np.float64)
        return values[:, None, :] if values.ndim == 2 else values

    return contributions


@constant_media_types
@bentoml.service(
    name="xgboost",
    **service_options(
        SETTINGS,
        SETTINGS.model_workers,
        routes=["/predict_proba", "/contributions"],
        access_log=False,
    ),
)
@pin_versions(SETTINGS, "xgboost")
class XGBoostRunner:
    """(model registry version, encoded features) per row (n x 1+d) -> class probabilities
    (n x k). Any imported version is loaded the first time a row asks for it."""

    bento_model = bentoml.models.BentoModel(model_tag(SETTINGS, "xgboost"))

    def __init__(self) -> None:
        self.model = self.bento_model
        self.boosters = Versions(
            SETTINGS, "xgboost", lambda model: load_booster(model, SETTINGS.model_threads)
        )
        self.boosters[str(self.model.info.labels["registered_version"])]  # the default version
        self.n_classes = len(self.model.info.metadata["classes"])
        self.batch_rows = batch_rows().labels(runner="xgboost")
        start_worker(runner_drain_s(SETTINGS))  # in a worker: exit with it, drain on SIGTERM
        bind_apis_once(self)
        settle_heap(SETTINGS.gc_young_objects)  # what is loaded stays out of collections

    @bentoml.api(
        batchable=True,
        batch_dim=0,
        max_batch_size=SETTINGS.model_max_batch_size,
        max_latency_ms=SETTINGS.model_max_latency_ms,
    )
    async def predict_proba(self, features: np.ndarray) -> np.ndarray:
        # async on purpose: one short CPU step per batch on the worker's own loop is cheaper
        # than BentoML's hand-off of a sync method to a thread and back.
        self.batch_rows.observe(len(features))
        return isolate_failures(self._predict, features, self.n_classes)

    def _predict(self, batch: np.ndarray) -> np.ndarray:
        return by_version(batch, lambda version, x: predictor(self.boosters[version])(x))

    @bentoml.api(
        batchable=True,
        batch_dim=0,
        max_batch_size=SETTINGS.model_max_batch_size,
        max_latency_ms=SETTINGS.model_max_latency_ms,
    )
    async def contributions(self, features: np.ndarray) -> np.ndarray:
        """(version, encoded features) (n x 1+d) -> contributions to the margin (n x k' x d+1)."""
        return by_version(
            features,
            lambda version, x: explainer(self.boosters[version], SETTINGS.model_threads)(x),
        )

    @bentoml.api
    async def load(self, version: str) -> str:
        """Load (and verify) a version before rows ask for it; its BentoML tag."""
        self.boosters[version]
        return self.boosters.tags[version]
