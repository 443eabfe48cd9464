"""The web page at /ui: its static files (api/ui/, and onnxruntime-web in api/ui/ort/) and the
use case's example rows, each sent with its type, a strict Content-Security-Policy and an ETag
to revalidate against."""

from __future__ import annotations

import gzip
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
    ".mjs": b"text/javascript; charset=utf-8",
    ".wasm": b"application/wasm",
}
VENDOR_DIR = UI_DIR / "ort"  # onnxruntime-web's dist files, fetched by .ci/onnxruntime-web
VENDOR_FILES = ("ort.wasm.bundle.min.mjs", "ort-wasm-simd-threaded.wasm.gz")  # both, or none
COMPRESSED = ".gz"  # stored gzipped: sent as is to clients that accept gzip, else inflated
# Only this origin's scripts, styles and API; no inline script or style, no framing.
# 'wasm-unsafe-eval' lets this origin's scripts compile WebAssembly (onnxruntime-web), nothing
# more: eval and inline scripts stay refused.
CSP = (
    b"default-src 'none'; script-src 'self' 'wasm-unsafe-eval'; style-src 'self'; "
    b"img-src 'self' data:; "
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
    gzipped: bool = False  # `body` is gzip of the file


def _asset(body: bytes, suffix: str, gzipped: bool = False) -> Asset:
    etag = b'"' + hashlib.sha256(body).hexdigest()[:16].encode() + b'"'
    return Asset(body, CONTENT_TYPES[suffix], etag, gzipped)


def _vendor_assets(folder: Path) -> dict[str, Asset]:
    """onnxruntime-web's files, by path (`x.wasm.gz` is served as `x.wasm`); none unless all of
    VENDOR_FILES are there (a machine without npm at setup: the page scores on the server only)."""
    if not all((folder / name).is_file() for name in VENDOR_FILES):
        return {}
    assets = {}
    for path in (folder / name for name in VENDOR_FILES):
        gzipped = path.suffix == COMPRESSED
        served = path.with_suffix("") if gzipped else path
        url = f"{PREFIX}/{VENDOR_DIR.name}/{served.name}"
        assets[url] = _asset(path.read_bytes(), served.suffix, gzipped)
    return assets


def _accepts_gzip(scope: Scope) -> bool:
    return any(
        name == b"accept-encoding" and b"gzip" in value for name, value in scope.get("headers", ())
    )


class WebPage:
    """ASGI middleware: GET `/ui` (the page), `/ui/<file>` (its script and style) and
    `/ui/examples.json` (the use case's key and example rows, the form's presets, and whether
    onnxruntime-web is here for "Score in this browser"). The page builds itself from
    `/docs.json` and calls the /v1 API like any other client."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        key: str | None,
        examples: list[dict[str, Any]],
        vendor_dir: Path = VENDOR_DIR,
    ) -> None:
        self.app = app
        self.assets = {
            f"{PREFIX}/{path.name}": _asset(path.read_bytes(), path.suffix)
            for path in sorted(UI_DIR.iterdir())
            if path.suffix in CONTENT_TYPES
        }
        self.assets[PREFIX] = self.assets[f"{PREFIX}/"] = self.assets[f"{PREFIX}/index.html"]
        vendor = _vendor_assets(vendor_dir)
        self.assets.update(vendor)
        self.inflated: dict[str, bytes] = {}  # gzipped assets for clients without gzip
        presets = {"key": key, "examples": examples, "browser_scoring": bool(vendor)}
        self.assets[f"{PREFIX}/examples.json"] = _asset(json.dumps(presets).encode(), ".json")

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
        body = asset.body
        if asset.gzipped:
            headers.append((b"vary", b"accept-encoding"))
            if _accepts_gzip(scope):
                headers.append((b"content-encoding", b"gzip"))
            else:
                body = self.inflated.setdefault(scope["path"], gzip.decompress(asset.body))
        if not fresh:
            headers += [
                (b"content-type", asset.content_type),
                (b"content-length", str(len(body)).encode()),
            ]
        await send(
            {"type": "http.response.start", "status": 304 if fresh else 200, "headers": headers}
        )
        body = b"" if fresh or scope["method"] == "HEAD" else body
        await send({"type": "http.response.body", "body": body, "more_body": False})
