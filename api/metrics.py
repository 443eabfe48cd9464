"""Prometheus metrics of the API worker (fallbacks, predictions, scores, shadow agreement, drift),
beside BentoML's. Each is created on first use: BentoML sets up prometheus_client's
multiprocess mode when its server starts, before any of these runs."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import numpy as np

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


def observe_many(child: Any, values: np.ndarray) -> None:
    """`child.observe(v)` for every v of `values` (a labelled Histogram child; NaN skipped), in
    one pass: prometheus_client keeps one counter per bucket (made cumulative when exported)
    and one of the sum, so a batch is one increment of the sum and one per bucket it reaches
    instead of two per value, each a locked write to a multiprocess file. The bucket of v is the
    first upper bound >= v, as in `observe`; tests/test_metrics.py checks it against `observe`
    on random values, bucket edges and infinities included."""
    values = values[~np.isnan(values)]
    if values.size == 0:
        return
    bounds = child._upper_bounds  # the buckets given, then +Inf
    counts = np.bincount(np.searchsorted(bounds, values, side="left"), minlength=len(bounds))
    child._sum.inc(float(values.sum()))
    for index in np.flatnonzero(counts).tolist():
        child._buckets[index].inc(int(counts[index]))


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


@functools.cache
def prediction_log_dropped() -> Counter:
    """Prediction log lines dropped: the buffer of lines waiting to be written was full, or
    the sink failed (`scoring_prediction_log_dropped_total`)."""
    from prometheus_client import Counter

    return Counter(
        "scoring_prediction_log_dropped",
        "Prediction log lines dropped: a full buffer of lines to write, or a failing sink.",
    )
