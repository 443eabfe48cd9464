"""The scoring routes answered without BentoML's per-request router and input wrapper.

Under load the API worker is the service's bottleneck, and for each request BentoML's app runs
its context middleware, Starlette's exception middleware, router and request wrapper, and its
own endpoint wrapper (about a tenth of the worker's time at 100 rows a request) before the same
two steps every route takes: the body validated by the route's input model, the API method
called with its fields. `DirectRoutes` sits inside ContractMiddleware (which has answered 413,
415 and 429 and keeps the deadline) and BentoML's outer middlewares (request metrics, tracing,
the hard timeout), and takes those two steps itself for the routes it is given, with the very
input model and method BentoML would use. A body the model refuses goes on to BentoML, which
answers it as it answers any other (400, rewritten into the contract's error shape); an error
in the method is answered as BentoML answers it (500, no detail). `SCORING_DIRECT_ROUTES=false`
sends every request through BentoML's own path."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LOG = logging.getLogger(__name__)
# BentoML's body for an error it does not explain (ContractMiddleware rewrites it)
UNEXPECTED = {"error": "An unexpected error has occurred, please check the server log."}


class DirectRoutes:
    """`routes`: POST path -> (API method name, its input model); `instance` gives the service
    instance (once the worker has built it)."""

    def __init__(
        self,
        app: ASGIApp,
        routes: dict[str, tuple[str, type[BaseModel]]],
        instance: Callable[[], Any],
        server: str,
        enabled: bool = True,
    ) -> None:
        self.app, self.routes, self.instance = app, routes, instance
        self.server = server
        self.enabled = enabled
        self.methods: dict[str, Callable[..., Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.routes.get(scope["path"]) if scope["type"] == "http" else None
        if route is None or not self.enabled or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        body = await _read(receive)
        name, model = route
        try:
            request = model.model_validate_json(body or b"{}")  # as BentoML's JSON serde
        except ValidationError:  # BentoML answers it, as any refused body
            await self.app(scope, _replay(body, receive), send)
            return
        try:
            response = await self._method(name)(
                **{field: getattr(request, field) for field in type(request).model_fields}
            )
        except Exception:
            LOG.exception("%s failed", scope["path"])
            response = JSONResponse(UNEXPECTED, status_code=500)
        if not isinstance(response, Response):  # every direct route answers with a Response
            raise TypeError(f"{name} answered {type(response).__name__}, not a Response")
        response.headers["server"] = self.server  # as BentoML's endpoint wrapper
        await response(scope, receive, send)

    def _method(self, name: str) -> Callable[..., Any]:
        if name not in self.methods:  # the caller BentoML itself would call
            self.methods[name] = getattr(self.instance(), name).local
        return self.methods[name]


async def _read(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
