"""The Open Inference Protocol (V2) in process (`TestClient(Scoring.to_asgi())`): metadata,
health, inference equal to /v1/predict_batch's, MLServer's pandas-codec body, Triton's binary
extension, and every kind of bad input answered 400 `{"error": ...}` without request values."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from api.v2 import request_for

from .harness import IN_CI, random_rows

MODEL = "/v2/models/churn"
INFER = f"{MODEL}/infer"
MARKER = "v2-marker@example.com"


@pytest.fixture
def row(churn) -> dict:
    return {**churn.examples[0], "email": MARKER}


def error_of(response, status: int, *mentions: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str), body
    for text in mentions:
        assert text in body["error"], body["error"]
    assert MARKER not in response.text and "Traceback" not in response.text
    return str(body["error"])


def outputs_of(body: dict) -> dict[str, np.ndarray]:
    return {
        o["name"]: np.array(o["data"], dtype=object).reshape(o["shape"]) for o in body["outputs"]
    }


def assert_equal_to_v1(v2: dict, v1: dict, classes: list[str]) -> None:
    """Every output of the V2 answer is the /v1 predict_batch answer's field, row by row."""
    got = outputs_of(v2)
    for i, prediction in enumerate(v1["predictions"]):
        probabilities = prediction["probabilities"]
        expected = (
            [None] * len(classes) if probabilities is None else [probabilities[c] for c in classes]
        )
        assert list(got["probabilities"][i]) == expected
        for name in ("label", "score", "confidence", "source", "fallback_reason", "arm"):
            assert got[name][i] == prediction[name], (i, name)
        assert got["model_version"][i] == prediction["model_version"]
    assert v2["model_version"] == v1["model"]["version"]


class TestHealthAndMetadata:
    @pytest.mark.parametrize(
        "path,body",
        [
            ("/v2/health/live", {"live": True}),
            ("/v2/health/ready", {"ready": True}),
            (f"{MODEL}/ready", {"name": "churn", "ready": True}),
        ],
    )
    def test_probes_answer_200_when_ready(self, api_client, path, body):
        response = api_client.get(path)
        assert response.status_code == 200, response.text
        assert response.json() == body

    def test_metadata_has_one_input_per_feature_and_the_outputs(self, api_client, churn):
        response = api_client.get(MODEL)
        assert response.status_code == 200
        meta = response.json()
        assert meta["name"] == "churn" and meta["platform"] == "xgboost"
        version = api_client.get("/v1/model").json()["serving"]["version"]
        assert meta["versions"] == [version]
        inputs = {i["name"]: i for i in meta["inputs"]}
        assert list(inputs) == [f.name for f in churn.features]
        assert inputs["age"] == {
            "name": "age",
            "datatype": "FP64",
            "shape": [-1, 1],
            "parameters": {"optional": False},
        }
        assert inputs["contract_type"]["datatype"] == "BYTES"
        assert inputs["paperless_billing"]["datatype"] == "BOOL"
        assert inputs["region"]["parameters"] == {"optional": True}  # nullable
        assert inputs["email"]["parameters"] == {"optional": True}  # personal data
        outputs = {o["name"]: o for o in meta["outputs"]}
        assert outputs["probabilities"]["shape"] == [-1, 2]
        assert outputs["probabilities"]["parameters"] == {"classes": ["stayed", "churned"]}
        assert outputs["label"] == {
            "name": "label",
            "datatype": "BYTES",
            "shape": [-1],
            "parameters": {},
        }
        versioned = api_client.get(f"{MODEL}/versions/{version}")
        assert versioned.status_code == 200 and versioned.json() == meta

    @pytest.mark.parametrize(
        "path",
        ["/v2/models/nope", "/v2/models/nope/ready", "/v2/models/churn/versions/999/ready"],
    )
    def test_an_unknown_model_or_version_is_404(self, api_client, path):
        error_of(api_client.get(path), 404)

    def test_an_unknown_model_is_404_whatever_the_body(self, api_client):
        error_of(api_client.post("/v2/models/nope/infer", content=b"not json"), 404)
        error_of(api_client.post(f"{MODEL}/versions/999/infer", json={}), 404)

    def test_a_method_a_route_does_not_take_is_405_in_the_protocols_shape(self, api_client):
        response = api_client.delete(INFER)
        error_of(response, 405)
        assert response.headers["allow"] == "POST"


