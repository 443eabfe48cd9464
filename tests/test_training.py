"""Training: data checks, MLflow registry and gates, lineage in the BentoML store, and parity
between the training path and the serving path."""

from __future__ import annotations

import asyncio
import hashlib
import re
import subprocess
from pathlib import Path

import bentoml
import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from configuration import Settings, get_settings, load_use_case
from configuration.settings import USE_CASE_DIR
from configuration.use_case import UseCaseError
from runners.artifacts import IntegrityError
from training import jobs
from training.data import generate_churn, validate_frame
from training.lineage import DataLineage, LineageError, frame_sha256
from training.registry import GateError
from training.store import SignatureMismatch

from .harness import PROJECT, run_cli

README = PROJECT / "README.md"

# A warning of MLflow or scikit-learn in a CLI's output, as a log record ("2026/01/01 00:00:00
# WARNING mlflow.sklearn: Model was missing function: predict. ...") or as a Python warning
# (".../sklearn/utils/validation.py:2823: UserWarning: X has feature names, ..."). `training demo`
# prints none: a user would take each for a problem.
LIBRARY_WARNING = re.compile(
    r"^.*\bWARNING (?:mlflow|sklearn)\b.*$"
    r"|^.*[/\\](?:mlflow|sklearn)[/\\]\S+\.py:\d+: \w*Warning\b.*$",
    re.MULTILINE,
)


def library_warnings(result: subprocess.CompletedProcess[str]) -> list[str]:
    return LIBRARY_WARNING.findall(f"{result.stdout}\n{result.stderr}")


def settings_with_use_cases(use_case_dir: Path) -> Settings:
    return get_settings().model_copy(update={"use_case_dir": use_case_dir})


def copy_use_case(tmp_path: Path, name: str, mutate=lambda raw: None) -> Path:
    raw = yaml.safe_load((USE_CASE_DIR / "churn.yaml").read_text())
    raw["name"] = name
    mutate(raw)
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path


class TestData:
    def test_generator_is_deterministic_with_signal_missing_values_and_pii(self, churn):
        first, second = generate_churn(3000, 7), generate_churn(3000, 7)
        pd.testing.assert_frame_equal(first, second)
        validate_frame(churn, first)
        assert first["total_charges"].isna().any() and first["region"].isna().any()
        assert first["email"].str.contains("@").all()
        rate = (first["churned"] == "churned").mean()
        assert 0.2 < rate < 0.5
        month_to_month = first["contract_type"] == "month_to_month"
        by_contract = first.groupby(month_to_month)["churned"].apply(
            lambda s: (s == "churned").mean()
        )
        assert by_contract[True] > by_contract[False] + 0.1  # the declared signal is there

    @pytest.mark.parametrize(
        ("change", "fragment"),
        [
            (lambda f: f.drop(columns=["tenure_months"]), "lacks columns ['tenure_months']"),
            (lambda f: f.assign(plan_tier="gold"), "column 'plan_tier': unknown categories"),
            (lambda f: f.assign(age=f["age"] + 200), "column 'age': values in"),
            (lambda f: f.assign(auto_pay="maybe"), "column 'auto_pay': non-boolean"),
            (lambda f: f.assign(age=None), "column 'age': 3000 missing values"),
            (lambda f: f.assign(churned="perhaps"), "column 'churned': labels must be one of"),
        ],
    )
    def test_mismatched_data_fails_naming_the_column(self, churn, change, fragment):
        with pytest.raises(UseCaseError) as info:
            validate_frame(churn, change(generate_churn(3000, 7)))
        assert fragment in str(info.value)


