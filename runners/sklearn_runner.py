"""scikit-learn runner: an estimator stored with skops, loaded with explicit trusted types."""

from __future__ import annotations

import gc

import bentoml
import numpy as np

from configuration import get_settings
from runners.artifacts import SKOPS_TRUSTED_TYPES, model_tag, verified_file
from runners.batching import batch_rows, isolate_failures, service_options

SETTINGS = get_settings()


@bentoml.service(
    name="sklearn",
    **service_options(
        SETTINGS, SETTINGS.model_workers, routes=["/predict_proba"], access_log=False
    ),
)
class SklearnRunner:
    """Encoded features (n x d) -> class probabilities (n x k)."""

    bento_model = bentoml.models.BentoModel(model_tag(SETTINGS, "sklearn"))

    def __init__(self) -> None:
        import skops.io  # heavy (scikit-learn, scipy): only in this service's worker

        self.model = self.bento_model
        self.estimator = skops.io.load(verified_file(self.model), trusted=SKOPS_TRUSTED_TYPES)
        self.n_classes = len(self.model.info.metadata["classes"])
        self.batch_rows = batch_rows().labels(runner="sklearn")
        gc.freeze()  # the loaded model is permanent: keep it out of every future collection

    def _predict(self, features: np.ndarray) -> np.ndarray:
        return np.asarray(self.estimator.predict_proba(features), dtype=np.float64)

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
