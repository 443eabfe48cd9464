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


def verified_file(model: bentoml.Model, key: str = "file") -> Path:
    """A file of the model (metadata[key] names it, metadata[key + "_sha256"] or, for the main
    file, metadata["sha256"] holds its hash), after checking its SHA-256."""
    metadata = model.info.metadata
    expected = metadata["sha256" if key == "file" else f"{key}_sha256"]
    path = Path(model.path_of(str(metadata[key])))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != expected:
        raise IntegrityError(
            f"{model.tag}: {path.name} has SHA-256 {digest}, expected {expected!s}; "
            "refusing to load it"
        )
    return path
