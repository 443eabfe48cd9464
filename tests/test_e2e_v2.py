"""The Open Inference Protocol (V2) against a real `bentoml serve`, called by a third-party
client (Triton's `tritonclient[http]`) and by MLServer's pandas-codec body: its answers equal
/v1/predict_batch's, rows of concurrent requests share runner batches, errors are the
protocol's."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from api.v2 import request_for

from .harness import IN_CI, random_rows, serving

pytestmark = pytest.mark.e2e
try:
    import tritonclient.http as triton  # a dev dependency: skipped where missing, not in CI
except ImportError:
    if IN_CI:
        raise
    pytest.skip("tritonclient[http] is not installed", allow_module_level=True)
CLASSES = ["stayed", "churned"]


@pytest.fixture(scope="module")
def client(server):
    client = triton.InferenceServerClient(url=server.removeprefix("http://"), network_timeout=60)
    yield client
    client.close()


def triton_inputs(churn, rows: list[dict], binary: bool) -> list:
    """One InferInput per feature the rows have, as a Triton user builds them from numpy:
    FP64 with NaN for a missing number, BYTES and BOOL (which have no missing value)."""
    inputs = []
    for tensor in request_for(churn, rows)["inputs"]:
        data, datatype = tensor["data"], tensor["datatype"]
        if datatype == "FP64":
            array = np.array([np.nan if v is None else v for v in data], dtype=np.float64)
        elif datatype == "BOOL":
            array = np.array(data, dtype=bool)
        else:
            array = np.array(data, dtype=object)
        item = triton.InferInput(tensor["name"], [len(rows), 1], datatype)
        item.set_data_from_numpy(array.reshape(-1, 1), binary_data=binary)
        inputs.append(item)
    return inputs


def v1_answers(server: str, rows: list[dict]) -> tuple[np.ndarray, list, dict]:
    """(probabilities n x k with NaN where none, labels, the whole body) of /v1/predict_batch."""
    body = httpx.post(f"{server}/v1/predict_batch", json={"instances": rows}, timeout=60).json()
    assert body["errors"] == []
    probabilities = np.array(
        [
            [np.nan] * len(CLASSES)
            if p["probabilities"] is None
            else [p["probabilities"][c] for c in CLASSES]
            for p in body["predictions"]
        ]
    )
    return probabilities, [p["label"] for p in body["predictions"]], body


def test_tritonclient_probes_and_metadata(client, churn):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("churn") and not client.is_model_ready("nope")
    meta = client.get_model_metadata("churn")
    assert [i["name"] for i in meta["inputs"]] == [f.name for f in churn.features]
    assert {o["name"] for o in meta["outputs"]} >= {"probabilities", "label"}
    assert client.is_model_ready("churn", model_version=meta["versions"][0])
    with pytest.raises(triton.InferenceServerException) as missing:
        client.get_model_metadata("nope")
    assert missing.value.status() == "404"


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_answers_equal_predict_batch(client, server, churn, binary):
    """The README's example alone, then 300 random rows (every category, missing numbers as
    NaN), as JSON and as Triton's binary tensor data."""
    generated = random_rows(churn, 300, seed=7)
    for row in generated:  # tritonclient has no null: a missing BYTES/BOOL is not sendable
        row["region"] = row["region"] or "north"
        row["streaming"] = bool(row["streaming"])
    for rows in ([dict(churn.examples[0])], generated):
        outputs = [
            triton.InferRequestedOutput(n, binary_data=binary) for n in ("probabilities", "label")
        ]
        result = client.infer(
            "churn", triton_inputs(churn, rows, binary), request_id="req-7", outputs=outputs
        )
        probabilities, labels, v1 = v1_answers(server, rows)
        got = result.as_numpy("probabilities")
        assert got.shape == (len(rows), 2) and got.dtype == np.float64
        np.testing.assert_array_equal(got, probabilities)  # equal, NaN where v1 has null
        assert result.as_numpy("label").tolist() == labels
        response = result.get_response()
        assert response["id"] == "req-7" and response["model_version"] == v1["model"]["version"]
        assert [o["name"] for o in response["outputs"]] == ["probabilities", "label"]
    assert np.isnan(probabilities).any() and len(set(labels)) == 2  # fallbacks and both classes


