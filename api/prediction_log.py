"""The prediction log: one JSON line per sampled request with its inputs, outputs, model version
(and its training data's digest), arm, latency and fallback reasons, with the use case's personal
data (`pii: true` fields) dropped or replaced by a keyed hash before the line is built: no sink
ever sees it. The request builds its line (one pass: its answers' own dicts, serialised in Rust)
and appends it to a bounded buffer; a thread writes what has gathered every
`prediction_log_flush_ms`, in one write, so a slow sink never holds a request up and the thread
takes the interpreter lock a few times a second, not once per line (a writer woken per line cost
the API worker more than the lines themselves). A full buffer drops the line and counts it
(`scoring_prediction_log_dropped_total`); what is buffered is written when the worker exits."""

from __future__ import annotations

import atexit
import collections
import functools
import hashlib
import hmac
import logging
import random
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Any

import orjson

from api import metrics
from configuration import Settings, UseCase

LOG = logging.getLogger(__name__)
# fields of an answer (a `Prediction` dict) a line leaves out: the key is in the input already
NOT_LOGGED = ("key", "probabilities")


class _Writer:
    """Lines appended by requests, written by a daemon thread every `interval_s` in one write.
    At most `capacity` lines wait; beyond, `add` drops the line and counts it."""

    def __init__(self, sink: IO[str], capacity: int, interval_s: float) -> None:
        self.sink, self.capacity, self.interval_s = sink, capacity, interval_s
        self.lines: collections.deque[str] = collections.deque()
        self.lock = threading.Lock()  # one writer at a time: the thread, `flush` or `close`
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self.thread.start()

    def add(self, line: str) -> None:
        if len(self.lines) >= self.capacity:
            metrics.prediction_log_dropped().inc()
        else:
            self.lines.append(line)  # deque.append: atomic, no lock on the request's side

    def _run(self) -> None:
        while not self.stopping.wait(self.interval_s):
            self.flush()

    def flush(self) -> None:
        """Write every line gathered so far."""
        with self.lock:
            lines = self.lines
            taken = [lines.popleft() for _ in range(len(lines))]
            if not taken:
                return
            try:
                self.sink.write("\n".join(taken) + "\n")
                self.sink.flush()
            except (OSError, ValueError) as exc:  # a full disk, a closed pipe: counted, not fatal
                metrics.prediction_log_dropped().inc(len(taken))
                LOG.warning("prediction log: %d lines not written: %s", len(taken), type(exc))

    def close(self) -> None:
        self.stopping.set()
        self.thread.join()
        self.flush()
        if self.sink is not sys.stdout:
            self.sink.close()


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
        self.writer: _Writer | None = None
        if self.sample > 0:
            path = settings.prediction_log_path
            sink = path.open("a", encoding="utf-8") if path else sys.stdout
            interval_s = settings.prediction_log_flush_ms / 1000
            self.writer = _Writer(sink, settings.prediction_log_queue, interval_s)
            atexit.register(self.close)  # the lines still buffered are written before exit

    def flush(self) -> None:
        """Write every line recorded so far."""
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        """Write what is buffered, then stop the writer thread."""
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.close()

    def redact(self, row: dict[str, Any]) -> dict[str, Any]:
        """The row as it may be logged (a copy): personal data dropped, or hashed with the key."""
        if self.hash_key is None:  # a copy and a few deletions, in C, not a dict built key by key
            out = row.copy()
            for name in self.pii:
                out.pop(name, None)
            return out
        out = {}
        for name, value in row.items():
            if name in self.pii:
                if value is None:
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
        writer = self.writer
        if writer is None or (self.sample < 1 and random.random() >= self.sample):
            return
        latency_ms = round((time.perf_counter() - started) * 1000, 3)
        writer.add(self.line(route, rows, answers, latency_ms))

    def line(
        self,
        route: str,
        rows: list[dict[str, Any]],
        answers: list[dict[str, Any]],
        latency_ms: float,
    ) -> str:
        """The JSON line of a request, its personal data dropped or hashed: per row the input,
        then its answer's fields but NOT_LOGGED and the training data's digest; orjson
        serialises."""
        digest, redact = self.data_digest, self.redact
        entries = []
        for row, answer in zip(rows, answers, strict=True):
            entry = answer.copy()  # a copy and deletions, in C: cheaper than a new dict
            for name in NOT_LOGGED:
                entry.pop(name, None)
            entry["input"] = redact(row)
            entry["data_sha256"] = digest(answer["model_version"])
            entries.append(entry)
        line = {"ts": time.time(), "route": route, "latency_ms": latency_ms, "rows": entries}
        return orjson.dumps(line, default=str).decode()
