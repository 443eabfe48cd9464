"""Drift: reference statistics stored with the model at training, PSI over a sliding window."""

from __future__ import annotations

import numpy as np
import pytest

from configuration.drift import DriftWindow, numeric_reference, psi
from training.data import generate_churn

BATCH = "/v1/predict_batch"


def customers(churn, n: int, seed: int) -> list[dict]:
    frame = generate_churn(n, seed=seed).drop(columns=[churn.target.name])
    records = frame.astype(object).where(frame.notna(), None).to_dict("records")
    names = {f.name for f in churn.features}
    return [{k: v for k, v in r.items() if k in names} for r in records]


def feed(client, rows: list[dict]) -> None:
    for start in range(0, len(rows), 1000):
        response = client.post(BATCH, json={"instances": rows[start : start + 1000]})
        assert response.status_code == 200 and response.json()["errors"] == []


def test_the_reference_is_stored_with_the_model(demo_models, churn):
    import json

    from runners.artifacts import verified_file

    reference = json.loads(verified_file(demo_models["xgboost"], "reference").read_text())
    assert set(reference["features"]) == set(churn.model_feature_names)
    tenure = reference["features"]["tenure_months"]
    assert len(tenure["proportions"]) == len(tenure["edges"]) + 2  # + missing
    assert sum(tenure["proportions"]) == pytest.approx(1.0)
    region = reference["features"]["region"]
    assert region["categories"] == ["north", "south", "east", "west", "central"]
    assert region["proportions"][-1] > 0  # the demo data has missing regions
    assert set(reference["scores"]) == {"xgboost", "sklearn"}


def test_drift_stays_low_on_unshifted_rows_and_rises_on_shifted_ones(api_client, churn):
    from prometheus_client import REGISTRY

    feed(api_client, customers(churn, 5000, seed=11))  # a full window of the same population
    steady = api_client.get("/v1/drift").json()
    assert steady["status"] == "ok", steady
    assert steady["window_rows"] == 5000
    assert max(steady["features"].values()) < 0.1 and steady["score"] < 0.1

    shifted = [
        {**row, "tenure_months": 1.0, "contract_type": "month_to_month", "logins_30d": 0.0}
        for row in customers(churn, 5000, seed=12)
    ]
    feed(api_client, shifted)
    drifted = api_client.get("/v1/drift").json()
    assert drifted["status"] == "drift"
    for name in ("tenure_months", "contract_type", "logins_30d"):
        assert drifted["features"][name] > 0.25 and name in drifted["drifting"]
    assert drifted["features"]["age"] < 0.1  # untouched features stay put
    assert drifted["score"] > 0.25  # these customers look far likelier to churn
    gauge = REGISTRY.get_sample_value(
        "scoring_drift_psi",
        {"feature": "tenure_months", "model_version": drifted["model_version"]},
    )
    assert gauge == pytest.approx(drifted["features"]["tenure_months"])


def test_the_window_forgets_what_slid_out(churn):
    names = churn.model_feature_names
    reference = {"features": {n: numeric_reference([0.0, 1.0] * 50) for n in names}}
    window = DriftWindow(churn, reference, numeric_reference(np.linspace(0, 1, 100)), size=100)
    width = len(names)
    window.observe(np.full((100, width), 5.0, dtype=object), np.full(100, 0.99))
    like_reference = np.tile(np.array([[0.0], [1.0]], dtype=object), (25, width))
    assert window.values()["age"] > 1
    for _ in range(4):  # 200 rows like the reference push the shifted ones out
        window.observe(like_reference, np.linspace(0, 1, 50))
    assert window.window_rows == 100
    assert window.values()["age"] < 0.01
    assert window.counts[0].sum() == 100  # counts stay consistent through evictions


def test_psi_is_zero_for_the_same_distribution_and_grows_with_the_shift():
    expected = [0.25, 0.25, 0.25, 0.25]
    assert psi(expected, np.array([25, 25, 25, 25])) == pytest.approx(0.0)
    assert 0 < psi(expected, np.array([30, 25, 25, 20])) < psi(expected, np.array([70, 10, 10, 10]))


def fresh_scorer(local_scorer, monkeypatch):
    """A new Scorer over the in-process runners, its metrics in a registry of its own."""
    from prometheus_client import CollectorRegistry, Counter, Gauge

    from api import metrics
    from api.scorer import Scorer

    registry = CollectorRegistry()
    gauge = Gauge("scoring_drift_psi", "", ["feature", "model_version"], registry=registry)
    counter = Counter(
        "scoring_fallbacks", "", ["reason", "arm", "model_version"], registry=registry
    )
    monkeypatch.setattr(metrics, "drift_psi", lambda: gauge)
    monkeypatch.setattr(metrics, "fallbacks", lambda: counter)
    scorer = Scorer(
        local_scorer.settings, local_scorer.use_case, local_scorer.runners, local_scorer.routing
    )
    return scorer, registry


