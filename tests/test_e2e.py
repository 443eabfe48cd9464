"""End to end: a real `bentoml serve` process over HTTP, and training against a real
`mlflow server` on 127.0.0.1. These start real processes; in CI nothing here may skip."""

from __future__ import annotations

import asyncio
import sys

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .harness import PROJECT, free_port, histogram, run_cli, start_process, stop, wait_for_http

pytestmark = pytest.mark.e2e


def test_served_predictions_over_http(server, churn):
    row = dict(churn.examples[0])
    response = httpx.post(f"{server}/v1/predict", json={"instance": row}, timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["prediction"]["key"] == row["customer_id"]
    batch = httpx.post(
        f"{server}/v1/predict_batch", json={"instances": [row, {**row, "age": 999}]}, timeout=30
    ).json()
    assert batch["predictions"][0] == response.json()["prediction"]
    assert batch["errors"][0]["index"] == 1
    bad = httpx.post(f"{server}/v1/predict", json={"instance": {**row, "age": "x"}}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_input"
    assert "Traceback" not in bad.text
    info = httpx.get(f"{server}/v1/model", timeout=30).json()
    assert info["serving"]["name"] == "churn-xgboost"


def test_concurrent_requests_form_batches_and_all_succeed(server, churn):
    rows = [dict(churn.examples[i % 2], customer_id=f"C-{i}") for i in range(400)]
    before = httpx.get(f"{server}/metrics", timeout=30).text

    async def fire() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server, timeout=60, limits=limits) as client:
            return await asyncio.gather(
                *(client.post("/v1/predict", json={"instance": r}) for r in rows)
            )

    responses = asyncio.run(fire())
    assert [r.status_code for r in responses] == [200] * len(rows)
    assert [r.json()["prediction"]["key"] for r in responses] == [r["customer_id"] for r in rows]
    after = httpx.get(f"{server}/metrics", timeout=30).text
    batches = {}
    for runner in ("preprocessor", "xgboost"):
        rows0, batches0 = histogram(before, "scoring_runner_batch_rows", runner=runner)
        rows1, batches1 = histogram(after, "scoring_runner_batch_rows", runner=runner)
        assert rows1 - rows0 == len(rows)  # every row went through each runner exactly once
        mean_rows = (rows1 - rows0) / (batches1 - batches0)
        assert mean_rows > 1.0, f"{runner}: no batches formed (mean {mean_rows} rows per batch)"
        batches[runner] = batches1 - batches0
    # BentoML's adaptive batcher is on too: its histogram counts, per batch it dispatched, the
    # calls it merged into it. Each batch the model ran was one of its dispatches, and the API
    # had coalesced the rows: fewer calls reached it than there were rows.
    adaptive = {"runner_name": "xgboost", "method_name": "predict_proba"}
    calls0, dispatches0 = histogram(before, "bentoml_service_adaptive_batch_size", **adaptive)
    calls1, dispatches1 = histogram(after, "bentoml_service_adaptive_batch_size", **adaptive)
    assert dispatches1 - dispatches0 == batches["xgboost"]
    assert dispatches1 - dispatches0 <= calls1 - calls0 < len(rows)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 backed by SQLite, serving artifacts itself."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    process = start_process(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{root / 'server.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
        ],
        root / "server.log",
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/health", process, timeout_s=180)
        yield url
    finally:
        stop(process)


def test_training_against_a_remote_mlflow_server(mlflow_server, tmp_path):
    """The demo job with MLFLOW_TRACKING_URI pointing at a real server: runs, registry aliases and
    artifacts live on the server, and the import reads them back from it."""
    bentoml_home = tmp_path / "bentoml"
    env = {
        "MLFLOW_TRACKING_URI": mlflow_server,
        "BENTOML_HOME": str(bentoml_home),
    }
    result = run_cli("training", "demo", env=env, unset=["SCORING_MLFLOW_TRACKING_URI"])
    assert result.returncode == 0, result.stderr[-3000:]

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    champion = client.get_model_version_by_alias("churn-xgboost", "champion")
    assert champion.tags["run_id"] == champion.run_id
    run = client.get_run(champion.run_id)
    assert run.data.metrics["xgboost.roc_auc"] > 0.7
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    stored = list((bentoml_home / "models" / "churn-xgboost").glob("v*/model.yaml"))
    assert len(stored) == 1
    text = stored[0].read_text()
    assert f"run_id: {champion.run_id}" in text
    assert f"tracking_uri: {mlflow_server}" in text


def test_the_grafana_dashboard_queries_metrics_the_service_exports(server, churn):
    """Every metric a panel of deploy/grafana-dashboard.json queries is one the service
    exports: BentoML's as seen on a real /metrics, ours as api/metrics.py and runners/metrics.py
    define them."""
    import json
    import re

    from api import metrics
    from runners.metrics import batch_rows

    httpx.post(f"{server}/v1/predict", json={"instance": dict(churn.examples[0])}, timeout=30)
    exported = {
        family.name
        for family in text_string_to_metric_families(httpx.get(f"{server}/metrics").text)
    }
    ours = {
        factory()._name
        for factory in (
            batch_rows,
            metrics.fallbacks,
            metrics.predictions,
            metrics.scores,
            metrics.confidences,
            metrics.shadow_rows,
            metrics.shadow_agreement,
            metrics.drift_psi,
        )
    }
    dashboard = json.loads((PROJECT / "deploy" / "grafana-dashboard.json").read_text())
    queried = {
        re.sub(r"_(bucket|sum|count|total)$", "", name)
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\b((?:bentoml|scoring)_[a-z_]+)\b", target["expr"])
    }
    assert len(dashboard["panels"]) >= 10
    for name in queried:
        assert name in (exported if name.startswith("bentoml") else ours), name