class TestInfer:
    def test_answers_equal_predict_batch_on_the_example_and_random_rows(self, api_client, churn):
        rows = [dict(churn.examples[0]), dict(churn.examples[1]), *random_rows(churn, 60)]
        v1 = api_client.post("/v1/predict_batch", json={"instances": rows}).json()
        response = api_client.post(INFER, json={"id": "req-1", **request_for(churn, rows)})
        assert response.status_code == 200, response.text
        v2 = response.json()
        assert v2["id"] == "req-1" and v2["model_name"] == "churn"
        assert [o["name"] for o in v2["outputs"]] == [
            "probabilities",
            "label",
            "score",
            "confidence",
            "source",
            "fallback_reason",
            "arm",
            "model_version",
        ]
        outputs = {o["name"]: o for o in v2["outputs"]}
        assert outputs["probabilities"]["datatype"] == "FP64"
        assert outputs["probabilities"]["shape"] == [len(rows), 2]
        assert outputs["label"]["datatype"] == "BYTES" and outputs["label"]["shape"] == [len(rows)]
        assert_equal_to_v1(v2, v1, ["stayed", "churned"])
        sources = {p["source"] for p in v1["predictions"]}
        assert sources == {"model", "fallback"}  # both kinds compared, nulls included

    def test_outputs_selection_and_a_new_id(self, api_client, churn, row):
        body = {
            **request_for(churn, [row]),
            "outputs": [{"name": "label"}, {"name": "probabilities"}],
        }
        answer = api_client.post(INFER, json=body).json()
        assert [o["name"] for o in answer["outputs"]] == ["label", "probabilities"]
        assert len(answer["id"]) == 32  # none given: a new one

    def test_the_mlserver_pandas_codec_body(self, api_client, churn):
        """As MLServer's PandasCodec encodes a DataFrame: `content_type: pd`, one input per
        column, shape [n, 1], strings as BYTES with `content_type: str`, integer columns as
        INT64, missing values null."""
        rows = [dict(churn.examples[0]), dict(churn.examples[1])]
        columns = {name: [r.get(name) for r in rows] for name in rows[0] | rows[1]}
        inputs = []
        for name, values in columns.items():
            present = [v for v in values if v is not None]
            if all(isinstance(v, str) for v in present):
                datatype, parameters = "BYTES", {"content_type": "str"}
            elif all(isinstance(v, bool) for v in present):
                datatype, parameters = "BOOL", {}
            elif all(isinstance(v, int) for v in present):
                datatype, parameters = "INT64", {}
            else:
                datatype, parameters = "FP64", {}
            inputs.append(
                {
                    "name": name,
                    "shape": [2, 1],
                    "datatype": datatype,
                    "parameters": parameters,
                    "data": values,
                }
            )
        assert {i["datatype"] for i in inputs} == {"BYTES", "BOOL", "INT64", "FP64"}
        body = {"parameters": {"content_type": "pd"}, "inputs": inputs}
        response = api_client.post(INFER, json=body)
        assert response.status_code == 200, response.text
        v1 = api_client.post("/v1/predict_batch", json={"instances": rows}).json()
        assert_equal_to_v1(response.json(), v1, ["stayed", "churned"])

    def test_nested_data_and_nan_as_a_missing_value(self, api_client, churn):
        row = dict(churn.examples[1])  # total_charges, satisfaction_score missing
        request = request_for(churn, [row, row])
        for tensor in request["inputs"]:
            if tensor["datatype"] == "FP64":  # as numpy clients write a missing number
                tensor["data"] = [np.nan if v is None else v for v in tensor["data"]]
            tensor["data"] = [[v] for v in tensor["data"]]  # [[a], [b]] for shape [2, 1]
        body = json.dumps(request).encode()
        assert b"NaN" in body
        response = api_client.post(INFER, content=body)
        assert response.status_code == 200, response.text
        v1 = api_client.post("/v1/predict_batch", json={"instances": [row, row]}).json()
        assert_equal_to_v1(response.json(), v1, ["stayed", "churned"])

    def test_tritons_binary_tensor_data(self, api_client, churn):
        """The body tritonclient sends by default (binary inputs), built by tritonclient."""
        if not IN_CI:  # a dev dependency: skipped where missing, not in CI
            pytest.importorskip("tritonclient.http")
        import tritonclient.http as triton

        rows = random_rows(churn, 20, seed=3)
        inputs = []
        for tensor in request_for(churn, rows)["inputs"]:
            data = tensor["data"]
            if tensor["datatype"] == "FP64":
                array = np.array([np.nan if v is None else v for v in data], dtype=np.float64)
            elif tensor["datatype"] == "BOOL" or any(v is None for v in data):
                continue  # binary BOOL and BYTES have no missing value: sent as JSON below
            else:
                array = np.array(data, dtype=object)
            item = triton.InferInput(tensor["name"], [len(rows), 1], tensor["datatype"])
            item.set_data_from_numpy(array.reshape(-1, 1), binary_data=True)
            inputs.append(item)
        body, json_size = triton.InferenceServerClient.generate_request_body(inputs)
        assert json_size is not None
        header = json.loads(body[:json_size])
        names = {i["name"] for i in header["inputs"]}
        bools = [t for t in request_for(churn, rows)["inputs"] if t["name"] not in names]
        header["inputs"] += bools
        head = json.dumps(header).encode()
        body = head + body[json_size:]
        response = api_client.post(
            INFER, content=body, headers={"Inference-Header-Content-Length": str(len(head))}
        )
        assert response.status_code == 200, response.text
        v1 = api_client.post("/v1/predict_batch", json={"instances": rows}).json()
        assert_equal_to_v1(response.json(), v1, ["stayed", "churned"])


