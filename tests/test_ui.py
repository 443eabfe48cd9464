"""The page's files as the service sends them: type, strict CSP, revalidation, GET only; the
page's scripts and styles come from this origin only (tests/test_e2e_ui.py drives it)."""

from __future__ import annotations

import re

import pytest
from starlette.responses import PlainTextResponse
from starlette.testclient import TestClient

from api.ui import UI_DIR, WebPage

EXAMPLE = {"customer_id": "C-1", "age": 41}


@pytest.fixture(scope="module")
def client() -> TestClient:
    fallback = PlainTextResponse("not the page", status_code=404)
    return TestClient(WebPage(fallback, key="customer_id", examples=[EXAMPLE]))


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/ui", "text/html; charset=utf-8"),
        ("/ui/", "text/html; charset=utf-8"),
        ("/ui/app.js", "text/javascript; charset=utf-8"),
        ("/ui/style.css", "text/css; charset=utf-8"),
        ("/ui/examples.json", "application/json"),
    ],
)
def test_each_file_is_sent_with_its_type_a_strict_csp_and_an_etag(client, path, content_type):
    response = client.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"] == content_type
    csp = response.headers["content-security-policy"]
    # WebAssembly compilation (onnxruntime-web) is the one thing allowed beyond 'self'
    assert "script-src 'self' 'wasm-unsafe-eval';" in csp and "default-src 'none'" in csp
    assert "unsafe" not in csp.replace("'wasm-unsafe-eval'", "")
    assert response.headers["cache-control"] == "no-cache"
    again = client.get(path, headers={"if-none-match": response.headers["etag"]})
    assert again.status_code == 304 and again.content == b""


def test_the_presets_are_the_use_case_examples(client):
    assert client.get("/ui/examples.json").json() == {"key": "customer_id", "examples": [EXAMPLE]}


def test_other_methods_and_paths_are_not_the_page(client):
    refused = client.post("/ui", json={})
    assert refused.status_code == 405
    assert refused.headers["allow"] == "GET, HEAD"
    assert refused.json()["error"]["code"] == "method_not_allowed"
    assert client.get("/ui/../service.py").status_code == 404
    assert client.get("/ui/missing.js").text == "not the page"


def test_the_page_loads_nothing_from_elsewhere_and_runs_no_inline_script():
    html = (UI_DIR / "index.html").read_text()
    assert re.findall(r"<script[^>]*>", html) == ['<script src="/ui/app.js" defer>']
    assert " style=" not in html and "on" + "click=" not in html
    for path in UI_DIR.iterdir():
        if path.is_file():
            assert not re.search(r"https?://", path.read_text()), path.name


def test_onnxruntime_web_is_served_from_this_origin_the_wasm_gzipped(client):
    script = client.get("/ui/ort/ort.wasm.bundle.min.mjs")
    assert script.status_code == 200
    assert script.headers["content-type"] == "text/javascript; charset=utf-8"
    assert b"ONNX Runtime Web v" in script.content[:200]
    stored = (UI_DIR / "ort" / "ort-wasm-simd-threaded.wasm.gz").stat().st_size
    wasm = client.get("/ui/ort/ort-wasm-simd-threaded.wasm", headers={"accept-encoding": "gzip"})
    assert wasm.status_code == 200
    assert wasm.headers["content-type"] == "application/wasm"
    assert wasm.headers["content-encoding"] == "gzip"
    assert int(wasm.headers["content-length"]) == stored  # sent as stored
    assert wasm.content[:4] == b"\0asm"  # inflated by the client
    plain = client.get("/ui/ort/ort-wasm-simd-threaded.wasm", headers={"accept-encoding": "br"})
    assert "content-encoding" not in plain.headers
    assert plain.content == wasm.content
    assert client.get("/ui/ort/README.md").text == "not the page"  # only the served types
