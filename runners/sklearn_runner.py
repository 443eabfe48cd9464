"""scikit-learn runner: an estimator stored with skops, loaded with explicit trusted types."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import bentoml
import numpy as np

from configuration import get_settings
from runners.artifacts import SKOPS_TRUSTED_TYPES, Versions, model_tag, pin_versions, verified_file
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


def load_estimator(model: bentoml.Model) -> Any:
    """A stored scikit-learn estimator, loaded by skops with explicit trusted types."""
    import skops.io  # heavy (scikit-learn, scipy): only where this model is used

    return skops.io.load(verified_file(model), trusted=SKOPS_TRUSTED_TYPES)


def load_predictor(model: bentoml.Model) -> Callable[[np.ndarray], np.ndarray]:
    """A stored scikit-learn estimator as features (n x d) -> probabilities (n x k)."""
    estimator = load_estimator(model)
    return lambda features: np.asarray(estimator.predict_proba(features), dtype=np.float64)


def linear_contributions(estimator: Any, features: np.ndarray) -> np.ndarray:
    """Exact contributions of a linear model to its margin: coefficient x value per column,
    the intercept as the bias (n x k' x d+1; k' = 1 for binary)."""
    coef, intercept = np.asarray(estimator.coef_), np.asarray(estimator.intercept_)
    values = features[:, None, :] * coef[None, :, :]
    bias = np.broadcast_to(intercept[None, :, None], (len(features), len(intercept), 1))
    return np.concatenate([values, bias], axis=2)


@constant_media_types
@bentoml.service(
    name="sklearn",
    **service_options(
        SETTINGS,
        SETTINGS.model_workers,
        routes=["/predict_proba", "/contributions"],
        access_log=False,
    ),
)
@pin_versions(SETTINGS, "sklearn")
class SklearnRunner:
    """(model registry version, encoded features) per row (n x 1+d) -> class probabilities
    (n x k). Any imported version is loaded the first time a row asks for it."""

    bento_model = bentoml.models.BentoModel(model_tag(SETTINGS, "sklearn"))

    def __init__(self) -> None:
        self.model = self.bento_model
        self.estimators = Versions(SETTINGS, "sklearn", load_estimator)
        self.estimators[str(self.model.info.labels["registered_version"])]  # the default version
        self.n_classes = len(self.model.info.metadata["classes"])
        self.batch_rows = batch_rows().labels(runner="sklearn")
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
        return isolate_failures(self._predict_proba, features, self.n_classes)

    def _predict_proba(self, batch: np.ndarray) -> np.ndarray:
        return by_version(
            batch,
            lambda version, x: np.asarray(
                self.estimators[version].predict_proba(x), dtype=np.float64
            ),
        )

    @bentoml.api(
        batchable=True,
        batch_dim=0,
        max_batch_size=SETTINGS.model_max_batch_size,
        max_latency_ms=SETTINGS.model_max_latency_ms,
    )
    async def contributions(self, features: np.ndarray) -> np.ndarray:
        """(version, encoded features) (n x 1+d) -> contributions to the margin (n x k' x d+1)."""
        return by_version(
            features, lambda version, x: linear_contributions(self.estimators[version], x)
        )

    @bentoml.api
    async def load(self, version: str) -> str:
        """Load (and verify) a version before rows ask for it; its BentoML tag."""
        self.estimators[version]
        return self.estimators.tags[version]
