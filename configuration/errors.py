"""The error contract: a few exception classes, one JSON shape, and the ASGI middleware that
enforces both (body-size limit, and BentoML's own error bodies rewritten into our shape)."""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

LOG = logging.getLogger(__name__)
CODES = {
    400: "invalid_input",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_input",
    429: "too_many_requests",
    500: "internal_error",
    503: "unavailable",
    504: "timeout",
}
MASKED_MESSAGE = "An internal error occurred; it has been logged."
MAX_DETAILS = 20


class ScoringError(Exception):
    """Base of our errors: an HTTP status, a code and a message safe to show a client."""

    status = HTTPStatus.INTERNAL_SERVER_ERROR

    def __init__(self, message: str, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []

    def body(self) -> dict[str, Any]:
        return envelope(self.status, self.message, self.details)


class PayloadTooLarge(ScoringError):
    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class InferenceFailed(ScoringError):
    """A valid row could not be scored (a runner failed on it)."""

    status = HTTPStatus.SERVICE_UNAVAILABLE


def envelope(status: int, message: str, details: list[dict[str, Any]] | None = None) -> dict:
    code = CODES.get(status, "internal_error" if status >= 500 else "client_error")
    return {"error": {"code": code, "message": message, "details": details or []}}


def _validation_message(details: list[dict[str, Any]]) -> str:
    parts = []
    for item in details[:3]:
        location = ".".join(str(p) for p in item.get("loc", ()) if p not in ("body",))
        parts.append(f"{location or 'body'}: {item.get('msg', 'invalid')}")
    more = f" (and {len(details) - 3} more)" if len(details) > 3 else ""
    return "; ".join(parts) + more


def normalise(status: int, payload: Any) -> dict[str, Any]:
    """Turn any error body BentoML produced into our shape; our own bodies pass unchanged."""
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        return payload
    if status >= 500:
        return envelope(status, MASKED_MESSAGE)
    if isinstance(payload, list) and payload and isinstance(payload[0], dict):
        payload = payload[0]  # BentoML wraps 4xx exception bodies in a list (bentoml#4232)
    if isinstance(payload, dict) and isinstance(payload.get("detail"), list):
        details = [
            {k: v for k, v in item.items() if k in ("loc", "msg", "type")}
            for item in payload["detail"][:MAX_DETAILS]
        ]
        return envelope(status, _validation_message(details), details)
    message = payload.get("error") if isinstance(payload, dict) else None
    return envelope(status, str(message or HTTPStatus(status).phrase))


class ContractMiddleware:
    """For routes under `prefix`: refuse bodies over `max_body_bytes` with 413 before anything
    parses them (chunked bodies included), and give every error response our JSON shape."""

    def __init__(self, app: ASGIApp, *, prefix: str, max_body_bytes: int) -> None:
        self.app = app
        self.prefix = prefix
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        body = await self._read_body(scope, receive)
        if body is None:
            limit = f"request body exceeds {self.max_body_bytes} bytes"
            await _send_json(send, 413, envelope(413, limit))
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, _ErrorRewriter(send))

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body_bytes:
                return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


class _ErrorRewriter:
    """An ASGI `send` that buffers error responses and rewrites their bodies."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self.start: Message | None = None
        self.chunks: list[bytes] = []

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] >= 400:
            self.start = message
            return
        if self.start is None or message["type"] != "http.response.body":
            await self.send(message)
            return
        self.chunks.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        status = self.start["status"]
        try:
            payload = json.loads(b"".join(self.chunks) or b"null")
        except ValueError:
            payload = None
        body = normalise(status, payload)
        if status >= 500:
            LOG.error("masked %s response: %s", status, payload)
        headers = [
            (k, v)
            for k, v in self.start.get("headers", [])
            if k.lower() not in (b"content-length", b"content-type")
        ]
        await _send_json(self.send, status, body, headers)


async def _send_json(
    send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                *(headers or []),
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data, "more_body": False})
