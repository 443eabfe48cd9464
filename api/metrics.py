"""Prometheus metrics of the API worker (fallbacks, predictions, scores, shadow agreement, drift),
beside BentoML's. Each is created on first use: BentoML sets up prometheus_client's
multiprocess mode when its server starts, before any of these runs."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import Counter, Gauge, Histogram


@functools.cache
def fallbacks() -> Counter:
    """Rows answered by the fallback policy instead of the model
    (`scoring_fallbacks_total{reason,arm,model_version}`)."""
    from prometheus_client import Counter

    return Counter(
        "scoring_fallbacks",
        "Rows answered by the fallback policy, by reason, arm and model version.",
        ["reason", "arm", "model_version"],
    )


SCORE_BUCKETS = tuple(i / 20 for i in range(1, 21))


@functools.cache
def predictions() -> Counter:
    from prometheus_client import Counter

    return Counter(
        "scoring_predictions",
        "Rows answered, by arm, model version, label and source (model or fallback).",
        ["arm", "model_version", "label", "source"],
    )


@functools.cache
def scores() -> Histogram:
    from prometheus_client import Histogram

    return Histogram(
        "scoring_score",
        "The model's score (binary: positive-class probability; else the top class's), per row.",
        ["arm", "model_version"],
        buckets=SCORE_BUCKETS,
    )


@functools.cache
def confidences() -> Histogram:
    from prometheus_client import Histogram

    return Histogram(
        "scoring_confidence",
        "The model's probability of the label it decided, per row.",
        ["arm", "model_version"],
        buckets=SCORE_BUCKETS,
    )


@functools.cache
def shadow_rows() -> Counter:
    from prometheus_client import Counter

    return Counter(
        "scoring_shadow_rows",
        "Rows scored by both arms in shadow mode, and whether their labels agreed.",
        ["champion_version", "challenger_version", "agree"],
    )


@functools.cache
def shadow_agreement() -> Gauge:
    from prometheus_client import Gauge

    return Gauge(
        "scoring_shadow_agreement_rate",
        "Share of shadow-scored rows (since start) on which challenger and champion agreed.",
        ["champion_version", "challenger_version"],
        multiprocess_mode="mostrecent",
    )


@functools.cache
def drift_psi() -> Gauge:
    from prometheus_client import Gauge

    return Gauge(
        "scoring_drift_psi",
        "PSI of recent rows against the champion's training reference (feature __score__: the "
        "model's score).",
        ["feature", "model_version"],
        multiprocess_mode="mostrecent",
    )


@functools.cache
def webhook_deliveries() -> Counter:
    """Webhook delivery attempts by outcome: sent (2xx), retried (to be tried again), failed
    (no attempt left) (`scoring_webhook_deliveries_total{outcome}`)."""
    from prometheus_client import Counter

    return Counter(
        "scoring_webhook_deliveries",
        "Webhook delivery attempts: sent (2xx), retried (will be tried again), failed (gave up).",
        ["outcome"],
    )
