"""The servers the benchmark compares the project with, each started by the benchmark itself and
serving the same model files: the plain FastAPI app (benchmarks/plain_fastapi.py) and Seldon
MLServer with adaptive batching, in its own virtual environment (benchmarks/mlserver/: MLServer
pins dependencies the project has newer) serving the fitted ColumnTransformer + XGBClassifier
as one scikit-learn Pipeline, called with its pandas-codec request body."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from configuration import UseCase
from tests.harness import HOST, cli_command, free_port, start_process, stop, wait_for_http

HERE = Path(__file__).parent
MLSERVER_DIR = HERE / "mlserver"
MLSERVER_LOCK = MLSERVER_DIR / "requirements.txt"
MLSERVER_VENV = MLSERVER_DIR / ".venv"  # not committed (.gitignore)
MLSERVER_MODEL = "churn"
# MLServer's adaptive batching is off unless a model sets both: up to 32 requests, 5 ms window
MLSERVER_BATCHING = {"max_batch_size": 32, "max_batch_time": 0.005}
PLAIN_WORKERS = 2  # one uvicorn worker per core
READY_TIMEOUT_S = 180
POLL_S = 0.02
ENV = {"BENTOML_DO_NOT_TRACK": "true"}


def stored_model() -> tuple[Any, Any]:
    """The service's fitted preprocessing (ColumnTransformer) and XGBClassifier, the latest
    stored versions, hash-checked: what every peer serves."""
    import bentoml
    import skops.io
    import xgboost as xgb

    from configuration import get_settings
    from runners.artifacts import SKOPS_TRUSTED_TYPES, model_tag, verified_file

    settings = get_settings()
    preprocessor = skops.io.load(
        verified_file(bentoml.models.get(model_tag(settings, "preprocessor"))),
        trusted=SKOPS_TRUSTED_TYPES,
    )
    model = xgb.XGBClassifier(n_jobs=1)
    model.load_model(verified_file(bentoml.models.get(model_tag(settings, "xgboost"))))
    return preprocessor, model


@contextmanager
def _serving(
    command: list[str], log: Path, env: dict[str, str], port: int, ready: str
) -> Iterator[tuple[str, int]]:
    """`command` started, (its base URL, its pid) once GET `ready` answers 200; stopped after."""
    process = start_process(command, log, env)
    try:
        base = f"http://{HOST}:{port}"
        wait_for_http(base + ready, process, READY_TIMEOUT_S, POLL_S)
        yield base, process.pid
    finally:
        stop(process)


@contextmanager
def plain_fastapi(log: Path) -> Iterator[tuple[str, int]]:
    """benchmarks/plain_fastapi.py under uvicorn (uvloop, httptools, a worker per core), ready;
    (its base URL, its pid)."""
    port = free_port()
    args = [
        "benchmarks.plain_fastapi:app",
        *("--host", HOST, "--port", str(port), "--workers", str(PLAIN_WORKERS)),
        *("--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning"),
    ]
    with _serving(cli_command("uvicorn", *args), log, ENV, port, "/docs") as started:
        yield started


def mlserver_python() -> Path:
    """MLServer's virtual environment, created from its lock on first use (and again when the
    lock changes), with the project's uv."""
    python = MLSERVER_VENV / "bin" / "python"
    stamp = MLSERVER_VENV / "lock.sha256"
    digest = hashlib.sha256(MLSERVER_LOCK.read_bytes()).hexdigest()
    if python.exists() and stamp.exists() and stamp.read_text() == digest:
        return python
    print("creating MLServer's environment (benchmarks/mlserver/.venv) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(MLSERVER_VENV)], check=True)
    uv = Path(sys.executable).parent / "uv"
    install = [str(uv), "pip", "install", "-q", "--python", str(python), "-r", str(MLSERVER_LOCK)]
    subprocess.run(install, check=True)
    stamp.write_text(digest)
    return python


def mlserver_model_folder(folder: Path, http_port: int) -> Path:
    """MLServer's settings and one model: the service's fitted preprocessing and XGBoost model
    (the latest stored versions, hash-checked) as a scikit-learn Pipeline, joblib-pickled."""
    import joblib
    from sklearn.pipeline import Pipeline

    preprocessor, model = stored_model()
    model_folder = folder / MLSERVER_MODEL  # MLServer warns when they differ
    model_folder.mkdir(parents=True, exist_ok=True)
    pipeline = Pipeline([("preprocess", preprocessor), ("model", model)])
    joblib.dump(pipeline, model_folder / "model.joblib")
    model_settings = {
        "name": MLSERVER_MODEL,
        "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": "./model.joblib"},
        **MLSERVER_BATCHING,
    }
    (model_folder / "model-settings.json").write_text(json.dumps(model_settings))
    server_settings = {
        "http_port": http_port,
        "grpc_port": free_port(),
        "metrics_port": free_port(),
        "host": HOST,
    }
    (folder / "settings.json").write_text(json.dumps(server_settings))
    return folder


@contextmanager
def mlserver(folder: Path, log: Path) -> Iterator[tuple[str, int]]:
    """`mlserver start` on the model folder, its model ready; (its base URL, its pid)."""
    python = mlserver_python()
    port = free_port()
    mlserver_model_folder(folder, port)
    command = [str(python.parent / "mlserver"), "start", str(folder)]
    env = {**ENV, "OMP_NUM_THREADS": "1"}
    with _serving(command, log, env, port, f"/v2/models/{MLSERVER_MODEL}/ready") as started:
        yield started


def mlserver_request(use_case: UseCase, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """An inference request in MLServer's pandas codec (one input per column, decoded into a
    DataFrame), asking for predict_proba: categories as BYTES, numbers and booleans as FP64."""
    inputs = []
    for spec in use_case.model_features:
        values = [row.get(spec.name) for row in rows]
        if spec.type == "categorical":
            inputs.append({"name": spec.name, "datatype": "BYTES", "data": values})
        else:
            data = [None if v is None else float(v) for v in values]
            inputs.append({"name": spec.name, "datatype": "FP64", "data": data})
    for tensor in inputs:
        tensor["shape"] = [len(rows)]
    return {
        "parameters": {"content_type": "pd"},
        "inputs": inputs,
        "outputs": [{"name": "predict_proba"}],
    }


def mlserver_probabilities(answer: dict[str, Any]) -> list[list[float]]:
    """The predict_proba rows of an MLServer answer."""
    (output,) = answer["outputs"]
    width = output["shape"][1]
    data = output["data"]
    return [data[i : i + width] for i in range(0, len(data), width)]
