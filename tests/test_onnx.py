"""The ONNX export, in process: the graph answers as the served model does on the examples and
10 000 random rows, its preprocessing reproduces the served encoder bit for bit, a tampered
graph is refused by the parity gate while training goes on without it, and /v1/model.onnx sends
the verified graph with its lineage in headers (or a 404 in the one error shape)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from mlflow import MlflowClient
from onnx import ModelProto

from configuration import get_settings
from runners.artifacts import verified_file
from runners.preprocessor import load_encoder
from training import jobs, onnx_export
from training.encoder_compiler import compile_encoder
from training.pipeline import FLAVORS, fit

from .test_training import copy_use_case, settings_with_use_cases

TREES = "TreeEnsembleClassifier"


@pytest.fixture(scope="module")
def trained(churn):
    """Both models fitted on a small churn table (no MLflow)."""
    from training.data import generate_churn

    settings = get_settings()
    return fit(churn, generate_churn(3000, settings.seed), settings)


def tampered(graph: bytes, change) -> bytes:
    """The graph with `change(node)` applied to its tree ensemble."""
    model = ModelProto.FromString(graph)
    [trees] = [n for n in model.graph.node if n.op_type == TREES]
    change(trees)
    return bytes(model.SerializeToString())


def attribute(node, name: str):
    return next(a for a in node.attribute if a.name == name)


def served(model, preprocessor, churn, rows) -> np.ndarray:
    """Probabilities as the runners compute them, from the files in the model store."""
    encode = load_encoder(preprocessor, churn)
    features = encode(churn.matrix(rows))
    flavor = model.info.labels["flavor"]
    if flavor == "xgboost":
        from runners.xgboost_runner import load_predictor

        return load_predictor(model, 1)(features)
    from runners.sklearn_runner import load_predictor as load_sklearn

    return load_sklearn(model)(features)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_the_stored_graph_answers_as_the_served_model_on_examples_and_random_rows(
    demo_models, churn, flavor
):
    model, preprocessor = demo_models[flavor], demo_models["preprocessor"]
    graph = verified_file(model, "onnx").read_bytes()
    settings = get_settings()
    rows = onnx_export.parity_rows(churn, settings.onnx_parity_rows, seed=settings.seed + 1)
    assert len(rows) == len(churn.examples) + 10_000
    for spec in churn.model_features:  # every category, and missing values where allowed
        seen = {row.get(spec.name) for row in rows}
        if spec.type == "categorical":
            assert set(spec.categories) <= seen, spec.name
        if spec.nullable:
            assert None in seen, spec.name
    got = onnx_export.onnx_probabilities(onnx_export.session(graph), churn, rows)
    expected = served(model, preprocessor, churn, rows)
    worst = float(np.abs(got - expected).max())
    print(f"{flavor}: {len(graph)} bytes, max |dp| {worst:.3g} on {len(rows)} rows")
    assert worst <= settings.onnx_parity_tolerance
    assert model.info.metadata["onnx_max_abs_diff"] <= settings.onnx_parity_tolerance


def test_the_preprocessing_graph_reproduces_the_served_encoder_exactly(trained, churn):
    encoder = compile_encoder(
        trained.preprocessor, churn.model_feature_names, trained.feature_names
    )
    graph = onnx_export.preprocessing_graph(churn, encoder).SerializeToString()
    rows = onnx_export.parity_rows(churn, 10_000, seed=3)
    (features,) = onnx_export.session(graph).run(None, onnx_export.feeds(churn, rows))
    assert features.dtype == np.float64
    assert np.array_equal(features, encoder.encode(churn.matrix(rows)))


@pytest.mark.parametrize(
    ("name", "change"),
    [
        # base_score, as converters have misread it: the intercept of every row moves
        ("base_score", lambda n: attribute(n, "base_values").floats.__setitem__(0, -0.5)),
        # the first split value of the first tree moved by one standard deviation: the rows
        # between the old and the new value take the other branch
        (
            "threshold",
            lambda n: attribute(n, "nodes_values").floats.__setitem__(
                0, attribute(n, "nodes_values").floats[0] + 1.0
            ),
        ),
    ],
)
def test_the_gate_refuses_a_tampered_graph(trained, churn, name, change):
    settings = get_settings()
    model = trained.models["xgboost"]
    graph = onnx_export.build_graph(churn, trained.preprocessor, "xgboost", model)
    passed = onnx_export.check_parity(
        churn, trained.preprocessor, "xgboost", model, graph, settings
    )
    assert passed.max_abs_diff <= settings.onnx_parity_tolerance
    with pytest.raises(onnx_export.ExportRefused, match=r"parity gate: max \|dp\| = ") as refused:
        onnx_export.check_parity(
            churn, trained.preprocessor, "xgboost", model, tampered(graph, change), settings
        )
    assert "churn-xgboost" in str(refused.value) and "> 1e-05" in str(refused.value)


def test_a_refused_export_leaves_training_import_and_serving_without_it(
    demo_models, tmp_path, monkeypatch, caplog
):
    """The XGBoost graph is broken on purpose (its base score moved): the gate refuses it, the
    run records why, training, promotion and import succeed, the stored model has no graph
    and /v1/model.onnx would answer 404 saying why; the scikit-learn graph ships."""
    from api.onnx_file import OnnxFiles

    build = onnx_export.build_graph

    def broken(use_case, preprocessor, flavor, model) -> bytes:
        graph = build(use_case, preprocessor, flavor, model)
        if flavor != "xgboost":
            return graph
        return tampered(graph, lambda n: attribute(n, "base_values").floats.__setitem__(0, 0.0))

    monkeypatch.setattr(onnx_export, "build_graph", broken)
    settings = settings_with_use_cases(copy_use_case(tmp_path, "onnx_refused"))
    imported = jobs.demo(settings, "onnx_refused")  # training still succeeds

    messages = [r.getMessage() for r in caplog.records]
    refusals = [m for m in messages if "refused by the parity gate" in m]
    assert len(refusals) == 1 and "onnx-refused-xgboost" in refusals[0]
    run = MlflowClient().get_run(imported["xgboost"].info.labels["run_id"])
    assert run.data.tags["onnx.xgboost"] == "refused"
    assert "max |dp| = " in run.data.tags["onnx.xgboost.reason"]
    assert run.data.tags["onnx.sklearn"] == "exported"
    artifacts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "onnx")}
    assert artifacts == {"onnx/sklearn.onnx"}

    xgboost = imported["xgboost"]
    assert "onnx" not in xgboost.info.metadata
    assert "parity gate" in xgboost.info.metadata["onnx_refused"]
    answer = OnnxFiles(settings, 1).response(xgboost, None)
    assert answer.status_code == 404
    error = json.loads(answer.body)["error"]
    assert error["code"] == "not_found" and "has no ONNX export" in error["message"]
    assert "parity gate" in error["message"]
    sklearn = imported["sklearn"]
    graph = verified_file(sklearn, "onnx").read_bytes()
    assert hashlib.sha256(graph).hexdigest() == run.data.tags["onnx.sklearn.sha256"]
    assert "model.onnx" in sklearn.info.metadata["signed_files"]  # signed like the other files


def test_model_onnx_sends_the_champions_verified_graph_with_its_lineage(api_client, churn):
    response = api_client.get("/v1/model.onnx")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/octet-stream"
    digest = hashlib.sha256(response.content).hexdigest()
    assert response.headers["x-model-sha256"] == digest
    assert response.headers["etag"] == f'"{digest}"'
    serving = api_client.get("/v1/model").json()["serving"]
    assert response.headers["x-model-version"] == serving["version"]
    assert response.headers["x-model-name"] == serving["name"]
    assert response.headers["x-contract-version"] == str(churn.contract_version)
    again = api_client.get("/v1/model.onnx", headers={"if-none-match": response.headers["etag"]})
    assert again.status_code == 304 and again.content == b""

    rows = [dict(e) for e in churn.examples]
    local = onnx_export.onnx_probabilities(onnx_export.session(response.content), churn, rows)
    answers = api_client.post("/v1/predict_batch", json={"instances": rows}).json()
    for p, answer in zip(local, answers["predictions"], strict=True):
        remote = [answer["probabilities"][c] for c in churn.target.classes]
        assert np.abs(p - remote).max() < 1e-5


def test_model_onnx_is_declared_in_openapi(api_client):
    spec = api_client.get("/docs.json").json()
    operation = spec["paths"]["/v1/model.onnx"]["get"]
    ok = operation["responses"]["200"]
    assert ok["content"]["application/octet-stream"]["schema"]["format"] == "binary"
    assert {"X-Model-SHA256", "X-Model-Version", "X-Contract-Version", "ETag"} <= set(ok["headers"])
    error = operation["responses"]["404"]["content"]["application/json"]["schema"]
    assert error == {"$ref": "#/components/schemas/ErrorResponse"}
