"""The edge, in process: every input gets the contract's answer (415, 405, 400, per-row errors),
the OpenAPI document says what is sent, and a log line never carries request content."""

from __future__ import annotations

import logging
import time

import pytest

from configuration.logs import WITHHELD, safe_traceback

ROUTES_WITH_BODIES = [
    ("post", "/v1/predict"),
    ("post", "/v1/explain"),
    ("post", "/v1/predict_batch"),
    ("post", "/v1/tasks"),
    ("put", "/v1/admin/routing"),
]
MARKER = "edge-marker@example.com"


@pytest.fixture
def row(churn) -> dict:
    return {**churn.examples[0], "email": MARKER}


def error_of(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "contract_version"}
    assert body["error"]["code"] == code
    assert MARKER not in response.text
    return body["error"]


@pytest.mark.parametrize("method,path", ROUTES_WITH_BODIES)
@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "multipart/form-data", "application/x-www-form-urlencoded", "text/json"],
)
def test_a_body_that_is_not_json_is_415(api_client, row, method, path, content_type):
    """Multipart without a boundary was a 500; text/plain and no content type were parsed as
    JSON; a non-UTF-8 body under text/plain on /v1/tasks was a 500."""
    headers = {"content-type": content_type} if content_type else {}
    body = ('{"instance": {"email": "' + MARKER + '"}}').encode() + b"\xff"
    response = getattr(api_client, method)(path, content=body, headers=headers)
    error = error_of(response, 415, "unsupported_media_type")
    assert "application/json" in error["message"]


@pytest.mark.parametrize(
    "path,body",
    [
        ("/v1/predict", lambda row: {"instance": row, "unknown": MARKER}),
        ("/v1/explain", lambda row: {"instance": row, "debug": True}),
        ("/v1/predict_batch", lambda row: {"instances": [row], "options": {}}),
        ("/v1/tasks", lambda row: {"instances": [row], "priority": 1}),
    ],
)
def test_an_unknown_top_level_field_is_400_naming_it(api_client, row, path, body):
    error = error_of(api_client.post(path, json=body(row)), 400, "invalid_input")
    assert "Extra inputs are not permitted" in error["message"]


@pytest.mark.parametrize("value", ["yes", 0, 1, "true", None])
def test_explain_is_a_strict_boolean(api_client, row, value):
    response = api_client.post("/v1/predict", json={"instance": row, "explain": value})
    assert "explain" in error_of(response, 400, "invalid_input")["message"]


@pytest.mark.parametrize(
    "value,status", [(3, 200), (3.0, 200), ("3", 400), (True, 400), (2.5, 400)]
)
def test_top_k_is_a_json_schema_integer(api_client, row, value, status):
    response = api_client.post("/v1/explain", json={"instance": row, "top_k": value})
    assert response.status_code == status, response.text


def test_rows_that_are_not_objects_are_reported_by_index_and_neighbours_scored(api_client, row):
    instances = [row, 5, None, [], "x", row, {"email": MARKER}]
    response = api_client.post("/v1/predict_batch", json={"instances": instances})
    assert response.status_code == 200, response.text
    body = response.json()
    scored = [i for i, p in enumerate(body["predictions"]) if p is not None]
    assert scored == [0, 5]
    assert [e["index"] for e in body["errors"]] == [1, 2, 3, 4, 6]
    assert all(e["code"] == "invalid_input" for e in body["errors"])
    assert MARKER not in response.text


def test_a_task_of_no_rows_has_an_empty_predict_batch_result(api_client):
    submitted = api_client.post("/v1/tasks", json={"instances": []})
    assert submitted.status_code == 202, submitted.text
    task_id = submitted.json()["task_id"]
    deadline = time.monotonic() + 60
    while api_client.get(f"/v1/tasks/{task_id}").json()["status"] != "succeeded":
        assert time.monotonic() < deadline, "the empty task never finished"
        time.sleep(0.1)
    result = api_client.get(f"/v1/tasks/{task_id}/result").json()
    assert result["predictions"] == [] and result["errors"] == []
    assert set(result) == {"predictions", "errors", "model", "contract_version"}
    assert result["model"]["flavor"] == "xgboost"


