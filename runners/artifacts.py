"""Model files in the BentoML store: which tag a runner serves, verified before any load."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import bentoml

from configuration import Settings, registered_name

# skops loads only the types listed here beyond scikit-learn's own defaults.
SKOPS_TRUSTED_TYPES = ["numpy.dtype"]


class IntegrityError(RuntimeError):
    """A model file does not match the content hash recorded when it was imported."""


def model_tag(settings: Settings, component: str) -> str:
    """The tag a runner serves: the most recent import of <use-case>-<component>."""
    return f"{registered_name(settings.use_case, component)}:latest"


def served_model(service: Any) -> bentoml.Model:
    """The stored model a runner service declares (resolved without starting the service)."""
    return service.inner.bento_model.resolve()


def verified_file(model: bentoml.Model) -> Path:
    """The model's file, after checking its SHA-256 against the import-time record."""
    metadata = model.info.metadata
    path = Path(model.path_of(str(metadata["file"])))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != metadata["sha256"]:
        raise IntegrityError(
            f"{model.tag}: {path.name} has SHA-256 {digest}, expected {metadata['sha256']!s}; "
            "refusing to load it"
        )
    return path
