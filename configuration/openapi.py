"""The OpenAPI document tells the truth about errors: BentoML publishes its own error schemas
(which do not match what is sent) and none for 413, 429, 503 or 504. `declare_errors` replaces
them, on our routes, with the one error shape we send and the statuses each route can answer."""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from configuration.errors import CODES

SCHEMA_REF = "#/components/schemas/{model}"
WHEN = {
    400: "Invalid input: malformed JSON or a field outside the contract (`details` per field).",
    401: "No bearer token.",
    403: "A wrong bearer token.",
    404: "No such resource (admin routes: also when no admin token is configured).",
    409: "The resource is not in a state that allows this (e.g. a task not finished).",
    413: "The body or the number of rows is over the limit.",
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


def declare_errors(spec: dict[str, Any], errors: dict[str, dict[str, tuple[int, ...]]]) -> None:
    """Patch `spec` in place: for each path and method in `errors`, the 4xx/5xx responses are
    exactly the statuses listed (plus 500), each with the `ErrorResponse` schema."""
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for name, schema in ErrorResponse.model_json_schema(ref_template=SCHEMA_REF)["$defs"].items():
        schemas[name] = schema
    schemas["ErrorResponse"] = {
        k: v
        for k, v in ErrorResponse.model_json_schema(ref_template=SCHEMA_REF).items()
        if k != "$defs"
    }
    for path, methods in errors.items():
        for method, statuses in methods.items():
            operation = spec["paths"][path][method]
            responses = {
                code: response
                for code, response in operation.get("responses", {}).items()
                if int(code) < 400
            }
            for status in sorted({*statuses, 500}):
                responses[str(status)] = {
                    "description": f"{HTTPStatus(status).phrase}. {WHEN[status]}",
                    "content": {
                        "application/json": {
                            "schema": {"$ref": SCHEMA_REF.format(model="ErrorResponse")}
                        }
                    },
                }
            operation["responses"] = responses
    for unused in ("HTTPValidationError", "ValidationError"):
        if unused in schemas and unused not in json.dumps(spec["paths"]):
            del schemas[unused]


class OpenAPIErrors:
    """ASGI middleware: the served OpenAPI document (`path`) passed through `declare_errors`."""

    def __init__(
        self, app: ASGIApp, *, path: str, errors: dict[str, dict[str, tuple[int, ...]]]
    ) -> None:
        self.app = app
        self.path = path
        self.errors = errors

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
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
                declare_errors(spec, self.errors)
                body = json.dumps(spec).encode()
            headers = [
                (k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"
            ]
            headers.append((b"content-length", str(len(body)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})

        await self.app(scope, receive, buffer)
