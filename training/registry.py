"""MLflow tracking and Model Registry: log a training run, register its models, promote by gates."""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from configuration import Settings, UseCase
from runners.artifacts import SKOPS_TRUSTED_TYPES
from training import onnx_export
from training.lineage import DataLineage, check_run
from training.pipeline import FLAVORS, TrainedModels

LOG = logging.getLogger(__name__)
CANDIDATE = "candidate"
CHAMPION = "champion"
PREPROCESSOR = "preprocessor"
VERSION_TAG_PREPROCESSOR = "preprocessor_version"


class GateError(RuntimeError):
    """A model version failed a metric gate and was not promoted."""


REFERENCE_ARTIFACT = "reference/reference.json"  # drift reference statistics of the run


def client_for(settings: Settings) -> MlflowClient:
    """The tracking and registry client of the configured URI (an explicit client: reads and
    alias moves never depend on the process-wide URI)."""
    uri = settings.mlflow_tracking_uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def configure(settings: Settings, use_case: UseCase) -> str:
    """Point MLflow's logging (`mlflow.start_run`, `log_model`: only the process-wide URI
    reaches them) at the configured tracking URI and return the experiment id."""
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    mlflow.set_registry_uri(settings.mlflow_tracking_uri)
    name = settings.experiment_name.format(use_case=use_case.name)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return str(experiment.experiment_id)
    artifact_location = None
    if settings.mlflow_tracking_uri.startswith("sqlite:"):
        settings.mlflow_artifact_root.mkdir(parents=True, exist_ok=True)
        artifact_location = settings.mlflow_artifact_root.resolve().as_uri()
    return str(mlflow.create_experiment(name, artifact_location=artifact_location))


def raw_signature(use_case: UseCase, feature_names: list[str]) -> ModelSignature:
    """Preprocessor signature: the use case's model-input columns as `UseCase.frame` types them."""
    inputs = Schema(
        [
            ColSpec(
                "string" if f.type == "categorical" else "double", f.name, required=not f.nullable
            )
            for f in use_case.model_features
        ]
    )
    return ModelSignature(inputs=inputs, outputs=feature_signature(feature_names).inputs)


def feature_signature(feature_names: list[str]) -> ModelSignature:
    """Model signature: the encoded feature columns the preprocessor emits."""
    return ModelSignature(inputs=Schema([ColSpec("double", name) for name in feature_names]))


