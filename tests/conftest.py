"""Test fixtures: an isolated BentoML home and MLflow store per session, one small trained demo,
a real server and the machine's PostgreSQL; e2e, image and export tests are `process` tests too.
What starts processes lives in tests/harness.py (the benchmarks use it as well)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from .harness import IN_CI, POSTGRES_URL, connect, serving

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
# markers of tests that start a process; `make test` deselects them all with -m "not process"
PROCESS_MARKERS = ("e2e", "image", "export")


@pytest.hookimpl(tryfirst=True)  # before -m deselects by the markers added here
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if any(item.get_closest_marker(name) for name in PROCESS_MARKERS):
            item.add_marker(pytest.mark.process)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(SESSION_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def session_dir() -> Path:
    """The session's stores: bentoml/ (BENTOML_HOME), mlflow.db, mlartifacts/, tasks.db."""
    return SESSION_DIR


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


@pytest.fixture(scope="session")
def server(demo_models, tmp_path_factory) -> Iterator[str]:
    """A real `bentoml serve` process on a free port; its base URL."""
    with serving(tmp_path_factory.mktemp("serve") / "serve.log") as (base, _):
        yield base


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """The machine's PostgreSQL (SCORING_TEST_POSTGRES_URL): skipped where there is none, a
    failure in CI."""
    try:
        with connect(POSTGRES_URL) as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # any failure to connect means: no server here
        message = f"PostgreSQL at {POSTGRES_URL} unreachable: {exc}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return POSTGRES_URL
