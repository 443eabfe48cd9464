"""Preprocessor runner: the preprocessing fitted in training, applied to batches of rows."""

from __future__ import annotations

import json
from collections.abc import Callable

import bentoml
import numpy as np

from configuration import UseCase, current_use_case, get_settings
from runners.artifacts import SKOPS_TRUSTED_TYPES, Versions, model_tag, pin_versions, verified_file
from runners.batching import (
    bind_apis_once,
    by_version,
    constant_media_types,
    isolate_failures,
    service_options,
)
from runners.encoder import Encoder
from runners.lifecycle import runner_drain_s, settle_heap, start_worker
from runners.metrics import batch_rows

SETTINGS = get_settings()


def load_compiled(model: bentoml.Model) -> Encoder | None:
    """The compiled form of a stored preprocessor, if its import stored one."""
    if "encoder" not in model.info.metadata:
        return None
    return Encoder.from_dict(json.loads(verified_file(model, "encoder").read_text()))


def load_encoder(model: bentoml.Model, use_case: UseCase) -> Callable[[np.ndarray], np.ndarray]:
    """The preprocessing of a stored preprocessor model: its compiled form (numpy only) when the
    import stored one, else the fitted transformer itself through scikit-learn. Takes the raw
    object matrix of `UseCase.matrix`; returns float64 features."""
    compiled = load_compiled(model)
    if compiled is not None:
        return compiled.encode
    import skops.io  # heavy (scikit-learn, scipy, pandas): only without a compiled form

    transformer = skops.io.load(verified_file(model), trusted=SKOPS_TRUSTED_TYPES)
    return lambda rows: np.asarray(transformer.transform(use_case.frame(rows)), dtype=np.float64)


@constant_media_types
@bentoml.service(
    name="preprocessor",
    **service_options(
        SETTINGS, SETTINGS.preprocess_workers, routes=["/transform"], access_log=False
    ),
)
@pin_versions(SETTINGS, "preprocessor")
class Preprocessor:
    """(preprocessor registry version, raw values as `UseCase.matrix` lays them out) per row,
    object -> encoded feature matrix (float64, n x d). Any imported version is loaded the first
    time a row asks for it.

    Uses the compiled form of the fitted ColumnTransformer (numpy only) when the import stored
    one, which it does only after proving it identical to the transformer; otherwise the
    transformer itself through scikit-learn."""

    bento_model = bentoml.models.BentoModel(model_tag(SETTINGS, "preprocessor"))

    def __init__(self) -> None:
        self.model = self.bento_model
        self.width = len(self.model.info.metadata["feature_names"])
        use_case = current_use_case()
        self.encoders = Versions(SETTINGS, "preprocessor", lambda m: load_encoder(m, use_case))
        self.version = str(self.model.info.labels["registered_version"])
        self.encoders[self.version]  # the default version, loaded before the first request
        self.compiled = "encoder" in self.model.info.metadata  # what load_encoder chose
        self.batch_rows = batch_rows().labels(runner="preprocessor")
        start_worker(runner_drain_s(SETTINGS))  # in a worker: exit with it, drain on SIGTERM
        bind_apis_once(self)
        settle_heap(SETTINGS.gc_young_objects)  # what is loaded stays out of collections

    @bentoml.api(
        batchable=True,
        batch_dim=0,
        max_batch_size=SETTINGS.preprocess_max_batch_size,
        max_latency_ms=SETTINGS.preprocess_max_latency_ms,
    )
    async def transform(self, rows: np.ndarray) -> np.ndarray:
        # async on purpose: one short CPU step per batch on the worker's own loop is cheaper
        # than BentoML's hand-off of a sync method to a thread and back.
        self.batch_rows.observe(len(rows))
        return isolate_failures(self._encode, rows, self.width)

    def _encode(self, rows: np.ndarray) -> np.ndarray:
        return by_version(rows, lambda version, raw: self.encoders[version](raw))

    @bentoml.api
    async def load(self, version: str) -> str:
        """Load (and verify) a version before rows ask for it; its BentoML tag."""
        self.encoders[version]
        return str(self.encoders.tags[version])
