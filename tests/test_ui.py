"""The page's files as the service sends them: type, strict CSP, revalidation, GET only; the
page's scripts and styles come from this origin only (tests/test_e2e_ui.py drives it)."""

from __future__ import annotations

import gzip
import re
import subprocess
from pathlib import Path

import pytest
from starlette.responses import PlainTextResponse
from starlette.testclient import TestClient

from api.ui import UI_DIR, VENDOR_DIR, VENDOR_FILES, WebPage
from tests.harness import IN_CI, PROJECT

EXAMPLE = {"customer_id": "C-1", "age": 41}
FALLBACK = PlainTextResponse("not the page", status_code=404)
WASM = b"\0asm\x01\0\0\0" + bytes(range(256)) * 64  # a stand-in for onnxruntime-web's


def vendor(folder: Path, *names: str) -> Path:
    """A folder of stand-ins for onnxruntime-web's files `names`."""
    folder.mkdir()
    contents = {
        "ort.wasm.bundle.min.mjs": b"/*! ONNX Runtime Web v0 */ export {};",
        "ort-wasm-simd-threaded.wasm.gz": gzip.compress(WASM),
        "README.md": b"not served",
    }
    for name in names:
        (folder / name).write_bytes(contents[name])
    return folder


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> TestClient:
    ort = vendor(tmp_path_factory.mktemp("ui") / "ort", *VENDOR_FILES, "README.md")
    return TestClient(WebPage(FALLBACK, key="customer_id", examples=[EXAMPLE], vendor_dir=ort))


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
    assert client.get("/ui/examples.json").json() == {
        "key": "customer_id",
        "examples": [EXAMPLE],
        "browser_scoring": True,
    }


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
    assert script.content.startswith(b"/*! ONNX Runtime Web v0")
    wasm = client.get("/ui/ort/ort-wasm-simd-threaded.wasm", headers={"accept-encoding": "gzip"})
    assert wasm.status_code == 200
    assert wasm.headers["content-type"] == "application/wasm"
    assert wasm.headers["content-encoding"] == "gzip"
    assert int(wasm.headers["content-length"]) < len(WASM)  # sent as stored, gzipped
    assert wasm.content == WASM  # inflated by the client
    plain = client.get("/ui/ort/ort-wasm-simd-threaded.wasm", headers={"accept-encoding": "br"})
    assert "content-encoding" not in plain.headers
    assert int(plain.headers["content-length"]) == len(WASM)
    assert plain.content == WASM
    assert client.get("/ui/ort/README.md").text == "not the page"  # only the served types
    assert client.get("/ui/ort/ort-wasm-simd-threaded.wasm.gz").text == "not the page"


@pytest.mark.parametrize("present", [(), VENDOR_FILES[:1], VENDOR_FILES[1:]])
def test_without_onnxruntime_web_the_page_does_not_offer_browser_scoring(tmp_path, present):
    """A machine without npm at setup: no half of onnxruntime-web served, the button hidden."""
    page = WebPage(FALLBACK, key=None, examples=[], vendor_dir=vendor(tmp_path / "ort", *present))
    client = TestClient(page)
    assert client.get("/ui/examples.json").json()["browser_scoring"] is False
    for name in ("ort.wasm.bundle.min.mjs", "ort-wasm-simd-threaded.wasm"):
        assert client.get(f"/ui/ort/{name}").status_code == 404
    html = (UI_DIR / "index.html").read_text()
    assert '<button type="button" id="score-local" class="secondary" hidden>' in html


def test_setup_fetched_the_pinned_onnxruntime_web():
    """.ci/setup ran .ci/onnxruntime-web: both files there, equal to the SHA-256 it pins."""
    missing = [name for name in VENDOR_FILES if not (VENDOR_DIR / name).is_file()]
    if missing:
        message = f"onnxruntime-web not fetched (bash .ci/onnxruntime-web needs npm): {missing}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    fetch = PROJECT / ".ci" / "onnxruntime-web"
    done = subprocess.run(["bash", str(fetch)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""  # the files match the pinned sums: nothing fetched again
    assert gzip.decompress((VENDOR_DIR / VENDOR_FILES[1]).read_bytes())[:4] == b"\0asm"
