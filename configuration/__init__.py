"""Settings, use cases and the logic training, batch scoring and serving share."""

import os

# No telemetry leaves the machine: BentoML's usage tracking is off unless a user opts back in.
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

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
    "PROJECT_ROOT",
    "FeatureSpec",
    "Settings",
    "UseCase",
    "UseCaseError",
    "current_use_case",
    "get_settings",
    "load_use_case",
    "registered_name",
]
