"""What the API worker measures about its answers, once per request: fallbacks by reason,
predictions, scores and confidence per arm and model version, the shadow challenger's agreement,
and the drift of the champion's inputs and scores against its training reference."""

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import Any, get_args

import numpy as np

from api import metrics
from api.answers import Scored
from api.routing import Arm, Routing
from configuration import Settings, UseCase
from configuration.drift import SCORE, DriftWindow
from configuration.policy import FallbackReason, decide
from configuration.signing import SignatureError
from runners.artifacts import verified_file

LOG = logging.getLogger(__name__)
DRIFT_BATCH_ROWS = 1024  # rows buffered before they are binned into the drift window
FEW_ROWS = 4  # requests of up to this many rows are measured row by row (no numpy per call)


def _rows_by_arm(arms: list[Arm]) -> list[tuple[Arm, Any]]:
    """(arm, index of its rows) for each arm of a request; one slice when there is one arm."""
    first = arms[0]
    if all(arm is first for arm in arms):
        return [(first, slice(None))]
    rows: dict[int, list[int]] = {}
    by_id = {}
    for i, arm in enumerate(arms):
        rows.setdefault(id(arm), []).append(i)
        by_id[id(arm)] = arm
    return [(by_id[key], np.array(index)) for key, index in rows.items()]


