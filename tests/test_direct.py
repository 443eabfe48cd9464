"""The scoring routes answered without the router in front of them (api/direct.py): the same
answers as BentoML's (and FastAPI's) own path, for valid and invalid bodies alike, and the
mechanics on their own."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict
from starlette.responses import JSONResponse, Response

from api.direct import UNEXPECTED, DirectRoutes, bentoml_api
from api.v2 import request_for

from .harness import random_rows

BINARY = "inference-header-content-length"


def direct_routes(client: Any) -> DirectRoutes:
    """The service app's DirectRoutes middleware (a test reaches in to switch it off)."""
    app = client.app
    app.middleware_stack = app.middleware_stack or app.build_middleware_stack()
    layer = app.middleware_stack
    while not isinstance(layer, DirectRoutes):
        layer = layer.app
    return layer


def both_paths(client: Any, path: str, body: Any, headers: Any = None) -> tuple[Any, Any]:
    """The responses of the direct path and of the usual path to the same body."""
    routes = direct_routes(client)
    assert routes.enabled
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json", **(headers or {})}
    direct = client.post(path, content=content, headers=headers)
    routes.enabled = False
    try:
        usual = client.post(path, content=content, headers=headers)
    finally:
        routes.enabled = True
    return direct, usual


def same(direct: Any, usual: Any) -> None:
    assert direct.status_code == usual.status_code
    assert direct.json() == usual.json()
    for header in ("content-type", "server", "content-length"):
        assert direct.headers.get(header) == usual.headers.get(header), header


def test_the_scoring_routes_take_the_direct_path_and_no_other_does(api_client):
    routes = direct_routes(api_client)
    for path in ("/v1/predict", "/v1/predict_batch", "/v1/explain", "/v2/models/churn/infer",
                 "/v2/models/churn/versions/7/infer"):  # fmt: skip
        assert routes._direct({"path": path}) is not None, path
    for path in ("/v1/tasks", "/v1/model", "/v2/models/churn", "/v2/models/churn/infer/x",
                 "/v2/models/a/b/infer", "/v1/predict/"):  # fmt: skip
        assert routes._direct({"path": path}) is None, path


def test_the_direct_path_answers_as_bentomls_on_many_random_rows(api_client, churn):
    rows = random_rows(churn, 600, seed=11)
    for start in range(0, len(rows), 100):
        same(*both_paths(api_client, "/v1/predict_batch", {"instances": rows[start : start + 100]}))
    for row in rows[:40]:
        same(*both_paths(api_client, "/v1/predict", {"instance": row}))
    for row in rows[:5]:
        same(*both_paths(api_client, "/v1/predict", {"instance": row, "explain": True, "top_k": 3}))
        same(*both_paths(api_client, "/v1/explain", {"instance": row, "top_k": 2}))


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/predict", {"instance": {"age": "old"}}),
        ("/v1/predict", {"instances": []}),
        ("/v1/predict", {}),
        ("/v1/predict", []),
        ("/v1/predict", {"instance": None, "explain": "yes"}),
        ("/v1/predict_batch", {"instances": {"age": 3}}),
        ("/v1/explain", {"instance": {}, "top_k": -1}),
    ],
)
def test_a_refused_body_is_answered_as_bentoml_answers_it(api_client, path, body):
    direct, bentoml = both_paths(api_client, path, body)
    same(direct, bentoml)
    assert direct.status_code == 400 and direct.json()["error"]["code"] == "invalid_input"


def test_rows_refused_one_by_one_are_answered_as_bentoml_answers_them(api_client, churn):
    rows = [{"age": 3}, "x", None, *random_rows(churn, 3, seed=5), {**churn.examples[0], "x": 1}]
    direct, bentoml = both_paths(api_client, "/v1/predict_batch", {"instances": rows})
    same(direct, bentoml)
    assert [e["index"] for e in direct.json()["errors"]] == [0, 1, 2, 6]


