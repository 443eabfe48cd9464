"""Test fixtures: an isolated BentoML home and MLflow store per session, one small trained demo."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

# BENTOML_HOME is read once when bentoml is imported: set everything before any import of it.
SESSION_DIR = Path(tempfile.mkdtemp(prefix="scoring-tests-"))
TEST_ENV = {
    "BENTOML_HOME": str(SESSION_DIR / "bentoml"),
    "BENTOML_DO_NOT_TRACK": "true",
    "SCORING_MLFLOW_TRACKING_URI": f"sqlite:///{SESSION_DIR / 'mlflow.db'}",
    "SCORING_MLFLOW_ARTIFACT_ROOT": str(SESSION_DIR / "mlartifacts"),
    "SCORING_TASK_DATABASE_URL": f"sqlite:///{SESSION_DIR / 'tasks.db'}",
    "SCORING_MODEL_SIGNING_KEY": str(SESSION_DIR / "signing" / "model-signing.pem"),
    "SCORING_DEMO_ROWS": "4000",
    "SCORING_XGB_N_ESTIMATORS": "60",
    "OMP_NUM_THREADS": "1",
    "SCORING_DRAIN_S": "0",  # test servers stop at once on SIGTERM (test_e2e_shutdown drains)
}
os.environ.update(TEST_ENV)
os.environ.pop("MLFLOW_TRACKING_URI", None)


def _session_signing_key() -> None:
    """Imports (here and in the CLI processes tests start) sign with a key of this session
    instead of generating one in the checkout."""
    from configuration.signing import default_signing_key

    default_signing_key(Path(TEST_ENV["SCORING_MODEL_SIGNING_KEY"]).parent)


_session_signing_key()

PROJECT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(SESSION_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def demo_models() -> dict:
    """Train the churn demo once (small), promote it and import it into the session store."""
    from configuration import get_settings
    from training import jobs

    return jobs.demo(get_settings())


@pytest.fixture(scope="session")
def api_client(demo_models):
    """One in-process app per session: BentoML registers its metrics once per process."""
    from starlette.testclient import TestClient

    import service

    with TestClient(service.Scoring.to_asgi(), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="session")
def local_scorer(demo_models):
    """The API's Scorer over in-process runner instances (no HTTP, no batching)."""
    from api.routing import initial_routing
    from api.scorer import Runners, Scorer
    from configuration import current_use_case, get_settings
    from runners.artifacts import served_model
    from runners.preprocessor import Preprocessor
    from runners.xgboost_runner import XGBoostRunner

    preprocessor, model = Preprocessor.inner(), XGBoostRunner.inner()
    runners = Runners(
        transform=preprocessor.transform,
        predict_proba=model.predict_proba,
        contributions=model.contributions,
        load_preprocessor=preprocessor.load,
        load_model=model.load,
    )
    settings = get_settings()
    routing = initial_routing(settings, served_model(XGBoostRunner))
    return Scorer(settings, current_use_case(), runners, routing)


@pytest.fixture(scope="session")
def churn():
    from configuration import current_use_case

    return current_use_case()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_http(url: str, process: subprocess.Popen, timeout_s: float) -> float:
    """Poll `url` until it answers 200; seconds waited. Fails (never skips) on timeout or exit."""
    import httpx

    start = time.monotonic()
    with httpx.Client(timeout=1.0) as client:  # httpx.get: a client and SSL context per poll
        while time.monotonic() - start < timeout_s:
            if process.poll() is not None:
                pytest.fail(f"process exited with {process.returncode} before {url} was ready")
            try:
                if client.get(url).status_code == 200:
                    return time.monotonic() - start
            except httpx.TransportError:
                pass
            time.sleep(0.1)
    pytest.fail(f"{url} not ready within {timeout_s} s")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def start_process(
    args: list[str], log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen:
    with log.open("wb") as output:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            args,
            cwd=PROJECT,
            env={**os.environ, **(env or {})},
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@contextlib.contextmanager
def serving(log: Path, env: dict[str, str] | None = None, timeout_s: float = 120) -> Iterator[str]:
    """A real `bentoml serve` of the service on a free port, its output in `log`; its base URL.
    Stopped (SIGTERM, then SIGKILL) on exit."""
    port = free_port()
    args = ["-m", "bentoml", "serve", "service:Scoring", "--host", "127.0.0.1", "--port"]
    process = start_process([sys.executable, *args, str(port)], log, env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{base}/readyz", process, timeout_s=timeout_s)
        yield base
    finally:
        stop(process)
        if os.environ.get("SCORING_TEST_SHOW_LOGS"):
            print(log.read_text()[-5000:])


@pytest.fixture(scope="session")
def server(demo_models, tmp_path_factory) -> Iterator[str]:
    """A real `bentoml serve` process on a free port; its base URL."""
    with serving(tmp_path_factory.mktemp("serve") / "serve.log") as base:
        yield base