class Monitor:
    """`observe` each request's answers; `follow` a new routing; `drift_report` for /v1/drift.
    Fallbacks are counted whatever `settings.monitoring`; the rest only with it."""

    def __init__(self, settings: Settings, use_case: UseCase, routing: Routing) -> None:
        self.settings = settings
        self.use_case = use_case
        self.routing = routing
        self.drift = self._drift_window(routing)
        self.drift_pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.drift_pending_rows = 0
        self.shadow_counts: dict[tuple[str, str], list[int]] = {}  # (agreed, compared)
        self.histogram_children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self.metric_children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        self._declare_fallbacks(routing)

    def follow(self, routing: Routing) -> None:
        """A swap: the new arms' counters from 0, a fresh drift window for a new champion."""
        if routing.champion != self.routing.champion:
            self.drift = self._drift_window(routing)
            self.drift_pending, self.drift_pending_rows = [], 0
        self._declare_fallbacks(routing)
        self.routing = routing

    def observe(self, rows: list[dict[str, Any]], scored: Scored) -> None:
        """Everything measured about one request's answers."""
        self._count_fallbacks(scored)
        if not self.settings.monitoring:
            return
        if self.drift is not None:
            self._observe_drift(scored)
        self._observe(scored)
        if scored.shadow is not None:
            self._compare(scored, rows)

    # ---- counters and histograms -------------------------------------------------------------
    def _count_fallbacks(self, scored: Scored) -> None:
        """`scoring_fallbacks_total`, counted with or without the other per-row metrics."""
        reasons = scored.decisions.reasons
        fallen: Counter[tuple[str, ...]] = Counter(
            (reasons[i], scored.arms[i].name, scored.arms[i].model_version)
            for i in np.flatnonzero(reasons != None).tolist()  # noqa: E711
        )
        for labels, count in fallen.items():
            self._child(metrics.fallbacks(), labels).inc(count)

    def _declare_fallbacks(self, routing: Routing) -> None:
        """Every fallback reason of every arm is exported from the start (at 0): a rate or an
        alert over `scoring_fallbacks_total` needs the series before the first fallback."""
        for arm in routing.arms():
            for reason in get_args(FallbackReason):
                self._child(metrics.fallbacks(), (reason, arm.name, arm.model_version))

    def _observe(self, scored: Scored) -> None:
        """Per-row metrics, a request at a time: rows grouped by arm, predictions counted per
        (label, source) with numpy, histograms fed whole arrays (metrics.observe_many). A
        request of a few rows goes row by row: numpy's cost per call is more than theirs."""
        classes = self.use_case.target.classes
        decisions = scored.decisions
        if len(scored.arms) <= FEW_ROWS:
            self._observe_rows(scored)
            return
        for arm, index in _rows_by_arm(scored.arms):
            labels = decisions.labels[index]
            answered = decisions.reasons[index] == None  # noqa: E711 (the model answered)
            # one code per (label or none, source): (label + 1) * 2 + is-fallback
            codes, counts = np.unique((labels + 1) * 2 + ~answered, return_counts=True)
            for code, count in zip(codes.tolist(), counts.tolist(), strict=True):
                label = "none" if code < 2 else classes[code // 2 - 1]
                source = "fallback" if code % 2 else "model"
                self._child(
                    metrics.predictions(), (arm.name, arm.model_version, label, source)
                ).inc(count)
            scores, confidences = self._histograms(arm)
            metrics.observe_many(confidences, decisions.confidence[index])  # NaN: no answer
            metrics.observe_many(scores, decisions.scores[index][answered])

    def _observe_rows(self, scored: Scored) -> None:
        """`_observe` one row at a time, with prometheus_client's own `observe`."""
        classes = self.use_case.target.classes
        decisions = scored.decisions
        for arm, label, reason, score, confidence in zip(
            scored.arms,
            decisions.labels.tolist(),
            decisions.reasons.tolist(),
            decisions.scores.tolist(),
            decisions.confidence.tolist(),
            strict=True,
        ):
            source = "model" if reason is None else "fallback"
            name = "none" if label < 0 else classes[label]
            self._child(metrics.predictions(), (arm.name, arm.model_version, name, source)).inc()
            scores, confidences = self._histograms(arm)
            if confidence == confidence:  # the model answered (NaN otherwise)
                confidences.observe(confidence)
            if reason is None:
                scores.observe(score)

    def _child(self, metric: Any, labels: tuple[str, ...]) -> Any:
        key = (metric, labels)
        if key not in self.metric_children:
            self.metric_children[key] = metric.labels(*labels)
        return self.metric_children[key]

    def _histograms(self, arm: Arm) -> tuple[Any, Any]:
        key = (arm.name, arm.model_version)
        if key not in self.histogram_children:
            self.histogram_children[key] = (
                metrics.scores().labels(*key),
                metrics.confidences().labels(*key),
            )
        return self.histogram_children[key]

    def _compare(self, scored: Scored, rows: list[dict[str, Any]]) -> None:
        """Shadow mode: how often the challenger's label agrees with the champion's."""
        routing, decisions = scored.routing, scored.decisions
        assert routing.challenger is not None and scored.shadow is not None
        shadow = decide(self.use_case, scored.shadow, lambda index: [rows[i] for i in index])
        both = (decisions.reasons == None) & (shadow.reasons == None)  # noqa: E711
        agree = int((decisions.labels[both] == shadow.labels[both]).sum())
        versions = (routing.champion.model_version, routing.challenger.model_version)
        compared = int(both.sum())
        metrics.shadow_rows().labels(*versions, "true").inc(agree)
        metrics.shadow_rows().labels(*versions, "false").inc(compared - agree)
        totals = self.shadow_counts.setdefault(versions, [0, 0])
        totals[0] += agree
        totals[1] += compared
        if totals[1]:
            metrics.shadow_agreement().labels(*versions).set(totals[0] / totals[1])

    # ---- drift of the champion's inputs and scores ---------------------------------------------
    def _drift_window(self, routing: Routing) -> DriftWindow | None:
        """A fresh window against the champion's reference (None if its import has none, or
        with monitoring off)."""
        model = routing.champion.model
        if not self.settings.monitoring or "reference" not in model.info.metadata:
            return None
        try:
            reference = json.loads(verified_file(model, "reference").read_text())
        except SignatureError as exc:
            # the runners refuse this model too, so the warm-up never passes: this worker stays
            # up to answer /readyz 503 (and say why) instead of exiting at start-up
            LOG.error("no drift window: %s", exc)
            return None
        score = reference["scores"][self.settings.model_flavor]
        return DriftWindow(self.use_case, reference, score, self.settings.drift_window_rows)

    def _observe_drift(self, scored: Scored) -> None:
        """Rows the champion's model answered (whatever the policy then did with the answer),
        with the model's own score, join the drift window."""
        probabilities = scored.probabilities
        scores = probabilities[:, 1] if probabilities.shape[1] == 2 else probabilities.max(axis=1)
        champion = scored.routing.champion
        answered = ~np.isnan(scores)
        if all(arm is champion for arm in scored.arms) and answered.all():
            inputs = scored.inputs  # the usual request: every row, no copy
        else:
            mine = np.array([arm is champion for arm in scored.arms]) & answered
            inputs, scores = scored.inputs[mine], scores[mine]
        if len(scores):
            self.drift_pending.append((inputs, scores))
            self.drift_pending_rows += len(scores)
            if self.drift_pending_rows >= DRIFT_BATCH_ROWS:
                self._flush_drift()

    def _flush_drift(self) -> None:
        """Bin the pending rows in one go: numpy per request and feature cost more than the
        binning itself."""
        if self.drift is not None and self.drift_pending:
            matrices, scores = zip(*self.drift_pending, strict=True)
            self.drift.observe(np.vstack(matrices), np.concatenate(scores))
        self.drift_pending, self.drift_pending_rows = [], 0

    def drift_report(self) -> dict[str, Any]:
        """/v1/drift: PSI per feature and for the score, and a status against the thresholds;
        also sets the `scoring_drift_psi` gauges."""
        settings, champion = self.settings, self.routing.champion
        base: dict[str, Any] = {
            "model_version": champion.model_version,
            "window_rows": 0,
            "min_rows": settings.drift_min_rows,
            "thresholds": {
                "warning": settings.drift_psi_warning,
                "drift": settings.drift_psi_alert,
            },
            "features": {},
            "score": None,
            "drifting": [],
        }
        if self.drift is None:
            return {**base, "status": "unavailable"}
        self._flush_drift()
        rows = self.drift.window_rows
        if rows < settings.drift_min_rows:
            # PSI over a few rows is noise (2-8 after 4 requests): no values, no gauges, so
            # that an alert on the gauge never fires on a fresh server
            return {**base, "status": "insufficient_data", "window_rows": rows}
        values = self.drift.values()
        for name, value in values.items():
            metrics.drift_psi().labels(name, champion.model_version).set(value)
        score = values.pop(SCORE)
        worst = max([score, *values.values()])
        if worst >= settings.drift_psi_alert:
            status = "drift"
        elif worst >= settings.drift_psi_warning:
            status = "warning"
        else:
            status = "ok"
        drifting = [n for n, v in values.items() if v >= settings.drift_psi_warning]
        if score >= settings.drift_psi_warning:
            drifting.append("score")
        return {
            **base,
            "status": status,
            "window_rows": rows,
            "features": values,
            "score": score,
            "drifting": drifting,
        }