def test_the_open_inference_protocol_answers_as_through_fastapi(api_client, churn):
    rows = random_rows(churn, 300, seed=12)
    version = api_client.get("/v1/model").json()["serving"]["version"]
    for start in range(0, len(rows), 100):
        body = {**request_for(churn, rows[start : start + 100]), "id": f"r-{start}"}  # else random
        same(*both_paths(api_client, "/v2/models/churn/infer", body))
        same(*both_paths(api_client, f"/v2/models/churn/versions/{version}/infer", body))
    one = request_for(churn, rows[:1])
    for path, body in [
        ("/v2/models/nope/infer", one),
        ("/v2/models/churn/versions/999999/infer", one),
        ("/v2/models/churn/infer", {"inputs": [{"name": "age", "datatype": "FP64"}]}),
        ("/v2/models/churn/infer", request_for(churn, [{**rows[0], "age": -3}])),
        ("/v2/models/churn/infer", {**one, "parameters": {"content_type": "np"}}),
        ("/v2/models/churn/infer", b"{"),
    ]:
        direct, usual = both_paths(api_client, path, body)
        same(direct, usual)
        assert direct.status_code in (400, 404) and "error" in direct.json()
    refused = both_paths(api_client, "/v2/models/churn/infer", one, {BINARY: "x"})
    same(*refused)
    assert refused[0].status_code == 400


# ---- the middleware on its own ------------------------------------------------------------
class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    instances: list[int]
    scale: int = 1


class Service:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    async def score(self, instances: list[int], scale: int) -> Response:
        self.calls.append({"instances": instances, "scale": scale})
        if scale == 0:
            raise RuntimeError("secret-row-content")
        return JSONResponse({"total": sum(instances) * scale})


def routed(inner: Any, service: Service, enabled: bool = True) -> DirectRoutes:
    handler = bentoml_api(Body, lambda: service.score, "S/1")
    return DirectRoutes(inner, {"/score": handler}, enabled=enabled)


def call(app: Any, path: str, body: bytes, method: str = "POST") -> tuple[int, dict, bytes]:
    """One request through `app`, the body in two chunks: (status, headers, body)."""
    chunks = [body[: len(body) // 2], body[len(body) // 2 :]]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        chunk = chunks.pop(0) if chunks else b""
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": [], "query_string": b""}
    asyncio.run(app(scope, receive, send))
    headers = {k.decode(): v.decode() for k, v in sent[0].get("headers", [])}
    return sent[0]["status"], headers, b"".join(m.get("body", b"") for m in sent[1:])


def inner_app(seen: list[bytes]) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message["body"], message["more_body"]
        seen.append(body)
        await Response(b"inner", status_code=418)(scope, receive, send)

    return app


def test_a_valid_body_calls_the_method_with_the_models_fields():
    service, seen = Service(), []
    app = routed(inner_app(seen), service)
    status, headers, body = call(app, "/score", b'{"instances": [1, 2, 3], "scale": 2}')
    assert (status, json.loads(body), headers["server"]) == (200, {"total": 12}, "S/1")
    assert service.calls == [{"instances": [1, 2, 3], "scale": 2}] and seen == []
    assert call(app, "/score", b'{"instances": [4]}')[2] == b'{"total":4}'  # the default


def test_what_it_does_not_take_goes_on_with_its_body_intact():
    service, seen = Service(), []
    app = routed(inner_app(seen), service)
    refused = b'{"instances": ["1"], "extra": true}'
    assert call(app, "/score", refused)[0] == 418  # refused by the model: to BentoML
    assert call(app, "/other", b'{"instances": [1]}')[0] == 418  # another route
    assert call(app, "/score", b"", method="GET")[0] == 418  # another method
    off = routed(inner_app(seen), service, enabled=False)
    assert call(off, "/score", b'{"instances": [1]}')[0] == 418  # switched off
    assert seen == [refused, b'{"instances": [1]}', b"", b'{"instances": [1]}']
    assert service.calls == []


def test_a_failing_method_is_a_500_without_its_detail(caplog):
    service = Service()
    app = routed(inner_app([]), service)
    with caplog.at_level(logging.ERROR):
        status, _, body = call(app, "/score", b'{"instances": [1], "scale": 0}')
    assert (status, json.loads(body)) == (500, UNEXPECTED)
    assert "secret-row-content" not in body.decode()
    assert any(record.levelno == logging.ERROR for record in caplog.records)
