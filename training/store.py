"""Import registered MLflow model versions into the BentoML model store, with their lineage.

We copy the native model file out of the registered MLflow model (XGBoost UBJSON, skops) into a
BentoML model of our own instead of `bentoml.mlflow.import_model`: serving then needs neither
MLflow nor its pyfunc wrapper (which only returns labels, not probabilities), and the file's
SHA-256 is recorded here and verified by the runner before it loads anything. Each stored model
is also signed (configuration/signing.py), so that a runner given the public key can tell a
model changed in the store from one imported here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import bentoml
import mlflow
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from mlflow.models import Model as MLflowModel
from mlflow.models import ModelSignature

from configuration import Settings, UseCase, UseCaseError
from configuration.digests import sha256_of
from configuration.signing import sign_model_dir, signing_key
from runners.artifacts import SKOPS_TRUSTED_TYPES
from training import onnx_export
from training.encoder_compiler import NotCompilable, check_parity, compile_encoder
from training.lineage import TAGS as DATA_TAGS
from training.pipeline import FLAVORS
from training.registry import (
    PREPROCESSOR,
    REFERENCE_ARTIFACT,
    VERSION_TAG_PREPROCESSOR,
    client_for,
    download,
    resolve,
)

LOG = logging.getLogger(__name__)
MODEL_FILES = {"xgboost": "model.ubj", "sklearn": "model.skops", PREPROCESSOR: "model.skops"}
STORED_FILE = "model{suffix}"
ENCODER_FILE = "encoder.json"


class SignatureMismatch(UseCaseError):
    """A registered model's MLflow signature disagrees with the use case schema."""


def _columns(schema: Any) -> list[tuple[str, str]]:
    return [(str(col.name), col.type.name) for col in schema.inputs] if schema else []


def check_signatures(
    use_case: UseCase, preprocessor: ModelSignature | None, model: ModelSignature | None
) -> list[str]:
    """Raise SignatureMismatch naming the columns where the registered signatures disagree with
    the use case; return the encoded feature names."""
    if preprocessor is None or model is None or preprocessor.outputs is None:
        raise SignatureMismatch(f"{use_case.name}: registered models carry no MLflow signature")
    expected = [
        (f.name, "string" if f.type == "categorical" else "double") for f in use_case.model_features
    ]
    found = _columns(preprocessor)
    problems = []
    missing = [name for name, _ in expected if name not in dict(found)]
    extra = [name for name, _ in found if name not in dict(expected)]
    if missing:
        problems.append(f"columns in the use case but not in the model: {missing}")
    if extra:
        problems.append(f"columns in the model but not in the use case: {extra}")
    types = dict(found)
    retyped = [f"{n} ({types[n]} != {t})" for n, t in expected if n in types and types[n] != t]
    if retyped:
        problems.append(f"columns with another type: {retyped}")
    if not problems and [n for n, _ in found] != [n for n, _ in expected]:
        problems.append("columns are in another order than in the use case")
    encoded = [str(col.name) for col in preprocessor.outputs.inputs]
    model_inputs = [name for name, _ in _columns(model)]
    if model_inputs != encoded:
        diff = sorted(set(model_inputs) ^ set(encoded))
        problems.append(f"model inputs differ from the preprocessor outputs: {diff or 'order'}")
    if problems:
        raise SignatureMismatch(f"use case {use_case.name!r}: " + "; ".join(problems))
    return encoded


def _save(
    use_case: UseCase,
    component: str,
    version: str,
    source_dir: Path,
    labels: dict[str, str],
    metadata: dict[str, Any],
    signer: Ed25519PrivateKey,
    extra_files: dict[str, tuple[str, bytes]] | None = None,
) -> bentoml.Model:
    """Store one native model file under <use-case>-<component>:v<version>-<sha>, signed with
    `signer`; re-importing the same file re-creates it so that `:latest` points at the most recent
    import. `extra_files` maps a metadata key to (file name, content); each gets `<key>_sha256`."""
    source = source_dir / MODEL_FILES[component]
    digest = sha256_of(source)
    tag = f"{use_case.registered_name(component)}:v{version}-{digest[:12]}"
    with contextlib.suppress(bentoml.exceptions.NotFound):
        bentoml.models.delete(tag)
    stored_name = STORED_FILE.format(suffix=source.suffix)
    extras = extra_files or {}
    for key, (name, content) in extras.items():
        metadata = {**metadata, key: name, f"{key}_sha256": hashlib.sha256(content).hexdigest()}
    with bentoml.models.create(
        tag,
        labels={**labels, "component": component},
        metadata={**metadata, "file": stored_name, "sha256": digest},
    ) as model:
        shutil.copyfile(source, model.path_of(stored_name))
        for name, content in extras.values():
            Path(model.path_of(name)).write_bytes(content)
        # signed last, over the files as stored; BentoML writes model.yaml when the block ends
        signed = sign_model_dir(Path(model.path), str(model.tag), model.info.labels, signer)
        model.info.metadata.update(signed)
    return bentoml.models.get(tag)


