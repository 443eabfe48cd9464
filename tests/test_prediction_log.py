"""The prediction log: what a request logs, and that no personal data reaches any log."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid

import httpx
import pytest
from pydantic import SecretStr

from api.prediction_log import PredictionLog
from configuration import get_settings

from .harness import serving, wait_for_status

KEY = "prediction-log-test-key"


def keyed(value: str) -> str:
    return "hmac-sha256:" + hmac.new(KEY.encode(), value.encode(), hashlib.sha256).hexdigest()


@pytest.fixture
def log_file(tmp_path):
    return tmp_path / "predictions.jsonl"


def answer(i: int) -> dict:
    return {
        "label": "churned",
        "score": i / 100,
        "confidence": 0.9,
        "source": "model",
        "fallback_reason": None,
        "arm": "champion",
        "model_version": "1",
    }


def test_lines_are_written_by_a_thread_in_order_and_all_before_close(churn, log_file):
    settings = get_settings().model_copy(update={"prediction_log_path": log_file})
    log = PredictionLog(settings, churn, lambda version: f"digest-of-{version}")
    requests = 500
    for i in range(requests):
        row = {**churn.examples[0], "customer_id": f"C-{i}"}
        log.record("predict", [row], [answer(i)], time.perf_counter())
    log.close()  # what was queued is written
    lines = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert [line["rows"][0]["input"]["customer_id"] for line in lines] == [
        f"C-{i}" for i in range(requests)
    ]
    entry = lines[-1]["rows"][0]
    assert "email" not in entry["input"] and entry["score"] == (requests - 1) / 100
    assert entry["data_sha256"] == "digest-of-1" and lines[-1]["route"] == "predict"


def test_a_full_buffer_drops_lines_and_counts_them_without_blocking(churn, log_file):
    """The writer is held (its lock taken, as a slow sink would hold it): the buffer (3 lines)
    fills, the next requests return at once, their lines dropped and counted; the buffered
    ones are written after."""
    from prometheus_client import REGISTRY

    dropped_total = "scoring_prediction_log_dropped_total"
    before = REGISTRY.get_sample_value(dropped_total) or 0.0
    settings = get_settings().model_copy(
        update={"prediction_log_path": log_file, "prediction_log_queue": 3}
    )
    log = PredictionLog(settings, churn)
    assert log.writer is not None
    row = dict(churn.examples[0])
    with log.writer.lock:
        for i in range(10):
            log.record("predict", [row], [answer(i)], time.perf_counter())
        assert (REGISTRY.get_sample_value(dropped_total) or 0.0) - before == 7
        assert not log_file.exists() or log_file.read_text() == ""
    log.flush()
    scores = [json.loads(line)["rows"][0]["score"] for line in log_file.read_text().splitlines()]
    assert scores == [0.0, 0.01, 0.02]
    log.close()


def test_a_failing_sink_costs_the_lines_not_the_writer(churn, log_file):
    from prometheus_client import REGISTRY

    dropped_total = "scoring_prediction_log_dropped_total"
    before = REGISTRY.get_sample_value(dropped_total) or 0.0
    log = PredictionLog(get_settings().model_copy(update={"prediction_log_path": log_file}), churn)
    assert log.writer is not None
    log.writer.sink.close()  # writes now raise ValueError, as a closed pipe raises OSError
    row = dict(churn.examples[0])
    for i in range(3):
        log.record("predict", [row], [answer(i)], time.perf_counter())
    log.flush()
    assert (REGISTRY.get_sample_value(dropped_total) or 0.0) - before == 3
    log.writer.sink = log_file.open("a", encoding="utf-8")  # the sink is back
    log.record("predict", [row], [answer(7)], time.perf_counter())
    log.close()
    assert [json.loads(line)["rows"][0]["score"] for line in log_file.read_text().splitlines()] == [
        0.07
    ]


def test_the_thread_writes_without_being_asked(churn, log_file):
    settings = get_settings().model_copy(
        update={"prediction_log_path": log_file, "prediction_log_flush_ms": 20}
    )
    log = PredictionLog(settings, churn)
    log.record("predict", [dict(churn.examples[0])], [answer(5)], time.perf_counter())
    deadline = time.monotonic() + 10
    while not log_file.read_text() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert json.loads(log_file.read_text())["rows"][0]["score"] == 0.05
    log.close()


def test_a_line_holds_no_personal_data_dropped_or_hashed(churn):
    row = {**churn.examples[0], "email": "someone@example.com"}
    rows, answers = [row, {**row, "email": None}], [answer(1), answer(2)]
    dropped = PredictionLog(get_settings().model_copy(update={"prediction_log_sample": 0}), churn)
    line = dropped.line("predict_batch", rows, answers, 1.0)
    assert "someone@example.com" not in line and "email" not in line
    entries = json.loads(line)["rows"]
    assert [e["input"]["customer_id"] for e in entries] == [row["customer_id"]] * 2
    assert set(entries[0]) == {
        "input", "label", "score", "confidence", "source", "fallback_reason", "arm",
        "model_version", "data_sha256",
    }  # fmt: skip
    settings = get_settings().model_copy(
        update={
            "prediction_log_sample": 0,
            "prediction_log_pii": "hash",
            "prediction_log_hash_key": SecretStr(KEY),
        }
    )
    hashed = json.loads(PredictionLog(settings, churn).line("predict", rows, answers, 1.0))
    assert hashed["rows"][0]["input"]["email"] == keyed("someone@example.com")
    assert "email" not in hashed["rows"][1]["input"]  # missing stays missing
    assert row["email"] == "someone@example.com"  # the request's own row is left as it was


def test_personal_data_is_dropped_or_hashed_before_logging(churn):
    row = dict(churn.examples[0])
    dropped = PredictionLog(get_settings(), churn).redact(row)
    assert "email" not in dropped and dropped["customer_id"] == row["customer_id"]
    settings = get_settings().model_copy(
        update={"prediction_log_pii": "hash", "prediction_log_hash_key": SecretStr(KEY)}
    )
    hashed = PredictionLog(settings, churn).redact(row)
    assert hashed["email"] == keyed(row["email"])
    with pytest.raises(ValueError, match="PREDICTION_LOG_HASH_KEY"):
        PredictionLog(get_settings().model_copy(update={"prediction_log_pii": "hash"}), churn)


@pytest.mark.e2e
def test_no_personal_data_reaches_any_log(demo_models, churn, tmp_path):
    """Every route that takes rows, valid and invalid ones, against a real server: neither the
    prediction log nor the server's own output holds an e-mail address."""
    log_path = tmp_path / "predictions.jsonl"
    server_log = tmp_path / "serve.log"
    env = {
        "SCORING_PREDICTION_LOG_PATH": str(log_path),
        "SCORING_PREDICTION_LOG_PII": "hash",
        "SCORING_PREDICTION_LOG_HASH_KEY": KEY,
        "SCORING_TASK_DATABASE_URL": f"sqlite:///{tmp_path / 'tasks.db'}",
    }
    emails: list[str] = []

    def row(**changes) -> dict:
        email = f"pii-{uuid.uuid4().hex}@example.com"
        emails.append(email)
        return {**churn.examples[0], "customer_id": f"C-{len(emails)}", "email": email, **changes}

    with serving(server_log, env) as (base, _):
        post = lambda path, body: httpx.post(f"{base}{path}", json=body, timeout=60)  # noqa: E731
        assert post("/v1/predict", {"instance": row()}).status_code == 200
        assert post("/v1/predict", {"instance": row(), "explain": True}).status_code == 200
        assert post("/v1/explain", {"instance": row()}).status_code == 200
        batch = post("/v1/predict_batch", {"instances": [row(), row(age=5), row(region="mars")]})
        assert batch.status_code == 200 and len(batch.json()["errors"]) == 2
        assert post("/v1/predict", {"instance": row(age="old")}).status_code == 400
        assert post("/v1/predict", {"instance": row(shoe_size=44)}).status_code == 400
        assert post("/v1/predict_batch", {"instances": row()}).status_code == 400
        task = post("/v1/tasks", {"instances": [row(), row(age=3)]}).json()
        wait_for_status(base, task["task_id"], "succeeded")
        time.sleep(0.5)
    logged = log_path.read_text()
    everything = logged + server_log.read_text()
    leaked = [email for email in emails if email in everything]
    assert not leaked, f"{len(leaked)} e-mail addresses in the logs"
    lines = [json.loads(line) for line in logged.splitlines()]
    assert {line["route"] for line in lines} == {"predict", "explain", "predict_batch", "task"}
    entries = [entry for line in lines for entry in line["rows"]]
    assert len(entries) == 5  # the valid rows: 3 single, 1 of the batch, 1 of the task
    for line in lines:
        assert line["latency_ms"] > 0
    for entry in entries:
        assert entry["input"]["email"].startswith("hmac-sha256:")
        assert entry["arm"] == "champion" and entry["model_version"] == "1"
        assert entry["data_sha256"] == demo_models["xgboost"].info.labels["data_sha256"]
        assert "fallback_reason" in entry and entry["label"] in ("stayed", "churned", None)
    assert keyed(emails[0]) == entries[0]["input"]["email"]