def test_no_drift_value_and_no_gauge_before_the_window_holds_min_rows(
    local_scorer, churn, monkeypatch
):
    """A fresh server listed every feature as drifting (PSI 2-8 after 4 requests) and exported
    those gauges, so that an alert on PSI > 0.25 fired on every start."""
    import asyncio

    scorer, registry = fresh_scorer(local_scorer, monkeypatch)
    rows = customers(churn, 4, seed=3)
    asyncio.run(scorer.score(rows))
    report = scorer.monitor.drift_report()
    assert report["status"] == "insufficient_data"
    assert report["window_rows"] == 4 and report["min_rows"] == 500
    assert report["features"] == {} and report["drifting"] == [] and report["score"] is None
    assert not [s for m in registry.collect() if m.name == "scoring_drift_psi" for s in m.samples]

    asyncio.run(scorer.score(customers(churn, 600, seed=4)))
    report = scorer.monitor.drift_report()
    assert report["status"] == "ok" and report["window_rows"] == 604
    assert set(report["features"]) == set(churn.model_feature_names)
    gauges = [s for m in registry.collect() if m.name == "scoring_drift_psi" for s in m.samples]
    assert len(gauges) == len(churn.model_feature_names) + 1  # and the score's


def test_every_fallback_reason_is_exported_at_zero_from_the_start(local_scorer, monkeypatch):
    from typing import get_args

    from configuration.policy import FallbackReason

    _scorer, registry = fresh_scorer(local_scorer, monkeypatch)
    totals = {
        s.labels["reason"]: s.value
        for m in registry.collect()
        for s in m.samples
        if s.name == "scoring_fallbacks_total" and s.labels["arm"] == "champion"
    }
    assert totals == dict.fromkeys(get_args(FallbackReason), 0.0)


def test_numbers_are_converted_as_float_of_each_value_would():
    """drift._numbers (one numpy conversion) against float() of each value, None as NaN, on
    mixed bools, ints, floats, numpy scalars and missing values, as lists and object arrays."""
    from configuration.drift import _numbers

    rng = np.random.default_rng(5)
    pool = [None, True, False, 0, 7, -3, 2.5, float("nan"), np.float32(1.25), np.int64(9), 1e300]
    for _ in range(200):
        values = [pool[i] for i in rng.integers(0, len(pool), rng.integers(0, 60))]
        expected = np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
        for given in (values, np.array(values, dtype=object)):
            got = _numbers(given)
            assert got.dtype == np.float64 and got.shape == expected.shape
            np.testing.assert_array_equal(got, expected)  # NaN == NaN here
    scores = rng.random(50)
    np.testing.assert_array_equal(_numbers(scores), scores)


def test_the_window_bins_each_column_as_bin_values_does(churn):
    """DriftWindow.observe (numeric columns converted together) against bin_values column by
    column, on random rows of the use case with missing values and unknown categories."""
    from configuration.drift import bin_values, feature_reference
    from training.encoder_compiler import random_rows

    reference_rows = churn.matrix(random_rows(churn, 2000, seed=1))
    reference = {
        "features": {
            spec.name: feature_reference(spec, reference_rows[:, j].tolist())
            for j, spec in enumerate(churn.model_features)
        }
    }
    score = numeric_reference(np.linspace(0, 1, 100))
    window = DriftWindow(churn, reference, score, size=10_000)
    rows = random_rows(churn, 3000, seed=2)
    for row in rows[::7]:
        row["region"] = "atlantis"  # not a category of the reference: the missing bin
    matrix, scores = churn.matrix(rows), np.random.default_rng(3).random(3000)
    for chunk in range(0, 3000, 256):
        window.observe(matrix[chunk : chunk + 256], scores[chunk : chunk + 256])
    for j, spec in enumerate(churn.model_features):
        bins = bin_values(reference["features"][spec.name], matrix[:, j])
        expected = np.bincount(bins, minlength=window.counts.shape[1])
        np.testing.assert_array_equal(window.counts[j], expected, err_msg=spec.name)
    expected = np.bincount(bin_values(score, scores), minlength=window.counts.shape[1])
    np.testing.assert_array_equal(window.counts[-1], expected)