def test_json_nulls_and_the_mlserver_pandas_codec_body(server, churn):
    """Every nullable feature missing somewhere (JSON null), in the body MLServer's PandasCodec
    writes: `content_type: pd`, one input per column, shape [n, 1], strings BYTES `str`."""
    rows = random_rows(churn, 200, seed=11, missing=0.3)
    request = request_for(churn, rows)
    for tensor in request["inputs"]:
        if tensor["datatype"] == "BYTES":
            tensor["parameters"] = {"content_type": "str"}
    body = {"parameters": {"content_type": "pd"}, **request}
    response = httpx.post(f"{server}/v2/models/churn/infer", json=body, timeout=60)
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    _, labels, v1 = v1_answers(server, rows)
    expected = [
        None if p["probabilities"] is None else p["probabilities"][c]
        for p in v1["predictions"]
        for c in CLASSES
    ]
    assert outputs["probabilities"]["data"] == expected
    assert outputs["label"]["data"] == labels
    for name in ("source", "fallback_reason", "arm", "model_version", "score", "confidence"):
        assert outputs[name]["data"] == [p[name] for p in v1["predictions"]], name


@pytest.mark.parametrize(
    "name,shape,datatype,data,status",
    [
        ("age", [1, 1], "BYTES", ["41"], "400"),  # wrong datatype
        ("age", [2, 1], "FP64", [41.0], "400"),  # shape and data disagree
        ("age_years", [1, 1], "FP64", [41.0], "400"),  # unknown input
    ],
)
def test_tritonclient_sees_the_protocols_errors(client, churn, name, shape, datatype, data, status):
    inputs = [
        i for i in triton_inputs(churn, [dict(churn.examples[0])], False) if i.name() != "age"
    ]
    bad = triton.InferInput(name, [len(data), 1], datatype)
    bad.set_data_from_numpy(
        np.array(data, dtype=object if datatype == "BYTES" else None).reshape(-1, 1),
        binary_data=False,
    )
    bad.set_shape(shape)  # tritonclient checks shapes itself: send what a broken client would
    with pytest.raises(triton.InferenceServerException) as refused:
        client.infer("churn", [*inputs, bad])
    assert refused.value.status() == status
    assert "age" in refused.value.message() or "inputs[" in refused.value.message()


def test_missing_input_unknown_model_and_non_json(server, churn):
    request = request_for(churn, [dict(churn.examples[0])])
    request["inputs"] = [i for i in request["inputs"] if i["name"] != "age"]
    with httpx.Client(base_url=server, timeout=30) as http:
        missing = http.post("/v2/models/churn/infer", json=request)
        assert missing.status_code == 400 and missing.json() == {"error": "missing inputs: age"}
        unknown = http.post("/v2/models/nope/infer", json=request)
        assert unknown.status_code == 404 and set(unknown.json()) == {"error"}
        broken = http.post("/v2/models/churn/infer", content=b"{not json")
        assert broken.status_code == 400 and set(broken.json()) == {"error"}


def test_no_request_content_in_the_server_output_and_one_line_per_request(
    demo_models, churn, tmp_path
):
    """A marker e-mail wherever a V2 client could put one (a valid row's personal data, an
    unknown input's name and data, a bad number, the id, an output's name, a body that is not
    JSON): never in a response or the server's output; one access line per request."""
    marker = "v2-pii-7f3a@example.com"
    row = {**churn.examples[0], "email": marker}
    good = request_for(churn, [row])
    bodies: list[bytes | dict] = [
        good,
        {
            **good,
            "inputs": [
                *good["inputs"],
                {"name": marker, "datatype": "BYTES", "shape": [1], "data": [marker]},
            ],
        },
        request_for(churn, [{**row, "age": marker}]),
        {**good, "id": marker},
        {**good, "outputs": [{"name": marker}]},
        b'{"inputs": [{"name": "' + marker.encode() + b'"',
    ]
    log = tmp_path / "serve.log"
    env = {"SCORING_TASK_DATABASE_URL": f"sqlite:///{tmp_path / 'tasks.db'}"}
    statuses = []
    with serving(log, env) as (base, _), httpx.Client(base_url=base, timeout=30) as http:
        for body in bodies:
            if isinstance(body, bytes):
                response = http.post("/v2/models/churn/infer", content=body)
            else:
                response = http.post("/v2/models/churn/infer", json=body)
            statuses.append(response.status_code)
            assert marker not in response.text
    assert statuses == [200, 400, 400, 400, 400, 400]
    output = log.read_text(errors="replace")
    assert marker not in output and marker.split("@")[0] not in output
    access = [line for line in output.splitlines() if " /v2/models/{model_name}/infer " in line]
    assert len(access) == len(bodies), access
    assert "Traceback" not in output
