"""The training jobs the CLI runs: train, promote, import, and the demo that chains them."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import bentoml

from configuration import Settings, UseCase, load_use_case
from training import registry, store
from training.data import data_file, load_frame, validate_frame
from training.lineage import DataLineage
from training.pipeline import FLAVORS, fit

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    run: registry.RegisteredRun
    metrics: dict[str, dict[str, float]]


def use_case_of(settings: Settings, name: str | None) -> tuple[UseCase, Path]:
    path = settings.use_case_path(name)
    return load_use_case(path), path


def train(settings: Settings, name: str | None = None, data: Path | None = None) -> TrainResult:
    """Load and validate data, fit, evaluate, log to MLflow and register as `candidate`."""
    use_case, path = use_case_of(settings, name)
    if data is not None:
        use_case = use_case.model_copy(
            update={"data": use_case.data.model_copy(update={"source": str(data.resolve())})}
        )
    frame = validate_frame(use_case, load_frame(use_case, path, settings.demo_rows, settings.seed))
    trained = fit(use_case, frame, settings)
    lineage = DataLineage.of(
        frame,
        use_case.data.source,
        data_file(use_case, path),
        trained.train_index,
        trained.holdout_index,
    )
    run = registry.log_and_register(settings, use_case, path, trained, lineage, frame)
    LOG.info("trained on %d rows, SHA-256 %s", lineage.data_rows, lineage.data_sha256)
    return TrainResult(run=run, metrics=trained.metrics)


def promote(
    settings: Settings,
    name: str | None = None,
    flavors: tuple[str, ...] = FLAVORS,
    source_alias: str = registry.CANDIDATE,
    target_alias: str = registry.CHAMPION,
) -> dict[str, str]:
    """Promote each flavor through its gates; returns flavor -> promoted registry version."""
    use_case, _ = use_case_of(settings, name)
    registry.configure(settings, use_case)
    client = registry.client_for(settings)
    return {
        flavor: str(
            registry.promote(
                client, use_case, flavor, source_alias=source_alias, target_alias=target_alias
            ).version
        )
        for flavor in flavors
    }


def import_models(
    settings: Settings, name: str | None = None, alias: str | None = None
) -> dict[str, bentoml.Model]:
    """Import the versions behind an alias (default: the served alias) into the BentoML store."""
    use_case, _ = use_case_of(settings, name)
    registry.configure(settings, use_case)
    return store.import_alias(settings, use_case, alias or settings.model_alias)


def demo(settings: Settings, name: str | None = None) -> dict[str, bentoml.Model]:
    """Train, promote both models through their gates, import the champions."""
    result = train(settings, name)
    LOG.info("metrics: %s", result.metrics)
    promote(settings, name)
    return import_models(settings, name, registry.CHAMPION)
