"""api.metrics.observe_many against prometheus_client's own Histogram.observe, value by value."""

from __future__ import annotations

import math

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram

from api.metrics import SCORE_BUCKETS, observe_many


def exported(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
    """(sample name, le) -> value of every sample of the registry's histograms."""
    return {
        (sample.name, sample.labels.get("le", "")): sample.value
        for metric in registry.collect()
        for sample in metric.samples
        if not sample.name.endswith("_created")
    }


def histogram(registry: CollectorRegistry) -> Histogram:
    return Histogram("h", "test", ["arm"], buckets=SCORE_BUCKETS, registry=registry)


EDGES = np.array([*SCORE_BUCKETS, 0.0, -0.5, 1.5, math.inf, -math.inf, 0.05 + 1e-12, 0.05 - 1e-12])


@pytest.mark.parametrize("seed", range(20))
def test_a_batch_exports_what_observing_each_value_exports(seed):
    rng = np.random.default_rng(seed)
    values = np.concatenate([rng.random(rng.integers(0, 500)), rng.choice(EDGES, 20)])
    values = values[rng.permutation(len(values))]
    one_by_one, batched = CollectorRegistry(), CollectorRegistry()
    child = histogram(one_by_one).labels("a")
    for value in values.tolist():
        child.observe(value)
    target = histogram(batched).labels("a")
    for chunk in np.array_split(values, 3):  # several batches add up too
        observe_many(target, chunk)
    expected, got = exported(one_by_one), exported(batched)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if math.isnan(value):  # +Inf and -Inf in one sum
            assert math.isnan(got[key]), key
        elif key[0] == "h_sum":
            assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12)
        else:
            assert got[key] == value, key  # bucket counts and the count: exactly


def test_nan_is_skipped_and_nothing_is_nothing():
    registry = CollectorRegistry()
    child = histogram(registry).labels("a")
    observe_many(child, np.array([np.nan, 0.3, np.nan]))
    observe_many(child, np.array([]))
    samples = exported(registry)
    assert samples["h_count", ""] == 1 and samples["h_sum", ""] == pytest.approx(0.3)
    assert samples["h_bucket", "0.25"] == 0 and samples["h_bucket", "0.35"] == 1


# ---- the Monitor's per-request metrics, against a row-by-row count ------------------------------
def test_the_monitor_counts_every_row_as_one_by_one_would():
    """Monitor.observe (grouped by arm, numpy counts, observe_many) against the metrics a loop
    over the rows gives: predictions per (arm, version, label, source), score and confidence
    histograms, fallbacks by reason; two arms, fallbacks with and without a label, 30 requests,
    a few of them small enough to be measured row by row."""
    from types import SimpleNamespace

    from prometheus_client import REGISTRY

    from api.answers import Scored
    from api.monitor import Monitor
    from api.routing import Arm, Routing
    from configuration import Settings, current_use_case
    from configuration.policy import NO_LABEL, Decisions

    use_case = current_use_case()
    classes = use_case.target.classes
    stored = SimpleNamespace(info=SimpleNamespace(metadata={}))  # no drift reference
    champion = Arm("champion", "901", "1", None, stored, stored)  # type: ignore[arg-type]
    challenger = Arm("challenger", "902", "1", None, stored, stored)  # type: ignore[arg-type]
    routing = Routing(champion, challenger, "split")
    monitor = Monitor(Settings(monitoring=True), use_case, routing)

    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    def snapshot() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        out = {}
        for arm in (champion, challenger):
            at = {"arm": arm.name, "model_version": arm.model_version}
            for label in [*classes, "none"]:
                for source in ("model", "fallback"):
                    key = {**at, "label": label, "source": source}
                    out["scoring_predictions_total", tuple(key.items())] = sample(
                        "scoring_predictions_total", **key
                    )
            for histogram in ("scoring_score", "scoring_confidence"):
                for suffix in ("_count", "_sum"):
                    out[histogram + suffix, tuple(at.items())] = sample(histogram + suffix, **at)
                for bound in ("0.05", "0.5", "0.95", "+Inf"):
                    key = {**at, "le": bound}
                    out[histogram + "_bucket", tuple(key.items())] = sample(
                        histogram + "_bucket", **key
                    )
            for reason in ("low_confidence", "timeout"):
                key = {"reason": reason, **at}
                out["scoring_fallbacks_total", tuple(key.items())] = sample(
                    "scoring_fallbacks_total", **key
                )
        return out

    rng = np.random.default_rng(3)
    expected: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    def add(name: str, labels: dict[str, str], amount: float = 1.0) -> None:
        key = (name, tuple(labels.items()))
        expected[key] = expected.get(key, 0.0) + amount

    before = snapshot()
    for n in [1, 2, 4, 5, *rng.integers(1, 120, 26).tolist()]:  # row by row up to FEW_ROWS
        p1 = rng.random(n)
        probabilities = np.column_stack([1 - p1, p1])
        labels = (p1 >= 0.5).astype(int)
        confidence = np.maximum(p1, 1 - p1)
        reasons = np.array([None] * n, dtype=object)
        fallen = rng.random(n) < 0.2
        reasons[fallen] = rng.choice(["low_confidence", "timeout"], int(fallen.sum()))
        timeout = reasons == "timeout"
        labels[timeout & (rng.random(n) < 0.5)] = NO_LABEL  # a rule with no answer
        confidence[timeout] = np.nan  # the model did not answer
        probabilities[timeout] = np.nan
        arms = [champion if x < 0.7 else challenger for x in rng.random(n)]
        decisions = Decisions(labels, probabilities, confidence, reasons)
        rows = [{} for _ in range(n)]
        scored = Scored(decisions, routing, arms, probabilities, use_case.matrix(rows))
        monitor.observe(rows, scored)
        for i in range(n):  # what each row adds
            arm = arms[i]
            at = {"arm": arm.name, "model_version": arm.model_version}
            label = "none" if labels[i] == NO_LABEL else classes[labels[i]]
            source = "model" if reasons[i] is None else "fallback"
            add("scoring_predictions_total", {**at, "label": label, "source": source})
            if reasons[i] is not None:
                add("scoring_fallbacks_total", {"reason": reasons[i], **at})
            for histogram, value, counted in (
                ("scoring_score", p1[i], reasons[i] is None),
                ("scoring_confidence", confidence[i], not np.isnan(confidence[i])),
            ):
                if counted:
                    add(histogram + "_count", at)
                    add(histogram + "_sum", at, float(value))
                    for bound in ("0.05", "0.5", "0.95", "+Inf"):
                        if value <= float(bound):
                            add(histogram + "_bucket", {**at, "le": bound})
    after = snapshot()
    assert sum(expected.values()) > 1000
    for key in after:
        assert after[key] - before[key] == pytest.approx(expected.get(key, 0.0), abs=1e-9), key
