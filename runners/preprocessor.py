"""Preprocessor runner: the ColumnTransformer fitted in training, applied to batches of rows."""

from __future__ import annotations

from typing import Any

import bentoml
import numpy as np

from configuration import current_use_case, get_settings
from runners.artifacts import SKOPS_TRUSTED_TYPES, model_tag, verified_file
from runners.batching import isolate_failures, service_options

SETTINGS = get_settings()


@bentoml.service(name="preprocessor", **service_options(SETTINGS, SETTINGS.preprocess_workers))
class Preprocessor:
    """Raw rows (dicts keyed by feature name) -> encoded feature matrix (float64, n x d)."""

    bento_model = bentoml.models.BentoModel(model_tag(SETTINGS, "preprocessor"))

    def __init__(self) -> None:
        import skops.io  # heavy (scikit-learn, scipy): only in this service's worker

        self.use_case = current_use_case()
        self.model = self.bento_model
        self.transformer = skops.io.load(verified_file(self.model), trusted=SKOPS_TRUSTED_TYPES)
        self.width = len(self.model.info.metadata["feature_names"])

    def _encode(self, rows: list[dict[str, Any]]) -> np.ndarray:
        return np.asarray(self.transformer.transform(self.use_case.frame(rows)), dtype=np.float64)

    @bentoml.api(
        batchable=True,
        batch_dim=0,
        max_batch_size=SETTINGS.preprocess_max_batch_size,
        max_latency_ms=SETTINGS.preprocess_max_latency_ms,
    )
    def transform(self, rows: list[dict[str, Any]]) -> np.ndarray:
        return isolate_failures(self._encode, rows, self.width)
