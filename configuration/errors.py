"""The error contract: a few exception classes, one JSON shape, and the ASGI middleware that
enforces both (body-size limit, and BentoML's own error bodies rewritten into our shape)."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from http import HTTPStatus
from typing import Any

from pydantic import SecretStr
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LOG = logging.getLogger(__name__)
CODES = {
    400: "invalid_input",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    409: "conflict",
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


class Unauthorized(ScoringError):
    status = HTTPStatus.UNAUTHORIZED


class Forbidden(ScoringError):
    status = HTTPStatus.FORBIDDEN


class NotFound(ScoringError):
    status = HTTPStatus.NOT_FOUND


class Conflict(ScoringError):
    """The request conflicts with the resource's state (e.g. a task not finished yet)."""

    status = HTTPStatus.CONFLICT


class InferenceFailed(ScoringError):
    """A valid row could not be scored (a runner failed on it)."""

    status = HTTPStatus.SERVICE_UNAVAILABLE


class InferenceTimeout(ScoringError):
    """The runners did not answer within the deadline."""

    status = HTTPStatus.GATEWAY_TIMEOUT


def bearer_refusal(authorization: str | None, token: SecretStr | None) -> ScoringError | None:
    """None when `authorization` is `Bearer <token>`; else why not: no token configured (the
    routes are off: 404), no bearer (401) or another one (403)."""
    if token is None:
        return NotFound("admin routes are disabled: no admin token configured")
    if not authorization or not authorization.startswith("Bearer "):
        return Unauthorized("an admin route needs 'Authorization: Bearer <token>'")
    if not hmac.compare_digest(authorization[7:].encode(), token.get_secret_value().encode()):
        return Forbidden("wrong admin token")
    return None


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
    """For routes under `prefix`: answer 429 beyond `max_concurrency` requests in progress (in
    this worker), refuse bodies over `max_body_bytes` with 413 before anything parses them
    (chunked bodies included), answer 504 after `timeout_s` (the handler is cancelled), and give
    every error response our JSON shape with the contract version.

    The limit and the timeout are enforced here rather than with BentoML's `traffic` options:
    those run outside every user middleware, so their 429 and 504 bodies could not be given
    our shape."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        prefix: str,
        max_body_bytes: int,
        contract_version: int,
        max_concurrency: int,
        timeout_s: float,
        body_limits: dict[str, int] | None = None,
    ) -> None:
        self.app = app
        self.prefix = prefix
        self.max_body_bytes = max_body_bytes
        self.body_limits = body_limits or {}  # per path, instead of max_body_bytes
        self.contract_version = contract_version
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_concurrency:
            await self._error(send, 429, "too many requests in progress: retry later")
            return
        self.in_flight += 1
        try:
            await self._handle(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def _error(self, send: Send, status: int, message: str) -> None:
        body = {**envelope(status, message), "contract_version": self.contract_version}
        await _send_json(send, status, body)

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        max_bytes = self.body_limits.get(scope["path"], self.max_body_bytes)
        body = await self._read_body(scope, receive, max_bytes)
        if body is None:
            await self._error(send, 413, f"request body exceeds {max_bytes} bytes")
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        rewriter = _ErrorRewriter(send, self.contract_version)
        try:
            await asyncio.wait_for(self.app(scope, replay, rewriter), self.timeout_s)
        except TimeoutError:
            LOG.warning("%s not answered within %s s", scope["path"], self.timeout_s)
            if not rewriter.started:
                await self._error(send, 504, f"not answered within {self.timeout_s} s")

    async def _read_body(self, scope: Scope, receive: Receive, max_bytes: int) -> bytes | None:
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > max_bytes:
                return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > max_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


class _ErrorRewriter:
    """An ASGI `send` that buffers error responses and rewrites their bodies."""

    def __init__(self, send: Send, contract_version: int) -> None:
        self.send = send
        self.contract_version = contract_version
        self.started = False  # a response has begun: too late for another one
        self.start: Message | None = None
        self.chunks: list[bytes] = []

    async def __call__(self, message: Message) -> None:
        self.started = True
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
        if status == 422:  # FastAPI's validation status: invalid input is 400 everywhere
            status = 400
        try:
            payload = json.loads(b"".join(self.chunks) or b"null")
        except ValueError:
            payload = None
        body = {**normalise(status, payload), "contract_version": self.contract_version}
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