@pytest.mark.parametrize(
    "method,path,allowed",
    [
        ("options", "/v1/admin/routing", "GET, PUT"),
        ("delete", "/v1/admin/routing", "GET, PUT"),
        ("get", "/v1/predict", "POST"),
        ("put", "/v1/tasks", "POST"),
        ("post", "/v1/tasks/abc/result", "GET"),
    ],
)
def test_a_method_a_route_does_not_take_is_405_with_every_method_it_takes(
    api_client, method, path, allowed
):
    response = api_client.request(method.upper(), path)
    error_of(response, 405, "method_not_allowed")
    assert response.headers["allow"] == allowed


def test_docs_serves_the_swagger_page(api_client):
    response = api_client.get("/docs")
    assert response.status_code == 200
    assert "swagger-ui" in response.text.lower()
    assert "./static_content/swagger-initializer.js" in response.text  # resolves from /docs
    initializer = api_client.get("/static_content/swagger-initializer.js")
    assert initializer.status_code == 200 and "docs.json" in initializer.text


def test_the_openapi_document_is_3_1_with_required_bodies_and_every_status(api_client):
    spec = api_client.get("/docs.json").json()
    assert spec["openapi"] == "3.1.0"
    for method, path in ROUTES_WITH_BODIES:
        operation = spec["paths"][path][method]
        assert operation["requestBody"]["required"] is True
        assert {"415", "500"} <= set(operation["responses"])
    submit = spec["paths"]["/v1/tasks"]["post"]["responses"]
    assert {"200", "202"} <= set(submit)  # 200: an Idempotency-Key repeated
    predict = spec["paths"]["/v1/predict"]["post"]
    schema = predict["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    request = spec["components"]["schemas"][schema.rsplit("/", 1)[1]]
    assert request["additionalProperties"] is False
    answer = predict["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    response = spec["components"]["schemas"][answer.rsplit("/", 1)[1]]
    explanation = response["properties"]["explanation"]
    assert {"type": "null"} in explanation["anyOf"]  # was declared non-null


def test_every_request_has_one_access_line_without_content_and_a_request_id(
    api_client, row, caplog
):
    caplog.set_level(logging.DEBUG)
    bad = {**row, "age": "forty", "tenure_months": -1}
    response = api_client.post("/v1/predict", json={"instance": bad})
    error_of(response, 400, "invalid_input")
    rid = response.headers["x-request-id"]
    lines = [r for r in caplog.records if r.name == "scoring.access"]
    assert len(lines) == 1
    assert lines[0].getMessage() == (
        f"POST /v1/predict 400 invalid_input {lines[0].args[4]:.1f}ms rid={rid}"
    )
    assert lines[0].levelno == logging.INFO
    everything = "\n".join(
        r.getMessage() + (r.exc_text or "") for r in caplog.records if r.exc_text or r.msg
    )
    assert MARKER not in everything and "forty" not in everything
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]

    echoed = api_client.post("/v1/predict", json={"instance": row}, headers={"x-request-id": "a-1"})
    assert echoed.headers["x-request-id"] == "a-1"
    refused = api_client.get("/v1/model", headers={"x-request-id": MARKER + " <script>"})
    assert MARKER not in refused.headers["x-request-id"]


def test_a_logged_traceback_keeps_frames_and_types_not_messages_that_may_hold_input(churn):
    from pydantic import ValidationError

    from api.contract import contract_for
    from runners.artifacts import IntegrityError

    def fail() -> None:
        try:
            contract_for(churn).Row.model_validate({"email": MARKER, "age": 12})
        except ValidationError as exc:
            raise IntegrityError("our own message stays") from exc

    try:
        fail()
    except IntegrityError as exc:
        text = safe_traceback(type(exc), exc, exc.__traceback__)
    assert MARKER not in text
    assert "pydantic_core._pydantic_core.ValidationError: " + WITHHELD in text
    assert "runners.artifacts.IntegrityError: our own message stays" in text
    assert "in fail" in text
    inner = text.index("ValidationError: ")
    assert inner < text.index("direct cause") < text.index("IntegrityError: ")  # Python's order
