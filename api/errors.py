"""The error contract: a few exception classes, one JSON shape, and the ASGI middleware that
enforces both (body-size limit, and BentoML's own error bodies rewritten into our shape)."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from pydantic import SecretStr
from pydantic_core import to_json
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LOG = logging.getLogger(__name__)
ACCESS = logging.getLogger("scoring.access")
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


class InvalidInput(ScoringError):
    """The request is not valid input (raised where BentoML's validation does not apply)."""

    status = HTTPStatus.BAD_REQUEST


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


def error_response(error: ScoringError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def json_response(body: dict[str, Any]) -> Response:
    """A response body (the shape of the route's declared response model) serialised by
    pydantic-core and sent as is: BentoML's own response path builds a TypeAdapter and a JSON
    schema on every request, and response models cost a validation per prediction."""
    return Response(to_json(body), media_type="application/json")


def admin_refusal(authorization: str | None, token: SecretStr | None) -> JSONResponse | None:
    """None when `authorization` carries the admin token; else the error to answer."""
    refused = bearer_refusal(authorization, token)
    return None if refused is None else error_response(refused)


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


def error_code(status: int) -> str:
    return CODES.get(status, "internal_error" if status >= 500 else "client_error")


def envelope(status: int, message: str, details: list[dict[str, Any]] | None = None) -> dict:
    code = error_code(status)
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
    message = None
    if isinstance(payload, dict):  # ours or BentoML's "error", FastAPI's "detail"
        message = next((v for v in (payload.get("error"), payload.get("detail")) if v), None)
    return envelope(status, str(message or HTTPStatus(status).phrase))


class ErrorShape:
    """How a family of routes words its errors: ours, `{"error": {"code", "message", "details"},
    "contract_version"}`. Another protocol (api/v2.py) subclasses it."""

    json_only = True  # a body without Content-Type: application/json is refused (415)

    def __init__(self, contract_version: int) -> None:
        self.contract_version = contract_version

    def body(self, status: int, message: str) -> dict[str, Any]:
        """The body of an error this middleware answers itself."""
        return {**envelope(status, message), "contract_version": self.contract_version}

    def rewrite(self, status: int, payload: Any) -> dict[str, Any]:
        """The body of an error response a handler (or BentoML, FastAPI) produced."""
        return {**normalise(status, payload), "contract_version": self.contract_version}


RouteTable = dict[str, dict[str, Any]]  # path template -> {method: ...}, as in the OpenAPI
REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,64}")
QUIET_PATHS = frozenset(("/livez", "/readyz", "/healthz", "/metrics"))
JSON_TYPES = (b"application/json",)


def request_id(scope: Scope) -> bytes:
    """The caller's `X-Request-ID` when it is a plain token (letters, digits, `._:-`, at most
    64), else a new one: it names the request in the log line and the response."""
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id" and REQUEST_ID.fullmatch(value):
            return bytes(value)
    return uuid.uuid4().hex.encode()


class ContractMiddleware:
    """For routes under `prefix`: answer 429 beyond `max_concurrency` requests in progress (in
    this worker), 405 with `Allow` for a method a known route does not take, 415 for a body that
    is not `application/json`, 413 for bodies over `max_body_bytes` before anything parses them
    (chunked bodies included), 504 after `timeout_s` (the handler is cancelled), and give every
    error response our JSON shape with the contract version.

    Every request (probes and metrics aside) gets an `X-Request-ID` and exactly one access log
    line: method, route template (never the raw path or query, which may carry personal data),
    status, error code, milliseconds, request id. BentoML's own access log is turned off.

    The limit and the timeout are enforced here rather than with BentoML's `traffic` options:
    those run outside every user middleware, so their 429 and 504 bodies could not be given
    our shape.

    WebSocket connections under `prefix` count as requests in progress for as long as they are
    open (one refused over the limit gets a 429 instead of the handshake); routes in `streams`
    (event streams) have no timeout.

    `protocols` guards more prefixes the same way, each with its own `ErrorShape` (the Open
    Inference Protocol's `/v2`); every other path gets ours."""

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
        routes: RouteTable | None = None,
        streams: frozenset[str] = frozenset(),
        protocols: Mapping[str, ErrorShape] | None = None,
    ) -> None:
        self.app = app
        self.prefix = prefix
        self.shape = ErrorShape(contract_version)
        self.guarded = {prefix: self.shape, **(protocols or {})}  # prefix -> its error shape
        self.max_body_bytes = max_body_bytes
        self.body_limits = body_limits or {}  # per path, instead of max_body_bytes
        self.contract_version = contract_version
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.in_flight = 0
        self.streams = streams
        if ACCESS.level == logging.NOTSET:  # BentoML leaves non-bentoml loggers at WARNING
            ACCESS.setLevel(logging.INFO)
        self.routes = [
            (re.compile(re.sub(r"\\{[^/]+?\\}", "[^/]+", re.escape(path)) + "$"), path, methods)
            for path, methods in (routes or {}).items()
        ]

    def route_of(self, path: str) -> tuple[str, tuple[str, ...] | None]:
        """(the route template to log, the methods it takes: None when unknown)."""
        for pattern, template, methods in self.routes:
            if pattern.match(path):
                return template, tuple(m.upper() for m in methods)
        for prefix in self.guarded:
            if path.startswith(prefix):
                return f"{prefix}/<unknown>", None
        head, _, rest = path[1:].partition("/")
        return "/" + head[:40] + ("/..." if rest else ""), None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and scope["path"].startswith(self.prefix):
            await self._websocket(scope, receive, send)
            return
        if scope["type"] != "http" or scope["path"] in QUIET_PATHS:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        rid = request_id(scope)
        route, methods = self.route_of(scope["path"])
        prefix = next((p for p in self.guarded if scope["path"].startswith(p)), None)
        sender = _ErrorRewriter(send, self.guarded.get(prefix or "", self.shape), rid)
        try:
            if prefix is None:
                await self.app(scope, receive, sender)
            elif methods is not None and scope["method"] not in methods:
                allow = ", ".join(methods).encode()
                await sender.error(405, f"{scope['method']} is not allowed here", allow)
            elif self.in_flight >= self.max_concurrency:
                await sender.error(429, "too many requests in progress: retry later")
            else:
                self.in_flight += 1
                try:
                    await self._handle(scope, receive, sender, route in self.streams)
                finally:
                    self.in_flight -= 1
        finally:
            status = sender.status
            ACCESS.log(
                logging.ERROR if status >= 500 else logging.INFO,
                "%s %s %d %s %.1fms rid=%s",
                scope["method"],
                route,
                status,
                sender.code,
                (time.perf_counter() - started) * 1000,
                rid.decode(),
            )

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A WebSocket: refused with 429 over the limit (a close before the handshake where
        the server cannot send a response), else counted while open; one access line."""
        started = time.perf_counter()
        rid = request_id(scope)
        status = 101
        try:
            if self.in_flight >= self.max_concurrency:
                status = 429
                await receive()  # websocket.connect
                if "websocket.http.response" in scope.get("extensions", {}):
                    message = "too many requests in progress: retry later"
                    body = {**envelope(429, message), "contract_version": self.contract_version}
                    data = json.dumps(body).encode()
                    headers = [(b"content-type", b"application/json"), (b"x-request-id", rid)]
                    start = {"status": 429, "headers": headers}
                    await send({"type": "websocket.http.response.start", **start})
                    await send({"type": "websocket.http.response.body", "body": data})
                else:
                    await send({"type": "websocket.close", "code": 1013})
                return
            self.in_flight += 1
            try:
                await self.app(scope, receive, send)
            finally:
                self.in_flight -= 1
        finally:
            ACCESS.info(
                "WEBSOCKET %s %d %.1fms rid=%s",
                self.route_of(scope["path"])[0],
                status,
                (time.perf_counter() - started) * 1000,
                rid.decode(),
            )

    async def _handle(
        self, scope: Scope, receive: Receive, send: _ErrorRewriter, stream: bool = False
    ) -> None:
        max_bytes = self.body_limits.get(scope["path"], self.max_body_bytes)
        if _declared_length(scope) > max_bytes:
            await send.error(413, f"request body exceeds {max_bytes} bytes")
            return
        json_only = send.shape.json_only
        if json_only and scope["method"] in ("POST", "PUT", "PATCH") and not _is_json(scope):
            await send.error(415, "the body must be JSON: send Content-Type: application/json")
            return
        body = await self._read_body(receive, max_bytes)
        if body is None:
            await send.error(413, f"request body exceeds {max_bytes} bytes")
            return
        replay = replayed(body, receive)
        if stream:  # answers for as long as the client listens: no timeout
            await self.app(scope, replay, send)
            return
        try:
            await asyncio.wait_for(self.app(scope, replay, send), self.timeout_s)
        except TimeoutError:
            LOG.warning("%s not answered within %s s", scope["path"], self.timeout_s)
            if not send.started:
                await send.error(504, f"not answered within {self.timeout_s} s")

    async def _read_body(self, receive: Receive, max_bytes: int) -> bytes | None:
        """The body, or None once it exceeds `max_bytes` (chunked bodies included)."""
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


def replayed(body: bytes, receive: Receive) -> Receive:
    """A receive that gives `body`, already read, in one message, then what `receive` gives."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def _declared_length(scope: Scope) -> int:
    for name, value in scope.get("headers", ()):
        if name == b"content-length" and value.isdigit():
            return int(value)
    return 0


