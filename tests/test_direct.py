"""The scoring routes answered without BentoML's router (api/direct.py): the same answers as
BentoML's own path, for valid and invalid bodies alike, and the mechanics on their own."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict
from starlette.responses import JSONResponse, Response

from api.direct import UNEXPECTED, DirectRoutes

from .harness import random_rows


def direct_routes(client: Any) -> DirectRoutes:
    """The service app's DirectRoutes middleware (a test reaches in to switch it off)."""
    app = client.app
    app.middleware_stack = app.middleware_stack or app.build_middleware_stack()
    layer = app.middleware_stack
    while not isinstance(layer, DirectRoutes):
        layer = layer.app
    return layer


def both_paths(client: Any, path: str, body: Any) -> tuple[Any, Any]:
    """The responses of the direct path and of BentoML's own path to the same body."""
    routes = direct_routes(client)
    assert routes.enabled
    direct = client.post(
        path, content=json.dumps(body), headers={"content-type": "application/json"}
    )
    routes.enabled = False
    try:
        bentoml = client.post(
            path, content=json.dumps(body), headers={"content-type": "application/json"}
        )
    finally:
        routes.enabled = True
    return direct, bentoml


def same(direct: Any, bentoml: Any) -> None:
    assert direct.status_code == bentoml.status_code
    assert direct.json() == bentoml.json()
    for header in ("content-type", "server", "content-length"):
        assert direct.headers.get(header) == bentoml.headers.get(header), header


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


# ---- the middleware on its own ------------------------------------------------------------
class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    instances: list[int]
    scale: int = 1


class Service:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    class _Api:
        def __init__(self, function: Any) -> None:
            self.local = function

    @property
    def score(self) -> Any:
        async def score(instances: list[int], scale: int) -> Response:
            self.calls.append({"instances": instances, "scale": scale})
            if scale == 0:
                raise RuntimeError("secret-row-content")
            return JSONResponse({"total": sum(instances) * scale})

        return self._Api(score)


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
    app = DirectRoutes(inner_app(seen), {"/score": ("score", Body)}, lambda: service, "S/1")
    status, headers, body = call(app, "/score", b'{"instances": [1, 2, 3], "scale": 2}')
    assert (status, json.loads(body), headers["server"]) == (200, {"total": 12}, "S/1")
    assert service.calls == [{"instances": [1, 2, 3], "scale": 2}] and seen == []
    assert call(app, "/score", b'{"instances": [4]}')[2] == b'{"total":4}'  # the default


def test_what_it_does_not_take_goes_on_with_its_body_intact():
    service, seen = Service(), []
    app = DirectRoutes(inner_app(seen), {"/score": ("score", Body)}, lambda: service, "S/1")
    refused = b'{"instances": ["1"], "extra": true}'
    assert call(app, "/score", refused)[0] == 418  # refused by the model: to BentoML
    assert call(app, "/other", b'{"instances": [1]}')[0] == 418  # another route
    assert call(app, "/score", b"", method="GET")[0] == 418  # another method
    off = DirectRoutes(inner_app(seen), {"/score": ("score", Body)}, lambda: service, "S", False)
    assert call(off, "/score", b'{"instances": [1]}')[0] == 418  # switched off
    assert seen == [refused, b'{"instances": [1]}', b"", b'{"instances": [1]}']
    assert service.calls == []


def test_a_failing_method_is_a_500_without_its_detail(caplog):
    service = Service()
    app = DirectRoutes(inner_app([]), {"/score": ("score", Body)}, lambda: service, "S/1")
    with caplog.at_level(logging.ERROR):
        status, _, body = call(app, "/score", b'{"instances": [1], "scale": 0}')
    assert (status, json.loads(body)) == (500, UNEXPECTED)
    assert "secret-row-content" not in body.decode()
    assert any(record.levelno == logging.ERROR for record in caplog.records)