class TestRegistryAndStore:
    def test_demo_registers_candidate_and_champion_and_imports_with_lineage(
        self, demo_models, churn
    ):
        client = MlflowClient()
        model = demo_models["xgboost"]
        labels, metadata = model.info.labels, model.info.metadata
        version = client.get_model_version_by_alias("churn-xgboost", "champion")
        assert client.get_model_version_by_alias("churn-xgboost", "candidate").version == (
            version.version
        )
        assert labels["registered_name"] == "churn-xgboost"
        assert labels["registered_version"] == str(version.version)
        assert labels["run_id"] == version.run_id
        assert labels["alias"] == "champion" and labels["use_case"] == "churn"
        stored_file = Path(model.path_of(metadata["file"]))
        assert hashlib.sha256(stored_file.read_bytes()).hexdigest() == metadata["sha256"]
        assert metadata["use_case_sha256"] == churn.source_sha256
        assert metadata["metrics"]["roc_auc"] > 0.75
        run = client.get_run(version.run_id)
        assert run.data.metrics["xgboost.roc_auc"] == metadata["metrics"]["roc_auc"]
        assert {"xgboost.log_loss", "sklearn.accuracy", "sklearn.roc_auc"} <= set(run.data.metrics)
        artifacts = {a.path for a in client.list_artifacts(version.run_id, "use_case")}
        assert artifacts == {"use_case/churn.yaml"}
        preprocessor = demo_models["preprocessor"]
        assert metadata["preprocessor_sha256"] == preprocessor.info.metadata["sha256"]
        assert preprocessor.info.labels["run_id"] == version.run_id
        assert demo_models["sklearn"].info.metadata["file"] == "model.skops"

    def test_models_are_logged_with_signature_and_input_example(self, demo_models, churn):
        info = mlflow.models.get_model_info("models:/churn-preprocessor@candidate")
        assert [c["name"] for c in info.signature.inputs.to_dict()] == churn.model_feature_names
        assert info.saved_input_example_info is not None
        xgb_info = mlflow.models.get_model_info("models:/churn-xgboost@champion")
        assert xgb_info.signature is not None and "xgboost" in xgb_info.flavors

    def test_failing_gate_is_an_error_naming_the_metric(self, demo_models, tmp_path):
        use_case_dir = copy_use_case(
            tmp_path, "strict_churn", lambda raw: raw.update(gates={"roc_auc": {"min": 0.999}})
        )
        settings = settings_with_use_cases(use_case_dir)
        jobs.train(settings, "strict_churn")
        with pytest.raises(GateError, match=r"roc_auc = 0\.\d+ < min 0\.999"):
            jobs.promote(settings, "strict_churn", ("xgboost",))
        with pytest.raises(mlflow.exceptions.MlflowException):
            MlflowClient().get_model_version_by_alias("strict-churn-xgboost", "champion")

    def test_import_refuses_a_model_whose_signature_disagrees_with_the_use_case(
        self, demo_models, tmp_path
    ):
        use_case_dir = copy_use_case(tmp_path, "drift_churn")
        settings = settings_with_use_cases(use_case_dir)
        jobs.train(settings, "drift_churn")
        jobs.promote(settings, "drift_churn")

        def change_schema(raw):
            raw["features"] = [f for f in raw["features"] if f["name"] != "tenure_months"]
            for feature in raw["features"]:
                if feature["name"] == "region":
                    feature.update(type="numeric", min=0, max=5)
                    feature.pop("categories")
            for example in raw["examples"]:
                example.pop("tenure_months")
                example["region"] = 1

        copy_use_case(tmp_path, "drift_churn", change_schema)
        load_use_case.cache_clear()
        with pytest.raises(SignatureMismatch) as info:
            jobs.import_models(settings, "drift_churn", "champion")
        message = str(info.value)
        assert "not in the use case: ['tenure_months']" in message
        assert "region (string != double)" in message

    @pytest.mark.process
    def test_a_third_use_case_needs_only_a_yaml_and_a_csv(self, tmp_path):
        """Multiclass, from a CSV file, through the CLI: no Python change."""
        from sklearn.datasets import load_iris

        iris = load_iris(as_frame=True)
        frame = iris.data.rename(columns=lambda c: c.replace(" (cm)", "").replace(" ", "_"))
        frame["species"] = np.asarray(iris.target_names)[iris.target]
        frame.to_csv(tmp_path / "iris.csv", index=False)
        features = [
            {"name": c, "type": "numeric", "min": 0, "max": 20, "description": f"{c} in cm"}
            for c in frame.columns[:4]
        ]
        (tmp_path / "iris.yaml").write_text(
            yaml.safe_dump(
                {
                    "name": "iris",
                    "description": "Iris species from flower measurements.",
                    "task": "multiclass",
                    "target": {"name": "species", "classes": [str(n) for n in iris.target_names]},
                    "data": {"source": "iris.csv"},
                    "gates": {"accuracy": {"min": 0.8}},
                    "features": features,
                    # logged with each model, and MLflow runs it through the model as a check
                    "examples": [{c: float(frame.at[0, c]) for c in frame.columns[:4]}],
                }
            )
        )
        env = {"SCORING_USE_CASE_DIR": str(tmp_path), "SCORING_USE_CASE": "iris"}
        result = run_cli("training", "demo", env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        assert not library_warnings(result), "\n".join(library_warnings(result))
        model = bentoml.models.get("iris-xgboost:latest")
        assert model.info.metadata["classes"] == ["setosa", "versicolor", "virginica"]
        assert "roc_auc.setosa" in model.info.metadata["metrics"]
        assert model.info.metadata["metrics"]["accuracy"] > 0.8

    @pytest.mark.process
    def test_cli_reports_a_failing_gate_as_an_error_exit(self, demo_models, tmp_path):
        use_case_dir = copy_use_case(
            tmp_path, "gated", lambda raw: raw.update(gates={"log_loss": {"max": 0.01}})
        )
        env = {"SCORING_USE_CASE_DIR": str(use_case_dir)}
        run = run_cli("training", "demo", "--use-case", "gated", env=env)
        assert run.returncode == 2
        assert "log_loss" in run.stderr and "> max 0.01" in run.stderr
        assert "Traceback" not in run.stderr
        assert not library_warnings(run), "\n".join(library_warnings(run))


class TestLineage:
    """Which exact data trained a model: a full-content digest, from the run to every answer."""

    def test_the_digest_changes_with_one_row_of_the_file_and_not_otherwise(self, tmp_path):
        frame = generate_churn(12_000, 5)
        path = tmp_path / "churn.csv"
        frame.to_csv(path, index=False)

        def lineage() -> DataLineage:
            loaded = pd.read_csv(path)
            half = loaded.index[: len(loaded) // 2]
            return DataLineage.of(loaded, "churn.csv", path, half, loaded.index.difference(half))

        first = lineage()
        frame.to_csv(path, index=False)  # written again, same content
        assert lineage() == first
        assert first.data_rows == 12_000 and len(first.data_sha256) == 64
        assert first.data_source_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        changed = frame.copy()
        changed.loc[11_000, "monthly_charges"] += 0.01  # one value of one row past 10,000
        changed.to_csv(path, index=False)
        second = lineage()
        assert second.data_sha256 != first.data_sha256
        assert second.data_source_sha256 != first.data_source_sha256
        assert second.train_sha256 == first.train_sha256  # the changed row is held out
        assert second.holdout_sha256 != first.holdout_sha256
        # MLflow's own digest reads only the first 10,000 rows: it cannot tell these apart
        mlflow_digest = lambda f: mlflow.data.from_pandas(f).digest  # noqa: E731
        assert mlflow_digest(frame) == mlflow_digest(changed)

    def test_the_readme_shows_the_demo_datas_digest(self, churn):
        """The README's /v1/model output: the demo's 20,000 generated rows (default seed)."""
        shown = re.search(
            r'"data_sha256": "([0-9a-f]{64})", "data_rows": (\d+)', README.read_text()
        )
        assert shown, "README lost its lineage example"
        defaults = Settings.model_fields
        rows, seed = defaults["demo_rows"].default, defaults["seed"].default
        assert int(shown[2]) == rows
        assert frame_sha256(validate_frame(churn, generate_churn(rows, seed))) == shown[1]

    def test_training_logs_the_digest_and_the_import_carries_it(self, demo_models, churn):
        client = MlflowClient()
        model = demo_models["xgboost"]
        run = client.get_run(model.info.labels["run_id"])
        digest = run.data.tags["data_sha256"]
        expected = frame_sha256(validate_frame(churn, generate_churn(4000, get_settings().seed)))
        assert digest == expected  # the whole table, as trained on (SCORING_DEMO_ROWS=4000)
        assert run.data.tags["data_rows"] == "4000"
        assert run.data.tags["data_source"] == "generator:churn"
        inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
        assert set(inputs) == {"source", "training", "evaluation"}  # the contexts
        assert inputs["source"].digest == digest[:36] and inputs["source"].name == "churn-source"
        for part in demo_models.values():
            assert part.info.labels["data_sha256"] == digest  # a signed label
            assert part.info.metadata["train_sha256"] == run.data.tags["train_sha256"]
        version = client.get_model_version_by_alias("churn-xgboost", "champion")
        assert version.tags["data_sha256"] == digest

    def test_promote_refuses_a_changed_training_file_or_a_missing_digest(self, tmp_path):
        generate_churn(3000, 9).to_csv(tmp_path / "lineage.csv", index=False)
        use_case_dir = copy_use_case(
            tmp_path, "lineage", lambda raw: raw["data"].update(source="lineage.csv")
        )
        settings = settings_with_use_cases(use_case_dir)
        jobs.train(settings, "lineage")
        original = (tmp_path / "lineage.csv").read_text()
        lines = original.splitlines(keepends=True)
        lines[5] = lines[5].replace("@", "+changed@", 1)  # one row, one value
        (tmp_path / "lineage.csv").write_text("".join(lines))
        with pytest.raises(
            LineageError, match=r"lineage-xgboost v1 not promoted: its training file .*changed"
        ):
            jobs.promote(settings, "lineage", ("xgboost",))
        (tmp_path / "lineage.csv").write_text(original)
        assert jobs.promote(settings, "lineage", ("xgboost",)) == {"xgboost": "1"}
        client = MlflowClient()
        version = client.get_model_version_by_alias("lineage-sklearn", "candidate")
        client.delete_tag(version.run_id, "data_sha256")
        with pytest.raises(LineageError, match="records no data digest"):
            jobs.promote(settings, "lineage", ("sklearn",))


class TestParity:
    """The same raw rows through the training path (MLflow-logged sklearn/xgboost objects) and
    the serving path (the runner services) give identical features and predictions."""

    def test_training_and_serving_paths_agree_on_features_and_probabilities(
        self, demo_models, churn
    ):
        from runners.preprocessor import Preprocessor
        from runners.sklearn_runner import SklearnRunner
        from runners.xgboost_runner import XGBoostRunner

        raw = generate_churn(2000, seed=123)
        rows = raw.drop(columns=["churned"]).to_dict("records")
        rows = [
            {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in r.items()}
            for r in rows
        ]

        trained_preprocessor = mlflow.sklearn.load_model("models:/churn-preprocessor@candidate")
        expected_features = trained_preprocessor.transform(churn.frame(raw))
        preprocessor = Preprocessor.inner()
        # the runners' inputs carry each row's registry version in column 0
        version = np.full((len(rows), 1), preprocessor.version, dtype=object)
        served_features = asyncio.run(
            preprocessor.transform(np.hstack([version, churn.matrix(rows)]))
        )
        np.testing.assert_array_equal(served_features, expected_features)

        for flavor, runner in (("xgboost", XGBoostRunner), ("sklearn", SklearnRunner)):
            loader = mlflow.xgboost if flavor == "xgboost" else mlflow.sklearn
            trained = loader.load_model(f"models:/churn-{flavor}@champion")
            expected = trained.predict_proba(expected_features)
            served_by = runner.inner()
            model_version = float(served_by.model.info.labels["registered_version"])
            model_input = np.column_stack([np.full(len(rows), model_version), served_features])
            served = asyncio.run(served_by.predict_proba(model_input))
            np.testing.assert_allclose(served, expected, rtol=0, atol=1e-6)

    def test_a_tampered_model_file_is_refused(self, demo_models, tmp_path):
        from runners.xgboost_runner import XGBoostRunner

        model = demo_models["xgboost"]
        path = Path(model.path_of(model.info.metadata["file"]))
        original = path.read_bytes()
        try:
            path.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
            with pytest.raises(IntegrityError, match="refusing to load"):
                XGBoostRunner.inner()
        finally:
            path.write_bytes(original)
