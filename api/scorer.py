"""The API worker's scoring path: rows tagged with the arm that answers them -> coalesced runner
calls (preprocessor, then model) -> the decision and fallback policy -> metrics per arm and
model version. Also the shadow challenger, explanations, warm-up and the routing swap."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, get_args

import httpx
import numpy as np
from bentoml.exceptions import ServiceUnavailable

from api import metrics
from api.answers import Explainer
from api.coalescing import Coalescer
from api.routing import ARM, Arm, Routing, routing_from_spec
from configuration import Settings, UseCase
from configuration.drift import SCORE, DriftWindow
from configuration.policy import Decisions, FallbackReason, decide
from configuration.signing import SignatureError
from runners.artifacts import verified_file

LOG = logging.getLogger(__name__)
DRIFT_BATCH_ROWS = 256  # rows buffered before they are binned into the drift window
NOT_READY_ERRORS = (ServiceUnavailable, httpx.TransportError, OSError)


@dataclass(frozen=True)
class Runners:
    """The runner calls the scorer makes (remote in `bentoml serve`, local in process)."""

    transform: Callable[[np.ndarray], Awaitable[np.ndarray]]
    predict_proba: Callable[[np.ndarray], Awaitable[np.ndarray]]
    contributions: Callable[[np.ndarray], Awaitable[np.ndarray]]
    load_preprocessor: Callable[[str], Awaitable[str]]
    load_model: Callable[[str], Awaitable[str]]


class Scorer:
    def __init__(
        self, settings: Settings, use_case: UseCase, runners: Runners, routing: Routing
    ) -> None:
        self.settings = settings
        self.use_case = use_case
        self.runners = runners
        self.routing = routing  # replaced whole by `swap`, never changed in place
        self.coalesce = Coalescer(
            self._run_runners, settings.api_max_batch_rows, settings.api_max_in_flight
        )
        self.explainers: dict[str, Explainer] = {}
        self.examples = [dict(e) for e in use_case.examples]
        self.monitoring = settings.monitoring
        self.drift = self._drift_window(routing)
        self.drift_pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.drift_pending_rows = 0
        self.shadow_counts: dict[tuple[str, str], list[int]] = {}  # (agreed, compared)
        self.histogram_children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self.metric_children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        self._declare_fallbacks(routing)

    @property
    def deadline_s(self) -> float:
        return self.settings.inference_deadline_ms / 1000

    # ---- runner calls ------------------------------------------------------------------------
    async def _run_runners(self, rows: list[dict[str, Any]]) -> np.ndarray:
        """Probabilities (n x k) for a coalesced batch, each row by its arm's versions; a row a
        runner failed on stays NaN (never guessed) and is not sent on to the model."""
        arms: list[Arm] = [row[ARM] for row in rows]
        raw = np.empty((len(rows), len(self.use_case.model_feature_names) + 1), dtype=object)
        raw[:, 0] = [a.preprocessor_version for a in arms]
        raw[:, 1:] = self.use_case.matrix(rows)
        features = await self.runners.transform(raw)
        ok = ~np.isnan(features).any(axis=1)
        probabilities = np.full((len(rows), len(self.use_case.target.classes)), np.nan)
        if ok.any():
            versions = np.array([float(a.model_version) for a in arms])
            model_input = np.column_stack([versions, features])[ok]
            probabilities[ok] = await self.runners.predict_proba(model_input)
        return probabilities

    async def _probabilities(self, rows: list[dict[str, Any]]) -> tuple[np.ndarray, Any]:
        """(probabilities, failure reason or None) within the inference deadline."""
        try:
            return await asyncio.wait_for(self.coalesce(rows), self.deadline_s), None
        except (TimeoutError, httpx.TimeoutException):
            reason: FallbackReason = "timeout"  # the batch runs on; its result is dropped
        except NOT_READY_ERRORS as exc:
            reason = "model_not_ready"
            LOG.warning("runner unavailable: %s", exc)
        except Exception:  # any other runner failure: logged, answered by the fallback
            reason = "model_error"
            LOG.exception("runner call failed")
        return np.full((len(rows), len(self.use_case.target.classes)), np.nan), reason

    # ---- answers -----------------------------------------------------------------------------
    async def decide(self, rows: list[dict[str, Any]]) -> tuple[Decisions, Routing]:
        """The answer for each row, and the routing that gave it: the row's arm's model within
        the deadline, else the fallback. Each row is tagged with its arm (`row[ARM]`); in shadow
        mode the challenger also scores every row, in the same runner calls, and only the
        agreement is kept."""
        routing = self.routing  # one routing per request: never mixed versions
        key = self.use_case.key
        for row, arm in zip(
            rows, routing.assign([row.get(key) if key else None for row in rows]), strict=True
        ):
            row[ARM] = arm
        shadow = routing.challenger if routing.mode == "shadow" else None
        scored = rows if shadow is None else rows + [{**row, ARM: shadow} for row in rows]
        probabilities, failed = await self._probabilities(scored)
        n = len(rows)
        decisions = decide(
            self.use_case, probabilities[:n], lambda index: [rows[i] for i in index], failed
        )
        if self.drift is not None:
            self._observe_drift(routing, rows, probabilities[:n])
        self._count_fallbacks(rows, decisions)
        if self.monitoring:
            self._observe(rows, decisions)
            if shadow is not None and failed is None:
                self._compare(routing, decisions, probabilities[n:], rows)
        return decisions, routing

    def _count_fallbacks(self, rows: list[dict[str, Any]], decisions: Decisions) -> None:
        """`scoring_fallbacks_total`, counted with or without the other per-row metrics."""
        fallen: Counter[tuple[str, ...]] = Counter(
            (reason, row[ARM].name, row[ARM].model_version)
            for row, reason in zip(rows, decisions.reasons.tolist(), strict=True)
            if reason is not None
        )
        for labels, count in fallen.items():
            self._child(metrics.fallbacks(), labels).inc(count)

    def _declare_fallbacks(self, routing: Routing) -> None:
        """Every fallback reason of every arm is exported from the start (at 0): a rate or an
        alert over `scoring_fallbacks_total` needs the series before the first fallback."""
        for arm in [routing.champion, *([routing.challenger] if routing.challenger else [])]:
            for reason in get_args(FallbackReason):
                self._child(metrics.fallbacks(), (reason, arm.name, arm.model_version))

    def _observe(self, rows: list[dict[str, Any]], decisions: Decisions) -> None:
        """Per-row metrics: predictions summed per label set first, histogram children cached
        (a `.labels()` lookup per row cost as much as the observation)."""
        classes = self.use_case.target.classes
        counted: Counter[tuple[str, ...]] = Counter()
        for row, label, reason, score, confidence in zip(
            rows,
            decisions.labels.tolist(),
            decisions.reasons.tolist(),
            decisions.scores.tolist(),
            decisions.confidence.tolist(),
            strict=True,
        ):
            arm: Arm = row[ARM]
            source = "model" if reason is None else "fallback"
            counted[
                arm.name, arm.model_version, "none" if label < 0 else classes[label], source
            ] += 1
            histograms = self._histograms(arm)
            if confidence == confidence:  # the model answered (NaN otherwise)
                histograms[1].observe(confidence)
            if reason is None:
                histograms[0].observe(score)
        for labels, count in counted.items():
            self._child(metrics.predictions(), labels).inc(count)

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

    def _compare(
        self,
        routing: Routing,
        decisions: Decisions,
        shadow_probabilities: np.ndarray,
        rows: list[dict[str, Any]],
    ) -> None:
        assert routing.challenger is not None
        shadow = decide(self.use_case, shadow_probabilities, lambda index: [rows[i] for i in index])
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

    async def explain(
        self, row: dict[str, Any], decisions: Decisions, top_k: int
    ) -> dict[str, Any] | None:
        """The explanation of the model's answer for one row (None when it has none)."""
        if decisions.reasons[0] not in (None, "low_confidence"):
            return None
        arm: Arm = row[ARM]
        raw = np.empty((1, len(self.use_case.model_feature_names) + 1), dtype=object)
        raw[0, 0] = arm.preprocessor_version
        raw[:, 1:] = self.use_case.matrix([row])
        features = await self.runners.transform(raw)
        if np.isnan(features).any():
            return None
        model_input = np.column_stack([[float(arm.model_version)], features])
        contributions = await self.runners.contributions(model_input)
        label = max(int(decisions.labels[0]), 0)
        return self.explainer(arm).explain(row, contributions[0], label, top_k)

    def explainer(self, arm: Arm) -> Explainer:
        if arm.preprocessor_version not in self.explainers:
            names = [str(n) for n in arm.preprocessor.info.metadata["feature_names"]]  # type: ignore[union-attr]
            self.explainers[arm.preprocessor_version] = Explainer(self.use_case, names)
        return self.explainers[arm.preprocessor_version]

    # ---- readiness and swaps -----------------------------------------------------------------
    async def warm(self, routing: Routing) -> str | None:
        """Score the use case's examples with every arm of `routing` through the runners (the
        deadline does not apply); None when the model answered them all, else the problem."""
        arms = [routing.champion, *([routing.challenger] if routing.challenger else [])]
        rows = [{**example, ARM: arm} for arm in arms for example in self.examples or [{}]]
        try:
            probabilities = await self.coalesce(rows)
        except Exception as exc:  # runners still starting, or broken
            return repr(exc)
        return None if np.isfinite(probabilities).all() else "the model failed on an example"

    async def swap(self, spec: dict[str, Any]) -> tuple[Routing, float]:
        """Load, verify and warm the models of `spec`, then serve them: (routing, seconds).
        Requests in flight finish with the routing they started with."""
        started = time.perf_counter()
        routing = await asyncio.to_thread(routing_from_spec, self.settings, spec)
        for arm in [routing.champion, *([routing.challenger] if routing.challenger else [])]:
            await self.runners.load_preprocessor(arm.preprocessor_version)
            await self.runners.load_model(arm.model_version)
        problem = await self.warm(routing)
        if problem is not None:
            raise RuntimeError(f"the new routing failed its warm-up: {problem}")
        if routing.champion != self.routing.champion:
            self.drift = self._drift_window(routing)
            self.drift_pending, self.drift_pending_rows = [], 0
        self._declare_fallbacks(routing)
        self.routing = routing
        return routing, time.perf_counter() - started

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

    def _observe_drift(
        self, routing: Routing, rows: list[dict[str, Any]], probabilities: np.ndarray
    ) -> None:
        """Rows the champion's model answered (whatever the policy then did with the answer),
        with the model's own score, join the drift window."""
        assert self.drift is not None
        scores = probabilities[:, 1] if probabilities.shape[1] == 2 else probabilities.max(axis=1)
        mine = np.array([row[ARM] is routing.champion for row in rows]) & ~np.isnan(scores)
        if mine.any():
            chosen = [row for row, keep in zip(rows, mine.tolist(), strict=True) if keep]
            self.drift_pending.append((self.use_case.matrix(chosen), scores[mine]))
            self.drift_pending_rows += len(chosen)
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
