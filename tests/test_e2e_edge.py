"""The edge of a real `bentoml serve`: no request content in anything the server writes, one
log line per client error, and schemathesis finding nothing the OpenAPI document does not say.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .harness import serving

pytestmark = pytest.mark.e2e
TOKEN = "edge-admin-token"
CONTENT_TYPES = [
    "application/json",
    "application/json; charset=utf-8",
    "text/plain",
    "multipart/form-data",
    "application/x-www-form-urlencoded",
    None,
]
ROUTES = ["/v1/predict", "/v1/explain", "/v1/predict_batch", "/v1/tasks", "/v1/admin/routing"]


def server_env(tmp_path: Path) -> dict[str, str]:
    return {
        "SCORING_ADMIN_TOKEN": TOKEN,
        "SCORING_TASK_DATABASE_URL": f"sqlite:///{tmp_path / 'tasks.db'}",
    }


@st.composite
def marked_requests(draw, example: dict) -> tuple[str, str, bytes, dict[str, str], str]:
    """(method, path, body, headers, marker): a request carrying a unique marker e-mail where a
    client could put personal data, valid or not, in any content type."""
    marker = f"pii-{uuid.uuid4().hex[:16]}@example.com"
    row = dict(example)
    shape = draw(
        st.sampled_from(
            ["valid", "long", "unknown_field", "short", "wrong_types", "not_object", "top_level"]
        )
    )
    if shape == "valid":
        row["email"] = marker
    elif shape == "long":
        row["email"] = marker + "x" * draw(st.integers(200, 3000))
    elif shape == "unknown_field":
        row["contact"] = marker
    elif shape == "short":
        row = {"email": marker, "age": draw(st.integers(-5, 200))}
    elif shape == "wrong_types":
        row = {
            **row,
            "email": marker,
            draw(st.sampled_from(sorted(row))): draw(st.text(max_size=5)),
        }
    path = draw(st.sampled_from(ROUTES))
    if path == "/v1/admin/routing":
        payload: object = (
            {"champion": marker} if shape != "valid" else {"champion": "1", "x": marker}
        )
    elif shape == "not_object":
        payload = {"instances": [marker, 5, None]} if path in ROUTES[2:4] else {"instance": marker}
    elif path in ROUTES[2:4]:
        payload = {"instances": [row] * draw(st.integers(1, 3))}
    else:
        payload = {"instance": row}
    if shape == "top_level":
        payload = {**payload, "note": marker}  # type: ignore[dict-item]
    body = json.dumps(payload).encode()
    if draw(st.booleans()):
        body += draw(st.sampled_from([b"\xff\xfe", b"\xc3\x28", b"}", b""]))
    headers = {"authorization": f"Bearer {TOKEN}", "x-forwarded-for": marker}
    if (content_type := draw(st.sampled_from(CONTENT_TYPES))) is not None:
        headers["content-type"] = content_type
    method = "PUT" if path == "/v1/admin/routing" else "POST"
    return method, path, body, headers, marker


def test_no_request_content_reaches_the_server_output(demo_models, churn, tmp_path):
    """Hypothesis-made requests with unique marker e-mails (short rows, over-long values,
    unknown fields, non-UTF-8 bytes, every content type) through every route, tasks and
    their results included: no marker in the server's output, and never a 5xx."""
    log = tmp_path / "serve.log"
    markers: list[str] = []
    tasks: list[str] = []
    with serving(log, server_env(tmp_path)) as (base, _), httpx.Client(base_url=base) as client:

        @settings(
            max_examples=150,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        )
        @given(request=marked_requests(churn.examples[0]))
        def probe(request) -> None:
            method, path, body, headers, marker = request
            markers.append(marker)
            response = client.request(method, path, content=body, headers=headers)
            assert response.status_code < 500, response.text
            assert marker not in response.text
            if path == "/v1/tasks" and response.status_code == 202:
                tasks.append(response.json()["task_id"])

        probe()
        for marker in markers[:20]:  # query strings and headers of the read routes
            for path in ("/v1/model", "/v1/drift", f"/v1/tasks/{marker}", "/v1/nowhere"):
                answer = client.get(path, params={"email": marker}, headers={"x-user": marker})
                assert answer.status_code < 500 and marker not in answer.text, path
        deadline = time.monotonic() + 120
        for task_id in tasks:
            while client.get(f"/v1/tasks/{task_id}").json()["status"] in ("queued", "running"):
                assert time.monotonic() < deadline, "tasks did not finish"
                time.sleep(0.2)
            assert client.get(f"/v1/tasks/{task_id}/result").status_code == 200
    output = log.read_text(errors="replace")
    assert len(markers) >= 100 and tasks, "hypothesis sent too little to prove anything"
    leaked = [m for m in markers if m in output or m.split("@")[0] in output]
    assert not leaked, f"{len(leaked)} markers in the server output, e.g. {leaked[0]}"
    assert "Traceback" not in output, output[output.index("Traceback") - 300 :][:3000]