class _DropRecords(logging.Filter):
    """Drops the log records whose message matches `pattern` (from its start)."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern, re.DOTALL)

    def filter(self, record: logging.LogRecord) -> bool:
        return self.pattern.match(record.getMessage()) is None


@contextmanager
def _without_log_records(*known: tuple[str, str]) -> Iterator[None]:
    """While the block runs, drop the records of each (logger name, message pattern)."""
    filters = [(logging.getLogger(name), _DropRecords(pattern)) for name, pattern in known]
    for logger, drop in filters:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger, drop in filters:
            logger.removeFilter(drop)


@dataclass(frozen=True)
class RegisteredRun:
    run_id: str
    versions: dict[str, str]  # component -> registry version


def log_and_register(
    settings: Settings,
    use_case: UseCase,
    use_case_path: Path,
    trained: TrainedModels,
    data: DataLineage | None = None,
    frame: pd.DataFrame | None = None,
) -> RegisteredRun:
    """One MLflow run with params, metrics, the use case file, the data lineage (`data`, of the
    table `frame`) and three registered models, each version given the alias `candidate`."""
    experiment_id = configure(settings, use_case)
    client = client_for(settings)
    example_raw = use_case.frame([dict(use_case.examples[0])]) if use_case.examples else None
    example_features = (
        pd.DataFrame(trained.preprocessor.transform(example_raw), columns=trained.feature_names)
        if example_raw is not None
        else None
    )
    estimator = type(trained.models["sklearn"]).__name__
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.set_tags({"use_case": use_case.name, "use_case_sha256": use_case.source_sha256})
        mlflow.log_params(trained.params)
        for flavor, metrics in trained.metrics.items():
            mlflow.log_metrics({f"{flavor}.{name}": value for name, value in metrics.items()})
        mlflow.log_artifact(str(use_case_path), artifact_path="use_case")
        mlflow.log_dict(trained.reference, REFERENCE_ARTIFACT)
        if data is not None and frame is not None:
            data.log(
                use_case.name,
                frame,
                use_case.target.name,
                trained.train_index,
                trained.holdout_index,
            )
        # one ONNX graph per model, each only if it passes the parity gate (docs/onnx.md)
        onnx_export.log_exports(settings, use_case, trained.preprocessor, trained.models)
        infos = {}
        # The preprocessor is a transformer: it has no `predict`, so MLflow logs it without a
        # pyfunc flavor and cannot run its input example through one, and says so in these two
        # warnings. Expected: nothing serves it through MLflow (the runners load its skops file;
        # the parity test checks that path), so exactly these two records are dropped.
        with _without_log_records(
            ("mlflow.sklearn", r"Model was missing function: predict\. "),
            (
                "mlflow.models.model",
                r"Failed to validate serving input example .*"
                r'Got error: Model does not have the "python_function" flavor',
            ),
        ):
            infos[PREPROCESSOR] = mlflow.sklearn.log_model(
                trained.preprocessor,
                name=PREPROCESSOR,
                signature=raw_signature(use_case, trained.feature_names),
                input_example=example_raw,
                serialization_format="skops",
                skops_trusted_types=SKOPS_TRUSTED_TYPES,
                registered_model_name=use_case.registered_name(PREPROCESSOR),
            )
        infos["xgboost"] = mlflow.xgboost.log_model(
            trained.models["xgboost"],
            name="xgboost",
            signature=feature_signature(trained.feature_names),
            input_example=example_features,
            model_format="ubj",
            registered_model_name=use_case.registered_name("xgboost"),
        )
        # MLflow checks the input example through pyfunc as a DataFrame named by the signature;
        # the estimator was fitted on arrays, as the runners serve it, so scikit-learn notes the
        # names it cannot check. Harmless: the signature's columns are the fitted features, in
        # order. Only that warning is ignored, only here.
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore",
                message=re.escape(
                    f"X has feature names, but {estimator} was fitted without feature names"
                ),
                category=UserWarning,
            )
            infos["sklearn"] = mlflow.sklearn.log_model(
                trained.models["sklearn"],
                name="sklearn",
                signature=feature_signature(trained.feature_names),
                input_example=example_features,
                serialization_format="skops",
                skops_trusted_types=SKOPS_TRUSTED_TYPES,
                registered_model_name=use_case.registered_name("sklearn"),
            )
    versions = {component: str(info.registered_model_version) for component, info in infos.items()}
    for component, version in versions.items():
        name = use_case.registered_name(component)
        client.set_model_version_tag(name, version, "use_case", use_case.name)
        client.set_model_version_tag(name, version, "run_id", run.info.run_id)
        if data is not None:
            client.set_model_version_tag(name, version, "data_sha256", data.data_sha256)
        if component in FLAVORS:
            client.set_model_version_tag(
                name, version, VERSION_TAG_PREPROCESSOR, versions[PREPROCESSOR]
            )
        client.set_registered_model_alias(name, CANDIDATE, version)
    LOG.info("run %s registered %s as %s", run.info.run_id, versions, CANDIDATE)
    return RegisteredRun(run_id=run.info.run_id, versions=versions)


def resolve(client: MlflowClient, use_case: UseCase, flavor: str, alias: str) -> ModelVersion:
    """The registry version behind `models:/<use-case>-<flavor>@<alias>`."""
    name = use_case.registered_name(flavor)
    try:
        return client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException as exc:
        raise LookupError(f"no version of {name!r} has alias {alias!r}: train first") from exc


def check_gates(
    client: MlflowClient, use_case: UseCase, flavor: str, version: ModelVersion
) -> dict[str, float]:
    """The version's held-out metrics; GateError naming each failed metric."""
    assert version.run_id is not None
    run_metrics = client.get_run(version.run_id).data.metrics
    failures = []
    for metric, gate in use_case.gates.items():
        value = run_metrics.get(f"{flavor}.{metric}")
        if value is None:
            failures.append(f"{metric}: not logged")
        elif gate.min is not None and value < gate.min:
            failures.append(f"{metric} = {value:.4f} < min {gate.min}")
        elif gate.max is not None and value > gate.max:
            failures.append(f"{metric} = {value:.4f} > max {gate.max}")
    if failures:
        raise GateError(
            f"{use_case.registered_name(flavor)} v{version.version} not promoted: "
            + "; ".join(failures)
        )
    return {k.removeprefix(f"{flavor}."): v for k, v in run_metrics.items() if k.startswith(flavor)}


def promote(
    client: MlflowClient,
    use_case: UseCase,
    flavor: str,
    *,
    source_alias: str = CANDIDATE,
    target_alias: str = CHAMPION,
) -> ModelVersion:
    """Move `target_alias` to the version behind `source_alias`, only if every gate passes.
    (The preprocessor needs no alias: each model version names its own in a version tag.)"""
    version = resolve(client, use_case, flavor, source_alias)
    check_gates(client, use_case, flavor, version)
    assert version.run_id is not None
    check_run(
        client.get_run(version.run_id).data.tags,
        f"{use_case.registered_name(flavor)} v{version.version}",
    )
    client.set_registered_model_alias(
        use_case.registered_name(flavor), target_alias, str(version.version)
    )
    LOG.info("%s v%s is now %s", use_case.registered_name(flavor), version.version, target_alias)
    return version


def download(use_case: UseCase, component: str, version: str, into: Path) -> Path:
    """Copy a registered model version's MLflow model folder to a local directory."""
    uri = f"models:/{use_case.registered_name(component)}/{version}"
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(into)))
