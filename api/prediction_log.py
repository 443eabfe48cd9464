"""The prediction log: one JSON line per sampled request with its inputs, outputs, model version
(and its training data's digest), arm, latency and fallback reasons, with the use case's personal
data (`pii: true` fields) dropped or replaced by a keyed hash before the line is built: no sink
ever sees it."""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import random
import sys
import time
from collections.abc import Callable
from typing import Any

from pydantic_core import to_json

from configuration import Settings, UseCase

LOGGER = "scoring.predictions"


class PredictionLog:
    def __init__(
        self,
        settings: Settings,
        use_case: UseCase,
        data_digest: Callable[[str], str | None] | None = None,
    ) -> None:
        """`data_digest`: a model version's training data digest (lineage), looked up once per
        version."""
        self.sample = settings.prediction_log_sample
        self.data_digest = functools.cache(data_digest or (lambda version: None))
        self.pii = set(use_case.pii_names)
        self.hash_key: bytes | None = None
        if settings.prediction_log_pii == "hash":
            if settings.prediction_log_hash_key is None:
                raise ValueError(
                    "SCORING_PREDICTION_LOG_PII=hash needs SCORING_PREDICTION_LOG_HASH_KEY"
                )
            self.hash_key = settings.prediction_log_hash_key.get_secret_value().encode()
        self.logger = logging.getLogger(LOGGER)
        self.logger.propagate = False  # only our handler: never BentoML's or the root's
        self.logger.setLevel(logging.INFO)
        if not self.logger.handlers and self.sample > 0:
            path = settings.prediction_log_path
            handler = logging.FileHandler(path) if path else logging.StreamHandler(sys.stdout)
            handler.setFormatter(logging.Formatter("%(message)s"))
            self.logger.addHandler(handler)

    def redact(self, row: dict[str, Any]) -> dict[str, Any]:
        """The row as it may be logged: personal data dropped, or hashed with the key."""
        out = {}
        for name, value in row.items():
            if name in self.pii:
                if self.hash_key is None or value is None:
                    continue
                digest = hmac.new(self.hash_key, str(value).encode(), hashlib.sha256)
                value = f"hmac-sha256:{digest.hexdigest()}"
            out[name] = value
        return out

    def record(
        self,
        route: str,
        rows: list[dict[str, Any]],
        answers: list[dict[str, Any]],
        started: float,
    ) -> None:
        """Log one request (if sampled): `rows` as validated, `answers` their predictions."""
        if self.sample <= 0 or (self.sample < 1 and random.random() >= self.sample):
            return
        line = {
            "ts": time.time(),
            "route": route,
            "latency_ms": round((time.perf_counter() - started) * 1000, 3),
            "rows": [
                {
                    "input": self.redact(row),
                    "label": answer["label"],
                    "score": answer["score"],
                    "confidence": answer["confidence"],
                    "source": answer["source"],
                    "fallback_reason": answer["fallback_reason"],
                    "arm": answer["arm"],
                    "model_version": answer["model_version"],
                    "data_sha256": self.data_digest(answer["model_version"]),
                }
                for row, answer in zip(rows, answers, strict=True)
            ],
        }
        self.logger.info(to_json(line, fallback=str).decode())