class TestBadInput:
    @pytest.mark.parametrize(
        "change,mentions",
        [
            (
                lambda r: r["inputs"][2].update(datatype="BYTES"),
                ["input age: BYTES, the model takes FP64"],
            ),
            (lambda r: r["inputs"][14].update(datatype="FP64"), ["input contract_type"]),
            (lambda r: r["inputs"][19].update(datatype="INT8"), ["input paperless_billing"]),
            (lambda r: r["inputs"][2].update(shape=[2, 1]), ["input age", "shape"]),
            (lambda r: r["inputs"][2].update(shape=[1, 2]), ["input age", "[rows] or [rows, 1]"]),
            (lambda r: r["inputs"][3].update(name=MARKER), ["inputs[3]", "not an input"]),
            (lambda r: r["inputs"].pop(2), ["missing inputs: age"]),
            (lambda r: r["inputs"].append(dict(r["inputs"][2])), ["input age: given twice"]),
            (lambda r: r["inputs"][2].update(data=[12]), ["row 0: age", "greater than or equal"]),
            (lambda r: r["inputs"][2].update(data=[MARKER]), ["row 0: age"]),
            (lambda r: r["inputs"][2].update(datatype="INT64", data=[41.5]), ["integers"]),
            (lambda r: r["inputs"][2].update(data=[float("inf")]), ["row 0: age", "finite"]),
            (lambda r: r["inputs"][14].update(data=[MARKER]), ["row 0: contract_type"]),
            (lambda r: r["inputs"][19].update(data=[1]), ["row 0: paperless_billing"]),
            (lambda r: r["inputs"][2].pop("data"), ["input age: no data"]),
            (lambda r: r.update(outputs=[{"name": MARKER}]), ["outputs[0]", "not an output"]),
            (lambda r: r.update(id=MARKER), ["id"]),
            (lambda r: r.update(extra=MARKER), ["extra", "Extra inputs"]),
            (lambda r: r.update(parameters={"content_type": "np"}), ["content_type"]),
            (lambda r: r.update(inputs=[]), ["inputs"]),
        ],
    )
    def test_is_400_naming_the_problem_never_the_value(
        self, api_client, row, churn, change, mentions
    ):
        request = request_for(churn, [row])
        change(request)
        body = json.dumps(request).encode()  # Infinity as Python writes it
        error_of(api_client.post(INFER, content=body), 400, *mentions)

    @pytest.mark.parametrize(
        "body,headers",
        [
            (b"not json " + MARKER.encode(), {}),
            (b'{"inputs": [' + MARKER.encode(), {"content-type": "application/json"}),
            (b"\xff\xfe", {"content-type": "text/plain"}),
            (b"[]", {}),
            (b'{"inputs": []}', {"Inference-Header-Content-Length": "999"}),
        ],
    )
    def test_a_body_that_is_not_an_inference_request_is_400(self, api_client, body, headers):
        error_of(api_client.post(INFER, content=body, headers=headers), 400)

    def test_one_bad_row_refuses_the_request_naming_the_rows(self, api_client, churn, row):
        rows = [row, {**row, "age": 12}, row, {**row, "age": 13, "plan_tier": MARKER}]
        message = error_of(api_client.post(INFER, json=request_for(churn, rows)), 400)
        assert message.startswith("row 1: age: Input should be greater than or equal to 18; row 3:")

    def test_more_rows_than_the_cap_is_413(self, api_client, churn, row):
        rows = [row] * 1001
        error_of(api_client.post(INFER, json=request_for(churn, rows)), 413, "1001 rows")

    def test_one_access_line_with_the_route_template_and_no_content(
        self, api_client, row, churn, caplog
    ):
        caplog.set_level(logging.DEBUG)
        request = request_for(churn, [{**row, "age": MARKER}])
        response = api_client.post(INFER, json=request)
        error_of(response, 400)
        lines = [r for r in caplog.records if r.name == "scoring.access"]
        assert len(lines) == 1
        rid = response.headers["x-request-id"]
        message = lines[0].getMessage()
        assert message.startswith("POST /v2/models/{model_name}/infer 400 invalid_input ")
        assert message.endswith(f"rid={rid}")
        everything = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
        assert MARKER not in everything


def test_the_openapi_document_declares_the_v2_routes(api_client):
    spec = api_client.get("/docs.json").json()
    infer = spec["paths"]["/v2/models/{model_name}/infer"]["post"]
    assert infer["requestBody"]["required"] is True
    ref = infer["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert ref.endswith("/InferenceRequest")
    assert set(infer["responses"]) == {"200", "400", "404", "413", "429", "500", "504"}
    error = infer["responses"]["400"]["content"]["application/json"]["schema"]["$ref"]
    assert spec["components"]["schemas"][error.rsplit("/", 1)[1]]["required"] == ["error"]
    assert [p["name"] for p in infer["parameters"]] == ["model_name"]
    for path in (
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/{model_name}",
        "/v2/models/{model_name}/ready",
        "/v2/models/{model_name}/versions/{model_version}/infer",
    ):
        assert path in spec["paths"], path
    assert not [
        p
        for p, ops in spec["paths"].items()
        for op in ops.values()
        if "422" in op.get("responses", {})
    ]
