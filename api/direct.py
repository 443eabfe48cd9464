"""The scoring routes answered without the router and request wrappers in front of them.

Under load the API worker is the service's bottleneck, and for each request BentoML's app runs
its context middleware, Starlette's exception middleware and router, the route's request wrapper
and its own endpoint wrapper (FastAPI's app, mounted for the Open Inference Protocol, its own
middlewares, router and wrapper on top) before the steps that matter: the body validated, the
method called. `DirectRoutes` sits inside ContractMiddleware (which has answered 413, 415 and
429 and keeps the deadline) and BentoML's outer middlewares (request metrics, tracing, the hard
timeout), and hands the body of the routes it is given straight to their handler, which answers
as the route would. A BentoML API's handler (`bentoml_api`) validates the body with the very
input model BentoML would use and calls the caller BentoML would call; a body the model refuses
goes on to BentoML, which answers it as it answers any other (400, rewritten into the contract's
error shape); an error in the method is answered as BentoML answers it (500, no detail).
`SCORING_DIRECT_ROUTES=false` sends every request the usual way."""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import replayed

LOG = logging.getLogger(__name__)
# BentoML's body for an error it does not explain (ContractMiddleware rewrites it)
UNEXPECTED = {"error": "An unexpected error has occurred, please check the server log."}
# a route's answer to a request body: its response, or None to let the request go the usual way
Direct = Callable[[Scope, bytes], Awaitable[Response | None]]


class DirectRoutes:
    """`routes`: POST path -> its handler; `patterns`: POST paths matching a pattern (path
    parameters) -> their handler."""

    def __init__(
        self,
        app: ASGIApp,
        routes: dict[str, Direct],
        patterns: Sequence[tuple[re.Pattern[str], Direct]] = (),
        enabled: bool = True,
    ) -> None:
        self.app, self.routes, self.patterns, self.enabled = app, routes, patterns, enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        taken = self.enabled and scope["type"] == "http" and scope["method"] == "POST"
        direct = self._direct(scope) if taken else None
        if direct is None:
            await self.app(scope, receive, send)
            return
        body = await _read(receive)
        response = await direct(scope, body)
        if response is None:
            await self.app(scope, replayed(body, receive), send)
            return
        await response(scope, receive, send)

    def _direct(self, scope: Scope) -> Direct | None:
        path = scope["path"]
        if (direct := self.routes.get(path)) is not None:
            return direct
        return next((d for pattern, d in self.patterns if pattern.fullmatch(path)), None)


def bentoml_api(
    model: type[BaseModel], method: Callable[[], Callable[..., Any]], server: str
) -> Direct:
    """The handler of a BentoML API: `model` its input spec, `method()` its caller (`.local`),
    `server` the Server header BentoML's endpoint wrapper sets."""
    caller = functools.cache(method)  # looked up once the worker's instance exists
    fields = tuple(model.model_fields)  # the method's keyword arguments

    async def handle(scope: Scope, body: bytes) -> Response | None:
        try:
            request = model.model_validate_json(body or b"{}")  # as BentoML's JSON serde
        except ValidationError:  # BentoML answers it, as any refused body
            return None
        try:
            response = await caller()(**{field: getattr(request, field) for field in fields})
        except Exception:
            LOG.exception("%s failed", scope["path"])
            response = JSONResponse(UNEXPECTED, status_code=500)
        if not isinstance(response, Response):  # every direct route answers with a Response
            raise TypeError(f"{scope['path']} answered {type(response).__name__}, not a Response")
        response.headers["server"] = server
        return response

    return handle


async def _read(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)