def compiled_encoder(
    use_case: UseCase, preprocessor_dir: Path, feature_names: list[str]
) -> dict[str, tuple[str, bytes]]:
    """The numpy form of the registered transformer, if it compiles and reproduces the
    transformer exactly on the use case's examples and random rows; else nothing (the runner
    then serves the transformer through scikit-learn)."""
    import skops.io

    transformer = skops.io.load(
        preprocessor_dir / MODEL_FILES[PREPROCESSOR], trusted=SKOPS_TRUSTED_TYPES
    )
    try:
        encoder = compile_encoder(transformer, use_case.model_feature_names, feature_names)
        check_parity(use_case, transformer, encoder)
    except NotCompilable as exc:
        LOG.warning("serving the preprocessor through scikit-learn: %s", exc)
        return {}
    return {"encoder": (ENCODER_FILE, json.dumps(encoder.to_dict()).encode())}


def import_alias(settings: Settings, use_case: UseCase, alias: str) -> dict[str, bentoml.Model]:
    """Import `models:/<use-case>-<flavor>@<alias>` for each flavor and the preprocessor it was
    trained with. The serving flavor goes last, so `<use-case>-preprocessor:latest` is its own."""
    imported: dict[str, bentoml.Model] = {}
    flavors = sorted(FLAVORS, key=lambda flavor: flavor == settings.model_flavor)
    signer = signing_key(settings)
    client = client_for(settings)
    with tempfile.TemporaryDirectory(prefix="scoring-import-") as scratch:
        for flavor in flavors:
            version = resolve(client, use_case, flavor, alias)
            preprocessor_version = version.tags[VERSION_TAG_PREPROCESSOR]
            pre_dir = download(use_case, PREPROCESSOR, preprocessor_version, Path(scratch) / "p")
            model_dir = download(use_case, flavor, str(version.version), Path(scratch) / flavor)
            feature_names = check_signatures(
                use_case,
                MLflowModel.load(str(pre_dir / "MLmodel")).signature,
                MLflowModel.load(str(model_dir / "MLmodel")).signature,
            )
            assert version.run_id is not None
            run = client.get_run(version.run_id)
            lineage = {
                "use_case": use_case.name,
                "alias": alias,
                "run_id": version.run_id,
                "data_sha256": run.data.tags.get("data_sha256", ""),  # labels are signed
            }
            common = {
                **{key: run.data.tags.get(key, "") for key in DATA_TAGS},
                "use_case_sha256": run.data.tags.get("use_case_sha256", ""),
                "classes": list(use_case.target.classes),
                "feature_names": feature_names,
                "tracking_uri": settings.mlflow_tracking_uri,
                "imported_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            pre = _save(
                use_case,
                PREPROCESSOR,
                preprocessor_version,
                pre_dir,
                labels={
                    **lineage,
                    "registered_name": use_case.registered_name(PREPROCESSOR),
                    "registered_version": preprocessor_version,
                },
                metadata=common,
                signer=signer,
                extra_files=compiled_encoder(use_case, pre_dir, feature_names),
            )
            metrics = {
                key.removeprefix(f"{flavor}."): value
                for key, value in run.data.metrics.items()
                if key.startswith(f"{flavor}.")
            }
            reference = mlflow.artifacts.download_artifacts(
                run_id=version.run_id, artifact_path=REFERENCE_ARTIFACT, dst_path=scratch
            )
            onnx_files, onnx_metadata = onnx_export.stored_export(
                run, flavor, Path(scratch) / f"{flavor}-onnx"
            )
            imported[flavor] = _save(
                use_case,
                flavor,
                str(version.version),
                model_dir,
                labels={
                    **lineage,
                    "registered_name": use_case.registered_name(flavor),
                    "registered_version": str(version.version),
                    "flavor": flavor,
                },
                metadata={
                    **common,
                    "metrics": metrics,
                    "preprocessor_tag": str(pre.tag),
                    "preprocessor_sha256": pre.info.metadata["sha256"],
                    **onnx_metadata,
                },
                signer=signer,
                extra_files={
                    "reference": ("reference.json", Path(reference).read_bytes()),
                    **onnx_files,  # the ONNX graph, if it passed the parity gate
                },
            )
            imported[PREPROCESSOR] = pre
            LOG.info("imported %s (with %s)", imported[flavor].tag, pre.tag)
    return imported
