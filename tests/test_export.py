"""The Bento is self-contained: `bentoml export`, a fresh virtual environment from the Bento's own
requirements, and `bentoml serve` of the export outside the project with an empty BentoML home."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx
import pytest

from .harness import (
    build_bento,
    free_port,
    serve_command,
    show_log,
    start_process,
    stop,
    wait_for_http,
)

pytestmark = [pytest.mark.e2e, pytest.mark.export]

# what a Bento may carry from this project; everything else stays out
SOURCES = {"service.py", "api", "configuration", "runners", "bentofile.yaml"}


def uv() -> str:
    found = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    assert found, "uv not found (bash .ci/setup installs it)"
    return found


def test_exported_bento_serves_from_a_fresh_environment(demo_models, churn, tmp_path):
    started = time.monotonic()
    tag = build_bento()
    exported = tmp_path / "scoring.bento"
    subprocess.run(
        [sys.executable, "-m", "bentoml", "export", tag, str(exported)],
        check=True,
        capture_output=True,
    )
    bento = tmp_path / "bento"
    with tarfile.open(exported) as archive:
        archive.extractall(bento, filter="data")
    assert {p.name for p in (bento / "src").iterdir()} <= SOURCES
    assert sorted(p.name for p in (bento / "models").iterdir()) == sorted(
        {f"churn-{component}" for component in ("preprocessor", "xgboost")}
    )

    venv = tmp_path / "venv"
    subprocess.run([uv(), "venv", "-q", "--python", sys.executable, str(venv)], check=True)
    python = str(venv / "bin" / "python")
    requirements = bento / "env" / "python" / "requirements.txt"
    subprocess.run(
        [uv(), "pip", "install", "-q", "--python", python, "-r", str(requirements)], check=True
    )
    # the serving environment has no training stack
    absent = subprocess.run([python, "-c", "import mlflow"], capture_output=True, check=False)
    assert absent.returncode != 0

    # nothing of the project or the test session: its own cwd, an empty BentoML home
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "BENTOML_HOME": str(tmp_path / "empty-bentoml-home"),
        "BENTOML_DO_NOT_TRACK": "true",
        "OMP_NUM_THREADS": "1",
        "SCORING_DRAIN_S": "0",  # stop at once
    }
    port = free_port()
    log = tmp_path / "serve.log"
    process = start_process(
        serve_command(port, str(bento), python), log, env, cwd=elsewhere, inherit_env=False
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{base}/readyz", process, timeout_s=120)
        response = httpx.post(
            f"{base}/v1/predict", json={"instance": churn.examples[0]}, timeout=30
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["prediction"]["label"] in churn.target.classes
        name, version = body["model"]["bento_tag"].split(":")
        assert name == "churn-xgboost" and (bento / "models" / name / version).is_dir()
    finally:
        stop(process)
        show_log(log)
    elapsed = time.monotonic() - started
    print(f"exported Bento: build, export, fresh venv, serve, predict in {elapsed:.1f} s")
