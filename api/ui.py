"""The web page at /ui: its static files (api/ui/) and the use case's example rows, each sent
with its type, a strict Content-Security-Policy and an ETag to revalidate against."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, NamedTuple

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import envelope

UI_DIR = Path(__file__).parent / "ui"
PREFIX = "/ui"
CONTENT_TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".json": b"application/json",
}
# Only this origin's scripts, styles and API; no inline script or style, no framing.
CSP = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    b"connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
)
HEADERS = [
    (b"content-security-policy", CSP),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-cache"),  # revalidate each time: a new release shows at once
]
METHODS = ("GET", "HEAD")


class Asset(NamedTuple):
    body: bytes
    content_type: bytes
    etag: bytes


def _asset(body: bytes, suffix: str) -> Asset:
    etag = b'"' + hashlib.sha256(body).hexdigest()[:16].encode() + b'"'
    return Asset(body, CONTENT_TYPES[suffix], etag)


class WebPage:
    """ASGI middleware: GET `/ui` (the page), `/ui/<file>` (its script and style) and
    `/ui/examples.json` (the use case's key and example rows, the form's presets). The page
    builds itself from `/docs.json` and calls the /v1 API like any other client."""

    def __init__(self, app: ASGIApp, *, key: str | None, examples: list[dict[str, Any]]) -> None:
        self.app = app
        self.assets = {
            f"{PREFIX}/{path.name}": _asset(path.read_bytes(), path.suffix)
            for path in sorted(UI_DIR.iterdir())
            if path.suffix in CONTENT_TYPES
        }
        self.assets[PREFIX] = self.assets[f"{PREFIX}/"] = self.assets[f"{PREFIX}/index.html"]
        presets = json.dumps({"key": key, "examples": examples}).encode()
        self.assets[f"{PREFIX}/examples.json"] = _asset(presets, ".json")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        asset = self.assets.get(scope["path"]) if scope["type"] == "http" else None
        if asset is None:
            await self.app(scope, receive, send)
            return
        if scope["method"] not in METHODS:
            refusal = envelope(405, f"{scope['method']} is not allowed here")
            response = JSONResponse(refusal, 405, headers={"allow": ", ".join(METHODS)})
            await response(scope, receive, send)
            return
        fresh = any(
            name == b"if-none-match" and asset.etag in value
            for name, value in scope.get("headers", ())
        )
        headers = [*HEADERS, (b"etag", asset.etag)]
        if not fresh:
            headers += [
                (b"content-type", asset.content_type),
                (b"content-length", str(len(asset.body)).encode()),
            ]
        await send(
            {"type": "http.response.start", "status": 304 if fresh else 200, "headers": headers}
        )
        body = b"" if fresh or scope["method"] == "HEAD" else asset.body
        await send({"type": "http.response.body", "body": body, "more_body": False})
