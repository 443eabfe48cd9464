"""The OpenAPI document tells the truth. BentoML publishes a 3.0.2 document whose schemas drop
`null` from optional fields (so every plain /v1/predict answer violated it), marks no request
body required, and declares its own error schemas (which do not match what is sent) and none
for 405, 413, 415, 429, 503 or 504. `publish` rewrites it: OpenAPI 3.1 (whose schemas are the
JSON Schema pydantic writes), our request and response models on BentoML's routes, every body
required, the one error shape we send with the statuses each route can answer."""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from pydantic import BaseModel, Field
from pydantic.json_schema import models_json_schema
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import CODES

SCHEMA_REF = "#/components/schemas/{model}"
WHEN = {
    400: "Invalid input: malformed JSON or a field outside the contract (`details` per field).",
    401: "No bearer token.",
    403: "A wrong bearer token; a webhook URL the service may not call (or webhooks off).",
    404: "No such resource (admin routes: also when no admin token is configured).",
    409: "The resource is not in a state that allows this (e.g. a task not finished).",
    413: "The body or the number of rows is over the limit.",
    415: "The body is not JSON: send `Content-Type: application/json`.",
    429: "The service is at its concurrency limit: retry later.",
    500: "An internal error; logged, never detailed in the response.",
    503: "The model cannot answer this request now.",
    504: "The request did not finish within the service's timeout.",
}


class ErrorBody(BaseModel):
    code: str = Field(description=f"Machine-readable: one of {sorted(set(CODES.values()))}.")
    message: str = Field(description="What went wrong, naming the field where there is one.")
    details: list[dict[str, Any]] = Field(description="Per-field problems (loc, msg, type).")


class ErrorResponse(BaseModel):
    """The one shape of every error response of the API."""

    error: ErrorBody
    contract_version: int


Bodies = dict[str, tuple[type[BaseModel], type[BaseModel]]]  # path -> (request, response)


def publish(
    spec: dict[str, Any], errors: dict[str, dict[str, tuple[int, ...]]], bodies: Bodies
) -> None:
    """Patch BentoML's `spec` in place into the document we publish (module docstring)."""
    spec["openapi"] = "3.1.0"
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    models = [
        (m, mode)
        for req, res in bodies.values()
        for m, mode in ((req, "validation"), (res, "serialization"))
    ]
    refs, definitions = models_json_schema(models, ref_template=SCHEMA_REF)  # type: ignore[arg-type]
    schemas.update(definitions.get("$defs", {}))
    for path, (request, response) in bodies.items():
        operation = spec["paths"][path]["post"]
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": refs[(request, "validation")]}},
        }
        others = {str(k): v for k, v in operation.get("responses", {}).items() if str(k) != "200"}
        ok = {"application/json": {"schema": refs[(response, "serialization")]}}
        operation["responses"] = {"200": {"description": "OK", "content": ok}, **others}
    for methods in spec["paths"].values():
        for operation in methods.values():
            if isinstance(operation, dict) and "requestBody" in operation:
                operation["requestBody"]["required"] = True
    declare_errors(spec, errors)
    used = json.dumps(spec["paths"])
    pending = {name for name in schemas if f'"{SCHEMA_REF.format(model=name)}"' in used}
    kept: set[str] = set()
    while pending:  # every schema a route reaches, directly or through another schema
        name = pending.pop()
        kept.add(name)
        text = json.dumps(schemas[name])
        pending |= {
            n for n in schemas if n not in kept and f'"{SCHEMA_REF.format(model=n)}"' in text
        }
    for name in set(schemas) - kept:
        del schemas[name]


def declare_errors(spec: dict[str, Any], errors: dict[str, dict[str, tuple[int, ...]]]) -> None:
    """Patch `spec` in place: for each path and method in `errors`, the 4xx/5xx responses are
    exactly the statuses listed (plus 500, and 415 where there is a body), each with the
    `ErrorResponse` schema."""
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for name, schema in ErrorResponse.model_json_schema(ref_template=SCHEMA_REF)["$defs"].items():
        schemas[name] = schema
    schemas["ErrorResponse"] = {
        k: v
        for k, v in ErrorResponse.model_json_schema(ref_template=SCHEMA_REF).items()
        if k != "$defs"
    }
    for path, methods in errors.items():
        if path not in spec["paths"]:  # a WebSocket route: not in an OpenAPI document
            continue
        for method, statuses in methods.items():
            operation = spec["paths"][path][method]
            responses = {
                code: response
                for code, response in operation.get("responses", {}).items()
                if int(code) < 400
            }
            body = {415} if "requestBody" in operation else set()
            for status in sorted({*statuses, *body, 500}):
                responses[str(status)] = {
                    "description": f"{HTTPStatus(status).phrase}. {WHEN[status]}",
                    "content": {
                        "application/json": {
                            "schema": {"$ref": SCHEMA_REF.format(model="ErrorResponse")}
                        }
                    },
                }
            operation["responses"] = responses


class OpenAPIDocument:
    """ASGI middleware: the served OpenAPI document (`path`) passed through `publish`, and the
    Swagger page (BentoML's, at `/`) also at `/docs`, where users look for it."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        path: str,
        errors: dict[str, dict[str, tuple[int, ...]]],
        bodies: Bodies,
    ) -> None:
        self.app = app
        self.path = path
        self.errors = errors
        self.bodies = bodies

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in ("/docs", "/docs/"):
            scope = {**scope, "path": "/", "raw_path": b"/"}
        if scope["type"] != "http" or scope["path"] != self.path:
            await self.app(scope, receive, send)
            return
        start: Message = {}
        chunks: list[bytes] = []

        async def buffer(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = b"".join(chunks)
            if start.get("status") == 200:
                spec = json.loads(body)
                publish(spec, self.errors, self.bodies)
                body = json.dumps(spec).encode()
            headers = [
                (k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"
            ]
            headers.append((b"content-length", str(len(body)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})

        await self.app(scope, receive, buffer)
