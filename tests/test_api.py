"""In-process HTTP tests of the API service (`TestClient(Scoring.to_asgi())`): every route and
every class of bad input."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from starlette.testclient import TestClient

from api.contract import contract_for
from runners.batching import isolate_failures

from .harness import run_python

PREDICT = "/v1/predict"
CONTRACT_VERSION = 5
BATCH = "/v1/predict_batch"


@pytest.fixture
def client(api_client) -> TestClient:
    return api_client


@pytest.fixture
def row(churn) -> dict:
    return dict(churn.examples[0])


def assert_error(response, status: int, code: str, mentions: str = "") -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "contract_version"}
    assert body["contract_version"] == CONTRACT_VERSION
    assert set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code
    assert mentions in body["error"]["message"]
    assert "Traceback" not in response.text and 'File "' not in response.text
    return body["error"]


class TestPredict:
    def test_answers_label_probabilities_and_the_model_that_made_them(
        self, client, row, demo_models, churn
    ):
        response = client.post(PREDICT, json={"instance": row})
        assert response.status_code == 200
        body = response.json()
        prediction = body["prediction"]
        assert prediction["key"] == row["customer_id"]
        assert set(prediction["probabilities"]) == {"stayed", "churned"}
        assert sum(prediction["probabilities"].values()) == pytest.approx(1.0)
        assert prediction["score"] == prediction["probabilities"]["churned"]
        expected_label = "churned" if prediction["score"] >= 0.5 else "stayed"
        assert prediction["label"] == expected_label
        labels = demo_models["xgboost"].info.labels
        assert body["model"] == {
            "name": "churn-xgboost",
            "version": labels["registered_version"],
            "alias": "champion",
            "flavor": "xgboost",
            "bento_tag": str(demo_models["xgboost"].tag),
        }
        assert body["contract_version"] == CONTRACT_VERSION
        contract_for(churn).PredictResponse.model_validate(body)

    def test_probabilities_equal_the_model_on_the_encoded_row(self, client, row, churn):
        import mlflow

        preprocessor = mlflow.sklearn.load_model("models:/churn-preprocessor@candidate")
        model = mlflow.xgboost.load_model("models:/churn-xgboost@champion")
        expected = model.predict_proba(preprocessor.transform(churn.frame([row])))[0]
        got = client.post(PREDICT, json={"instance": row}).json()["prediction"]["probabilities"]
        np.testing.assert_allclose([got["stayed"], got["churned"]], expected, atol=1e-6)

    def test_missing_optional_values_are_imputed_not_refused(self, client, churn):
        row = dict(churn.examples[1])  # nulls in nullable fields, no e-mail
        assert client.post(PREDICT, json={"instance": row}).status_code == 200

    @pytest.mark.parametrize(
        ("change", "field"),
        [
            ({"age": "41"}, "instance.age"),
            ({"age": 17}, "instance.age"),
            ({"monthly_charges": 1e9}, "instance.monthly_charges"),
            ({"contract_type": "weekly"}, "instance.contract_type"),
            ({"auto_pay": "yes"}, "instance.auto_pay"),
            ({"surprise": 1}, "instance.surprise"),
            ({"tenure_months": None}, "instance.tenure_months"),
        ],
    )
    def test_invalid_values_are_400_naming_the_field(self, client, row, change, field):
        error = assert_error(
            client.post(PREDICT, json={"instance": {**row, **change}}), 400, "invalid_input", field
        )
        assert error["details"][0]["loc"] == field.split(".")

    @pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e400"])
    def test_non_finite_numbers_are_400(self, client, row, token):
        body = json.dumps({"instance": {**row, "age": 12345}}).replace("12345", token)
        response = client.post(PREDICT, content=body, headers={"content-type": "application/json"})
        assert_error(response, 400, "invalid_input", "instance.age")

    @pytest.mark.parametrize(
        "body", [b"{not json", b"", b"[]", b'{"instance": 5}', b'{"rows": []}', b"\xff\xfe"]
    )
    def test_malformed_bodies_are_400(self, client, body):
        response = client.post(PREDICT, content=body, headers={"content-type": "application/json"})
        assert_error(response, 400, "invalid_input")

    def test_missing_field_is_400(self, client, row):
        del row["age"]
        assert_error(client.post(PREDICT, json={"instance": row}), 400, "invalid_input", "age")

    def test_body_over_the_limit_is_413_before_parsing(self, client, row):
        from configuration import get_settings

        padding = "x" * get_settings().max_body_bytes
        response = client.post(PREDICT, json={"instance": row, "pad": padding})
        assert_error(response, 413, "payload_too_large", "exceeds")

    def test_chunked_body_over_the_limit_is_413(self, client):
        from configuration import get_settings

        limit = get_settings().max_body_bytes

        def chunks():
            for _ in range(limit // 65536 + 2):
                yield b" " * 65536

        response = client.post(
            PREDICT, content=chunks(), headers={"content-type": "application/json"}
        )
        assert_error(response, 413, "payload_too_large")


class TestPredictBatch:
    def test_results_in_order_and_a_bad_row_reported_by_index_without_hurting_neighbours(
        self, client, churn
    ):
        good, other = dict(churn.examples[0]), dict(churn.examples[1])
        single = client.post(PREDICT, json={"instance": good}).json()["prediction"]
        rows = [good, {**good, "age": -1}, other, {"nonsense": True}, good]
        response = client.post(BATCH, json={"instances": rows})
        assert response.status_code == 200
        body = response.json()
        predictions = body["predictions"]
        assert len(predictions) == 5
        assert predictions[1] is None and predictions[3] is None
        assert predictions[0] == single == predictions[4]
        assert predictions[2]["key"] == other["customer_id"]
        assert [(e["index"], e["code"]) for e in body["errors"]] == [
            (1, "invalid_input"),
            (3, "invalid_input"),
        ]
        assert "age" in body["errors"][0]["message"]
        assert "nonsense" in body["errors"][1]["message"]
        assert body["model"]["name"] == "churn-xgboost"
        contract_for(churn).PredictBatchResponse.model_validate(body)

    def test_rows_over_the_cap_are_413(self, client, row):
        from configuration import get_settings

        cap = get_settings().max_batch_rows
        response = client.post(BATCH, json={"instances": [row] * (cap + 1)})
        assert_error(response, 413, "payload_too_large", f"cap of {cap}")

    def test_instances_must_be_a_list_and_an_item_not_an_object_is_reported_by_index(
        self, client, row
    ):
        assert_error(client.post(BATCH, json={"instances": row}), 400, "invalid_input", "instances")
        body = client.post(BATCH, json={"instances": [1, row]}).json()
        assert body["predictions"][0] is None and body["predictions"][1] is not None
        assert [error["index"] for error in body["errors"]] == [0]

    def test_empty_batch_returns_no_predictions(self, client):
        response = client.post(BATCH, json={"instances": []})
        assert response.status_code == 200
        assert response.json()["predictions"] == [] and response.json()["errors"] == []

    def test_all_invalid_rows_are_reported_and_nothing_is_scored(self, client, row):
        response = client.post(BATCH, json={"instances": [{**row, "age": 500}] * 3})
        body = response.json()
        assert response.status_code == 200
        assert body["predictions"] == [None, None, None]
        assert [e["index"] for e in body["errors"]] == [0, 1, 2]


class TestModelAndDocs:
    def test_model_route_tells_what_is_serving(self, client, demo_models):
        response = client.get("/v1/model")
        assert response.status_code == 200
        body = response.json()
        assert body["use_case"] == "churn" and body["task"] == "binary"
        assert body["classes"] == ["stayed", "churned"]
        assert body["serving"]["bento_tag"] == str(demo_models["xgboost"].tag)
        xgb = body["models"]["xgboost"]
        assert xgb["data_sha256"] == demo_models["xgboost"].info.labels["data_sha256"]
        assert xgb["data_rows"] == 4000  # SCORING_DEMO_ROWS of the test session
        labels = demo_models["xgboost"].info.labels
        assert xgb["run_id"] == labels["run_id"] and xgb["alias"] == "champion"
        assert xgb["sha256"] == demo_models["xgboost"].info.metadata["sha256"]
        assert xgb["metrics"]["roc_auc"] > 0.7
        assert body["models"]["preprocessor"]["run_id"] == labels["run_id"]

    def test_openapi_documents_the_contract(self, client):
        spec = client.get("/docs.json").json()
        assert {"/v1/predict", "/v1/predict_batch", "/v1/model"} <= set(spec["paths"])
        row = spec["components"]["schemas"]["ChurnRow"]
        assert row["additionalProperties"] is False
        assert row["properties"]["tenure_months"]["description"].startswith("Months since")
        assert "example" in row

    def test_unknown_route_is_404_in_the_error_shape(self, client):
        assert_error(client.post("/v1/nope", json={}), 404, "not_found")


def test_a_failing_batch_is_retried_row_by_row():
    calls = []

    def compute(batch):
        calls.append(len(batch))
        if any(item == "poison" for item in batch):
            raise ValueError("bad row")
        return np.array([[float(len(item))] for item in batch])

    out = isolate_failures(compute, ["a", "poison", "ccc"], width=1)
    assert calls == [3, 1, 1, 1]
    assert out[0, 0] == 1.0 and np.isnan(out[1, 0]) and out[2, 0] == 3.0


def test_a_row_the_runner_cannot_encode_fails_alone(demo_models, churn):
    from runners.preprocessor import Preprocessor

    preprocessor = Preprocessor.inner()
    good = dict(churn.examples[0])
    raw = churn.matrix([good, {**good, "age": "not a number"}, good])
    version = demo_models["preprocessor"].info.labels["registered_version"]
    rows = np.column_stack([np.full(3, version, dtype=object), raw])  # column 0: the version
    features = asyncio.run(preprocessor.transform(rows))
    assert not np.isnan(features[0]).any() and not np.isnan(features[2]).any()
    assert np.isnan(features[1]).all()
    np.testing.assert_array_equal(features[0], features[2])


@pytest.mark.process
def test_the_runner_workers_import_neither_mlflow_training_nor_sqlalchemy(demo_models):
    """Import the service module and load every runner, as a runner worker does, then look at
    what got imported: SQLAlchemy belongs to the API worker alone (~0.1 s of each start)."""
    script = (
        "import sys, service\n"
        "from runners.preprocessor import Preprocessor\n"
        "from runners.xgboost_runner import XGBoostRunner\n"
        "from runners.sklearn_runner import SklearnRunner\n"
        "for svc in (Preprocessor, XGBoostRunner, SklearnRunner):\n"
        "    svc.inner()\n"
        "heavy = {'mlflow', 'training', 'sqlalchemy'}\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & heavy))\n"
    )
    result = run_python("-c", script, timeout_s=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.process
def test_the_scikit_learn_model_serves_when_configured(demo_models, churn):
    """SCORING_MODEL_FLAVOR=sklearn: the API composes the scikit-learn runner instead."""
    script = (
        "import json, service\n"
        "from starlette.testclient import TestClient\n"
        "with TestClient(service.Scoring.to_asgi()) as client:\n"
        "    r = client.post('/v1/predict', json={'instance': service.USE_CASE.examples[0]})\n"
        "    print('answer', r.status_code, json.dumps(r.json()))\n"
    )
    result = run_python("-c", script, env={"SCORING_MODEL_FLAVOR": "sklearn"}, timeout_s=300)
    assert result.returncode == 0, result.stderr[-2000:]
    # stdout also holds the prediction log's line, written by its thread
    (printed,) = [line for line in result.stdout.splitlines() if line.startswith("answer ")]
    status, body = printed.removeprefix("answer ").split(" ", 1)
    answer = json.loads(body)
    assert status == "200"
    assert answer["model"]["name"] == "churn-sklearn"
    assert answer["model"]["flavor"] == "sklearn"
    assert answer["model"]["bento_tag"] == str(demo_models["sklearn"].tag)
    assert sum(answer["prediction"]["probabilities"].values()) == pytest.approx(1.0)
