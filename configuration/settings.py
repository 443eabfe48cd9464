"""Runtime knobs of the scoring service: one frozen Settings class read from SCORING_* variables."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, PositiveFloat, PositiveInt, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent
USE_CASE_DIR = Path(__file__).resolve().parent / "use_cases"
WHSEC = re.compile(r"whsec_[A-Za-z0-9+/]{16,}={0,2}")


class Settings(BaseSettings):
    """Every knob of training and serving; override any field with SCORING_<FIELD>."""

    model_config = SettingsConfigDict(env_prefix="SCORING_", frozen=True, extra="forbid")

    # --- what is served -------------------------------------------------------------------
    use_case: str = Field("churn", description="Use case name: a YAML file in use_case_dir.")
    use_case_dir: Path = Field(USE_CASE_DIR, description="Folder holding the use case YAML files.")
    model_flavor: Literal["xgboost", "sklearn"] = Field(
        "xgboost", description="Which model answers predictions."
    )
    model_alias: str = Field(
        "champion", description="Registry alias imported into the BentoML store and served."
    )
    challenger_alias: str = Field(
        "challenger", description="Alias of the challenger, served beside the champion if imported."
    )
    challenger_mode: Literal["off", "split", "shadow"] = Field(
        "shadow",
        description="split: a share of keys get the challenger's answer; shadow: every row is "
        "also scored by the challenger, which is measured and never returned.",
    )
    challenger_share: float = Field(
        0.1, ge=0, le=1, description="Share of request keys routed to the challenger in split."
    )
    packed_versions: PositiveInt = Field(
        3, description="Newest imports of the serving model packed into a Bento (rollbacks)."
    )
    admin_token: SecretStr | None = Field(
        None, description="Bearer token of the /v1/admin routes; without one they are disabled."
    )
    monitoring: bool = Field(
        True,
        description="Per-row metrics (predictions per class, scores, confidence, per arm) and "
        "drift; fallbacks are counted either way.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO",
        description="Level of the service's own log lines: access lines, model swaps, warm-up, "
        "tasks claimed and finished, drains (BentoML's loggers keep their own).",
    )
    prediction_log_sample: float = Field(
        1.0, ge=0, le=1, description="Share of requests written to the prediction log (0: off)."
    )
    prediction_log_queue: PositiveInt = Field(
        10_000,
        description="Prediction log lines (requests) waiting to be written at most; "
        "beyond, lines are dropped and counted in scoring_prediction_log_dropped_total.",
    )
    prediction_log_flush_ms: PositiveInt = Field(
        100, description="How often the prediction log's thread writes the lines gathered."
    )
    prediction_log_path: Path | None = Field(
        None, description="File of the prediction log (JSON lines); stdout when unset."
    )
    prediction_log_pii: Literal["drop", "hash"] = Field(
        "drop", description="Personal data (pii fields) in the log: dropped, or a keyed hash."
    )
    prediction_log_hash_key: SecretStr | None = Field(
        None, description="HMAC-SHA256 key of prediction_log_pii=hash (keep it secret)."
    )
    drift_window_rows: PositiveInt = Field(
        5000, description="Recent rows (champion model answers) drift is computed over."
    )
    drift_min_rows: PositiveInt = Field(500, description="Fewer rows: status insufficient_data.")
    drift_psi_warning: PositiveFloat = Field(0.1, description="PSI from which status is warning.")
    drift_psi_alert: PositiveFloat = Field(0.25, description="PSI from which status is drift.")
    drift_update_s: PositiveFloat = Field(10.0, description="How often the drift gauges update.")
    routing_poll_s: PositiveFloat = Field(
        1.0, description="How often each API worker reads the routing an admin call stored."
    )

    # --- batching (adaptive, per runner service) --------------------------------------------
    # BentoML's max_latency_ms is a load-shedding deadline, not a wait: a request still queued
    # when it would finish later than this is answered 503. The wait itself is learned.
    preprocess_max_batch_size: PositiveInt = Field(
        512, description="Largest batch (rows) the preprocessor's adaptive batcher forms."
    )
    preprocess_max_latency_ms: PositiveInt = Field(
        1000, description="A preprocessor call still queued past this is answered 503 (shed)."
    )
    model_max_batch_size: PositiveInt = Field(
        512, description="Largest batch (rows) the model runner's adaptive batcher forms."
    )
    model_max_latency_ms: PositiveInt = Field(
        1000, description="A model call still queued past this is answered 503 (shed)."
    )

    # --- API-side coalescing: rows of concurrent requests leave in one runner call ---------
    api_max_batch_rows: PositiveInt = Field(
        512, description="Most rows of concurrent requests the API sends in one runner call."
    )
    api_max_in_flight: PositiveInt = Field(2, description="Runner calls in flight per API worker.")

    # --- workers and connections --------------------------------------------------------------
    api_workers: PositiveInt = Field(1, description="API worker processes.")
    preprocess_workers: PositiveInt = Field(1, description="Preprocessor worker processes.")
    model_workers: PositiveInt = Field(1, description="Model runner worker processes.")
    model_threads: PositiveInt = Field(1, description="XGBoost threads per model worker.")
    gc_young_objects: PositiveInt = Field(
        20_000,
        description="Objects a worker allocates (less those freed) before Python collects its "
        "youngest generation (Python's default: 700, a collection every few requests; "
        "docs/performance.md).",
    )
    runner_connection_max_requests: PositiveInt = Field(
        10**9,
        description="Requests before the API renews a runner connection (BentoML's default, 100, "
        "dropped calls in flight under load).",
    )
    runner_connection_max_age_s: PositiveFloat = Field(
        1e9, description="Seconds before the API renews a runner connection (see above)."
    )
    request_timeout_s: PositiveFloat = Field(
        10.0, description="BentoML's hard per-request timeout (504); above the deadlines below."
    )
    inference_deadline_ms: PositiveInt = Field(
        2000,
        description="Runner calls not answered within this get the fallback (timeout); the "
        "late work still finishes in its batch and its result is dropped.",
    )
    explain_budget_ms: PositiveInt = Field(
        500, description="Time budget of the optional explanation on /v1/predict."
    )
    explain_max_top_k: PositiveInt = Field(50, description="Cap on top_k of explanations.")
    warmup_timeout_s: PositiveFloat = Field(
        120.0, description="/readyz stays 503 until a warm-up prediction passes within this."
    )
    drain_s: float = Field(
        5.0,
        ge=0,
        description="On SIGTERM, /readyz answers 503 at once and requests are still answered "
        "for this long (a load balancer's time to stop sending) before the listener closes; "
        "the runners serve inference_deadline_ms longer. 0: stop at once. SIGINT never drains.",
    )
    trace_requests: bool = Field(
        False, description="OpenTelemetry spans for scoring routes (configure an exporter too)."
    )
    direct_routes: bool = Field(
        True,
        description="predict, predict_batch, explain and V2 infer answered without the router and "
        "request wrappers in front of them (api/direct.py); false: the usual path.",
    )

    # --- request limits -----------------------------------------------------------------------
    max_batch_rows: PositiveInt = Field(1000, description="Cap on rows in one predict_batch call.")
    max_body_bytes: PositiveInt = Field(2_000_000, description="Request bodies above this get 413.")
    api_max_concurrency: PositiveInt = Field(
        512, description="Requests in progress per API worker beyond which it answers 429."
    )

    # --- async scoring tasks (durable: they survive a restart) -------------------------------
    task_database_url: str = Field(
        f"sqlite:///{PROJECT_ROOT / 'tasks.db'}",
        description="SQLAlchemy URL of the task queue; PostgreSQL when replicas share it.",
    )
    task_max_rows: PositiveInt = Field(100_000, description="Cap on rows in one task (413).")
    task_max_body_bytes: PositiveInt = Field(
        64_000_000, description="Bodies above this get 413 on POST /v1/tasks."
    )
    task_retention_s: PositiveFloat = Field(
        86_400.0, description="Tasks and their results are deleted this long after submission."
    )
    task_lease_s: PositiveFloat = Field(
        30.0, description="A running task whose worker stops renewing this is claimed again."
    )
    task_max_attempts: PositiveInt = Field(3, description="Attempts before a task fails.")
    task_poll_s: PositiveFloat = Field(0.5, description="Idle workers look for tasks this often.")

    # --- results told, not polled: event streams, the WebSocket, webhooks (docs/delivery.md) --
    events_poll_s: PositiveFloat = Field(
        0.2, description="How often an open event stream reads its task's new events."
    )
    events_heartbeat_s: PositiveFloat = Field(
        15.0, description="An idle event stream sends a comment line this often (proxies)."
    )
    ws_max_in_flight: PositiveInt = Field(
        64,
        description="Messages of one WebSocket being scored or waiting to be sent; beyond it the "
        "server reads no more from that client (backpressure).",
    )
    ws_max_message_bytes: PositiveInt = Field(
        1_000_000, description="A larger WebSocket message closes the connection (1009)."
    )
    ws_idle_timeout_s: PositiveFloat = Field(
        60.0, description="A WebSocket with no message and nothing in flight this long is closed."
    )
    webhook_secret: SecretStr | None = Field(
        None,
        description="Standard Webhooks signing secret (`whsec_` + base64); without one, a task "
        "asking for a webhook is refused (403).",
    )
    webhook_allowed_hosts: list[str] = Field(
        [],
        description="Hosts webhooks may be sent to (JSON list): exact names, `*.domain`, or `*`. "
        "Loopback, private and link-local addresses also need the address itself listed.",
    )
    webhook_max_attempts: PositiveInt = Field(8, description="Attempts before a delivery fails.")
    webhook_backoff_s: PositiveFloat = Field(
        1.0, description="Wait before the second attempt; doubled after each failure."
    )
    webhook_backoff_cap_s: PositiveFloat = Field(
        300.0, description="Longest wait between attempts."
    )
    webhook_connect_timeout_s: PositiveFloat = Field(3.0, description="Webhook connect timeout.")
    webhook_read_timeout_s: PositiveFloat = Field(10.0, description="Webhook response timeout.")
    webhook_poll_s: PositiveFloat = Field(
        0.5, description="How often each API worker looks for webhooks to send."
    )

    # --- batch scoring ------------------------------------------------------------------------
    batch_database_url: str = Field(
        f"sqlite:///{PROJECT_ROOT / 'scores.db'}",
        description="SQLAlchemy URL batch scores are written to; embedded SQLite by default.",
    )
    batch_chunk_rows: PositiveInt = Field(50_000, description="Rows per chunk and transaction.")

    # --- model signing ------------------------------------------------------------------------
    model_signing_key: Path | None = Field(
        None,
        description="Ed25519 private key (unencrypted PEM file) that signs each model imported "
        "into the BentoML store; unset: a key generated once at .signing/model-signing.pem in "
        "the project folder, its public key beside it (model-signing.pub.pem).",
    )
    model_public_key: str | None = Field(
        None,
        description="Ed25519 public key (PEM text, or the path of a PEM file) every model's "
        "signature must verify with before a runner loads it; unset: signatures are not "
        "checked, only each file's SHA-256 recorded beside it.",
    )

    # --- training -----------------------------------------------------------------------------
    mlflow_tracking_uri: str = Field(
        f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}",
        validation_alias=AliasChoices("SCORING_MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_URI"),
        description="MLflow tracking and registry URI; embedded SQLite by default.",
    )
    mlflow_artifact_root: Path = Field(
        PROJECT_ROOT / "mlartifacts",
        description="Artifact folder used when MLflow runs embedded (SQLite).",
    )
    experiment_name: str = Field(
        "scoring-{use_case}", description="MLflow experiment of the training runs."
    )
    seed: int = Field(42, description="Random seed of the data split, demo data and models.")
    test_size: float = Field(0.2, gt=0, lt=1, description="Held-out share for the metrics.")
    demo_rows: PositiveInt = Field(20_000, description="Rows of generated demo data.")
    xgb_n_estimators: PositiveInt = Field(200, description="XGBoost trees.")
    xgb_max_depth: PositiveInt = Field(6, description="XGBoost tree depth.")
    xgb_learning_rate: PositiveFloat = Field(0.05, description="XGBoost learning rate (eta).")
    sklearn_c: PositiveFloat = Field(1.0, description="Inverse L2 strength of LogisticRegression.")

    # --- ONNX export (docs/onnx.md) -----------------------------------------------------------
    onnx_export: bool = Field(
        True,
        description="At training, export each model with its preprocessing as one ONNX graph "
        "(served at /v1/model.onnx) if it passes the parity gate; off: no export.",
    )
    onnx_parity_rows: int = Field(
        10_000,
        ge=10_000,
        description="Random valid rows (missing values and every category included; seeded "
        "by `seed`) the parity gate scores, besides the use case's examples.",
    )
    onnx_parity_tolerance: PositiveFloat = Field(
        1e-5,
        description="Largest |difference| between onnxruntime's and the served model's "
        "probability of any class on any parity row; beyond it the export is refused.",
    )

    @field_validator("webhook_secret")
    @classmethod
    def _whsec(cls, secret: SecretStr | None) -> SecretStr | None:
        if secret is not None and not WHSEC.fullmatch(secret.get_secret_value()):
            raise ValueError("a webhook secret is `whsec_` followed by base64 (16+ characters)")
        return secret

    def use_case_path(self, name: str | None = None) -> Path:
        return self.use_case_dir / f"{name or self.use_case}.yaml"


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
