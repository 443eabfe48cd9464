"""Model files in the BentoML store: which tag a runner serves, verified before any load."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from functools import cache
from pathlib import Path
from typing import Any, Generic, TypeVar

import bentoml

from configuration import Settings, get_settings, registered_name
from configuration.digests import sha256_of
from configuration.signing import load_public_key, verify_model_dir

T = TypeVar("T")
LOG = logging.getLogger(__name__)

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


@cache
def warn_signatures_unverified() -> None:
    """Say once per process that model signatures go unchecked: a warning from the API worker
    (or a CLI), the same line at INFO from the runner workers, so a server says it once."""
    runner = bentoml.server_context.service_type == "service"
    LOG.log(
        logging.INFO if runner else logging.WARNING,
        "model signatures are not verified because SCORING_MODEL_PUBLIC_KEY is unset: a model "
        "file is only checked against the SHA-256 stored beside it, in the same store",
    )


def verified_file(
    model: bentoml.Model, key: str = "file", settings: Settings | None = None
) -> Path:
    """A file of the model (metadata[key] names it, metadata[key + "_sha256"] or, for the main
    file, metadata["sha256"] holds its hash), after checking its SHA-256; with
    `model_public_key` set, after verifying the signature of the whole model first
    (configuration.signing.SignatureError if it does not verify)."""
    settings = get_settings() if settings is None else settings
    metadata = model.info.metadata
    if settings.model_public_key is None:
        warn_signatures_unverified()
    else:
        public_key = load_public_key(settings.model_public_key)
        verify_model_dir(Path(model.path), str(model.tag), model.info.labels, metadata, public_key)
    expected = metadata["sha256" if key == "file" else f"{key}_sha256"]
    path = Path(model.path_of(str(metadata[key])))
    digest = sha256_of(path)
    if digest != expected:
        raise IntegrityError(
            f"{model.tag}: {path.name} has SHA-256 {digest}, expected {expected!s}; "
            "refusing to load it"
        )
    return path


class ModelNotFound(LookupError):
    """No imported model has the requested registry version."""


def imports(settings: Settings, component: str) -> list[bentoml.Model]:
    """Every import of <use-case>-<component> in the model store, newest first."""
    try:
        found = bentoml.models.list(registered_name(settings.use_case, component))
    except bentoml.exceptions.NotFound:
        return []
    return sorted(found, key=lambda m: m.info.creation_time, reverse=True)


def find_version(settings: Settings, component: str, version: str) -> bentoml.Model:
    """The newest import of <use-case>-<component> with this MLflow registry version."""
    for model in imports(settings, component):
        if model.info.labels.get("registered_version") == str(version):
            return model
    name = registered_name(settings.use_case, component)
    raise ModelNotFound(f"no import of {name} version {version} in the model store")


def newest_import(models: Iterable[bentoml.Model], alias: str) -> bentoml.Model | None:
    """The newest of `models` imported under the registry alias `alias` (None: no such import)."""
    aliased = [m for m in models if m.info.labels.get("alias") == alias]
    return max(aliased, key=lambda m: m.info.creation_time, default=None)


class PreprocessorMismatch(LookupError):
    """The stored preprocessor is not the one a model was trained with."""


def preprocessor_of(model: bentoml.Model) -> bentoml.Model:
    """The preprocessor a model was trained with, as its import recorded it (tag and hash)."""
    preprocessor = bentoml.models.get(str(model.info.metadata["preprocessor_tag"]))
    if preprocessor.info.metadata["sha256"] != model.info.metadata["preprocessor_sha256"]:
        raise PreprocessorMismatch(
            f"{preprocessor.tag} is not the preprocessor {model.tag} was trained with"
        )
    return preprocessor


def pin_versions(settings: Settings, component: str) -> Callable[[type[T]], type[T]]:
    """Class decorator (below `@bentoml.service`): the newest `settings.packed_versions`
    imports of the serving flavor (for the preprocessor: the preprocessors they were trained
    with) become class-level BentoModels, so that `bentoml build` packs them into the Bento
    and a rollback to any of them needs no rebuild."""

    def pin(cls: type[T]) -> type[T]:
        models = imports(settings, settings.model_flavor)[: settings.packed_versions]
        if component == "preprocessor":
            tags = {str(m.info.metadata["preprocessor_tag"]) for m in models}
        else:
            tags = {str(m.tag) for m in models}
        for index, tag in enumerate(sorted(tags)):
            setattr(cls, f"packed_model_{index}", bentoml.models.BentoModel(tag))
        return cls

    return pin


class Versions(Generic[T]):
    """The versions of one registered model a runner worker has loaded, by registry version;
    a version is loaded (and its files verified) the first time it is asked for."""

    def __init__(self, settings: Settings, component: str, load: Callable[[bentoml.Model], T]):
        self.settings = settings
        self.component = component
        self.load = load
        self.loaded: dict[str, T] = {}
        self.tags: dict[str, str] = {}

    def __getitem__(self, version: str) -> T:
        version = str(version)
        if version not in self.loaded:
            model = find_version(self.settings, self.component, version)
            self.loaded[version] = self.load(model)
            self.tags[version] = str(model.tag)
        return self.loaded[version]
