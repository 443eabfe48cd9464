"""Settings, use cases and the HTTP contract shared by training and serving."""

import os

# No telemetry leaves the machine: BentoML's usage tracking is off unless a user opts back in.
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

from configuration.contract import (
    API_PREFIX,
    REQUEST,
    Contract,
    DriftReport,
    ModelInfo,
    ModelRef,
    RoutingChange,
    RoutingInfo,
    RoutingSpec,
    RowError,
    StoredModel,
    TaskInfo,
    contract_for,
)
from configuration.settings import PROJECT_ROOT, Settings, get_settings
from configuration.use_case import (
    FeatureSpec,
    UseCase,
    UseCaseError,
    load_use_case,
    registered_name,
)


def current_use_case(settings: Settings | None = None) -> UseCase:
    """The use case named by the settings."""
    settings = settings or get_settings()
    return load_use_case(settings.use_case_path())


__all__ = [
    "API_PREFIX",
    "PROJECT_ROOT",
    "REQUEST",
    "Contract",
    "DriftReport",
    "FeatureSpec",
    "ModelInfo",
    "ModelRef",
    "RoutingChange",
    "RoutingInfo",
    "RoutingSpec",
    "RowError",
    "Settings",
    "StoredModel",
    "TaskInfo",
    "UseCase",
    "UseCaseError",
    "contract_for",
    "current_use_case",
    "get_settings",
    "load_use_case",
    "registered_name",
]