def _is_json(scope: Scope) -> bool:
    for name, value in scope.get("headers", ()):
        if name == b"content-type":
            return value.split(b";", 1)[0].strip().lower() in JSON_TYPES
    return False


class _ErrorRewriter:
    """An ASGI `send` that adds the request id, buffers error responses and rewrites their
    bodies into our shape, and remembers the status and error code for the access line."""

    def __init__(self, send: Send, shape: ErrorShape, rid: bytes) -> None:
        self.send = send
        self.shape = shape
        self.rid = rid
        self.started = False  # a response has begun: too late for another one
        self.start: Message | None = None
        self.chunks: list[bytes] = []
        self.status = 0  # 0: no response was sent (the client went away)
        self.code = "-"

    async def error(self, status: int, message: str, allow: bytes | None = None) -> None:
        """Answer with our error shape."""
        self.started = True
        body = self.shape.body(status, message)
        await self._send_json(status, body, [(b"allow", allow)] if allow else [])

    async def __call__(self, message: Message) -> None:
        self.started = True
        if message["type"] == "http.response.start":
            self.status = message["status"]
            if self.status >= 400:
                self.start = message
                return
            message = {
                **message,
                "headers": [*message.get("headers", ()), (b"x-request-id", self.rid)],
            }
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
        body = self.shape.rewrite(status, payload)
        headers = [
            (k, v)
            for k, v in self.start.get("headers", [])
            if k.lower() not in (b"content-length", b"content-type")
        ]
        await self._send_json(status, body, headers)

    async def _send_json(
        self, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]]
    ) -> None:
        self.status, self.code = status, error_code(status)
        data = json.dumps(body).encode()
        await self.send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    *headers,
                    (b"x-request-id", self.rid),
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(data)).encode()),
                ],
            }
        )
        await self.send({"type": "http.response.body", "body": data, "more_body": False})