def test_a_client_error_is_one_line_and_a_valid_request_two(demo_models, churn, tmp_path):
    """With the default settings: a 4xx writes one access line (INFO, no traceback); a valid
    prediction writes its access line and its prediction-log line."""
    log = tmp_path / "serve.log"
    row = {**churn.examples[0], "email": "lines@example.com"}
    with serving(log, server_env(tmp_path)) as (base, _), httpx.Client(base_url=base) as client:
        metrics = client.get("/metrics").text  # a fresh server: counters at 0, no drift yet
        for reason in ("low_confidence", "model_error", "timeout", "model_not_ready"):
            line = f'scoring_fallbacks_total{{arm="champion",model_version="1",reason="{reason}"}}'
            assert f"{line} 0.0" in metrics, metrics[-3000:]
        assert "scoring_drift_psi{" not in metrics
        written: dict[str, list[str]] = {}
        for kind, body in (("valid", {"instance": row}), ("invalid", {"instance": {"age": 1}})):
            before = settled_size(log)
            for _ in range(50):
                status = client.post("/v1/predict", json=body).status_code
                assert status == (200 if kind == "valid" else 400)
            settled_size(log)
            written[kind] = log.read_bytes()[before:].decode().splitlines()
        drift = client.get("/v1/drift").json()
        assert drift["status"] == "insufficient_data" and drift["drifting"] == []
        assert "scoring_drift_psi{" not in client.get("/metrics").text
    sizes = {kind: sum(len(line) + 1 for line in lines) / 50 for kind, lines in written.items()}
    assert len(written["invalid"]) == 50 and len(written["valid"]) == 100, sizes
    assert sizes["invalid"] < 200, sizes  # bytes per invalid request (was ~2,100)
    assert all(" POST /v1/predict 400 invalid_input " in line for line in written["invalid"])
    assert all("[INFO]" in line for line in written["invalid"])
    print(f"bytes logged per request: {sizes}")


def settled_size(log: Path) -> int:
    """The log's size once it stopped growing for 0.3 s (every line of the last request)."""
    size = -1
    while size != log.stat().st_size:
        size = log.stat().st_size
        time.sleep(0.3)
    return size


def test_schemathesis_finds_no_failure_of_any_check(demo_models, tmp_path):
    """`st run --checks all` (fixed seed, every phase, admin routes with the token) against a
    real server: at least 3,000 cases, 0 failures, nothing skipped."""
    st_cli = Path(sys.executable).parent / "st"
    log = tmp_path / "serve.log"
    with serving(log, server_env(tmp_path)) as (base, _):
        run = subprocess.run(
            [
                str(st_cli),
                "run",
                f"{base}/docs.json",
                "--url",
                base,
                "--checks",
                "all",
                "--seed",
                "20261204",
                "--max-examples",
                "200",
                "--header",
                f"Authorization: Bearer {TOKEN}",
                "--workers",
                "2",
            ],
            capture_output=True,
            text=True,
            timeout=900,
            cwd=tmp_path,
            env={"NO_COLOR": "1", "PATH": str(st_cli.parent), "HOME": str(tmp_path)},
        )
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-8000:]
    generated = re.search(r"(\d+) generated", out)
    assert generated and int(generated.group(1)) >= 3000, out[-3000:]
    print(f"schemathesis: {generated.group(0)}")
    summary = out[out.rindex("SUMMARY") :]
    assert "skipped" not in summary and "failure" not in summary.split("Test cases:")[1], summary
