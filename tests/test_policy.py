"""Decision and fallback policy, timeouts, explanations and readiness (in process)."""

from __future__ import annotations

import asyncio
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
from bentoml.exceptions import ServiceUnavailable

import service
from api.coalescing import Coalescer
from api.scorer import Scorer
from configuration import UseCaseError
from configuration.policy import decide
from configuration.use_case import FallbackSpec
from training.data import generate_churn

PREDICT, BATCH, EXPLAIN = "/v1/predict", "/v1/predict_batch", "/v1/explain"


@pytest.fixture
def client(api_client):
    return api_client


@pytest.fixture(scope="module")
def rows(churn) -> list[dict]:
    """Rows of the demo's distribution, valid for the contract."""
    frame = generate_churn(300, seed=7).drop(columns=[churn.target.name])
    records = frame.astype(object).where(frame.notna(), None).to_dict("records")
    return [{k: v for k, v in r.items() if k in {f.name for f in churn.features}} for r in records]


def fallback_count(reason: str) -> float:
    """The in-process value of `scoring_fallbacks_total{reason}` (in process, BentoML serves no
    /metrics; the end-to-end tests read it from a real server)."""
    from prometheus_client import REGISTRY

    return sum(
        sample.value
        for family in REGISTRY.collect()
        for sample in family.samples
        if sample.name == "scoring_fallbacks_total" and sample.labels.get("reason") == reason
    )


def rule_label(churn, row: dict) -> str:
    """The churn use case's fallback rules, written out independently of RuleSpec."""
    month_to_month = row["contract_type"] == "month_to_month"
    if month_to_month and (row["support_tickets_90d"] >= 3 or row["late_payments_12m"] >= 2):
        return "churned"
    return "stayed"


def failing_coalescer(monkeypatch, exception: BaseException | None = None, delay: float = 0):
    """Make every runner call of the in-process service fail (or stall)."""

    async def call(self, rows):
        await asyncio.sleep(delay)
        if exception is not None:
            raise exception
        return np.full((len(rows), 2), 0.5)

    monkeypatch.setattr(Coalescer, "__call__", call)


class TestPolicy:
    def test_confident_rows_are_model_answers_and_unsure_ones_fall_back_to_the_rules(
        self, client, churn, rows
    ):
        body = client.post(BATCH, json={"instances": rows}).json()
        assert body["errors"] == []
        answers = body["predictions"]
        fallen = [(r, a) for r, a in zip(rows, answers, strict=True) if a["source"] == "fallback"]
        model = [a for a in answers if a["source"] == "model"]
        assert fallen and model  # the demo's data has both
        for answer in model:
            assert answer["fallback_reason"] is None
            assert answer["confidence"] >= 0.55
            assert answer["confidence"] == max(answer["probabilities"].values())
        for row, answer in fallen:
            assert answer["fallback_reason"] == "low_confidence"
            assert answer["confidence"] < 0.55
            assert answer["label"] == rule_label(churn, row)
            assert answer["probabilities"] is None and answer["score"] is None

    @pytest.mark.parametrize(
        ("exception", "reason"),
        [
            (RuntimeError("boom"), "model_error"),
            (ServiceUnavailable("down"), "model_not_ready"),
            (ConnectionRefusedError(), "model_not_ready"),
        ],
    )
    def test_a_runner_failure_is_answered_by_the_fallback_and_counted(
        self, client, churn, rows, monkeypatch, exception, reason
    ):
        before = fallback_count(reason)
        failing_coalescer(monkeypatch, exception)
        response = client.post(PREDICT, json={"instance": rows[0]})
        assert response.status_code == 200
        answer = response.json()["prediction"]
        assert answer["source"] == "fallback" and answer["fallback_reason"] == reason
        assert answer["label"] == rule_label(churn, rows[0]) and answer["confidence"] is None
        batch = client.post(BATCH, json={"instances": rows[:10]}).json()
        assert [a["fallback_reason"] for a in batch["predictions"]] == [reason] * 10
        assert fallback_count(reason) == before + 11

    def test_a_missed_deadline_is_answered_at_the_deadline(self, client, rows, monkeypatch):
        monkeypatch.setattr(Scorer, "deadline_s", property(lambda self: 0.1))
        failing_coalescer(monkeypatch, delay=5)
        response = client.post(PREDICT, json={"instance": rows[0]})
        assert response.json()["prediction"]["fallback_reason"] == "timeout"
        assert response.elapsed.total_seconds() < 2

    def test_a_row_the_model_fails_on_falls_back_alone(self, churn, rows):
        probabilities = np.array([[0.9, 0.1], [np.nan, np.nan], [0.2, 0.8]])
        decisions = decide(churn, probabilities, lambda index: [rows[i] for i in index])
        assert decisions.reasons.tolist() == [None, "model_error", None]
        assert decisions.labels.tolist() == [
            0,
            churn.target.classes.index(rule_label(churn, rows[1])),
            1,
        ]

    @pytest.mark.parametrize("strategy", ["prior", "no_decision"])
    def test_other_strategies(self, churn, rows, strategy):
        fallback = FallbackSpec(
            min_confidence=0.7, strategy=strategy, prior={"stayed": 0.7, "churned": 0.3}
        )
        use_case = churn.model_copy(update={"fallback": fallback})
        probabilities = np.array([[0.9, 0.1], [0.4, 0.6]])
        decisions = decide(use_case, probabilities, lambda index: [rows[i] for i in index])
        assert decisions.reasons.tolist() == [None, "low_confidence"]
        if strategy == "prior":
            assert decisions.labels.tolist() == [0, 0]
            np.testing.assert_array_equal(decisions.probabilities[1], [0.7, 0.3])
        else:
            assert decisions.labels.tolist() == [0, -1]
            assert np.isnan(decisions.probabilities[1]).all() and np.isnan(decisions.scores[1])

    @pytest.mark.parametrize(
        ("fallback", "message"),
        [
            ({"strategy": "prior", "prior": {"stayed": 0.5}}, "a probability per class"),
            ({"strategy": "prior", "prior": {"stayed": 0.5, "churned": 0.6}}, "summing to 1"),
            ({"strategy": "rule"}, "needs a default_label"),
            ({"strategy": "rule", "default_label": "maybe"}, "not classes"),
            (
                {
                    "strategy": "rule",
                    "default_label": "stayed",
                    "rules": [{"when": {"shoe_size": [1]}, "label": "churned"}],
                },
                "unknown features ['shoe_size']",
            ),
        ],
    )
    def test_a_broken_fallback_is_refused_when_the_use_case_loads(
        self, churn, tmp_path, fallback, message
    ):
        import yaml

        from configuration import load_use_case

        raw = churn.model_dump(mode="json", exclude={"source_sha256"})
        raw["fallback"] = fallback
        path = tmp_path / "churn.yaml"
        path.write_text(yaml.safe_dump(raw))
        with pytest.raises(UseCaseError, match=re.escape(message)):
            load_use_case(path)


class TestExplain:
    def confident_row(self, client, rows) -> dict:
        for row in rows:
            if (
                client.post(PREDICT, json={"instance": row}).json()["prediction"]["source"]
                == "model"
            ):
                return row
        pytest.fail("no confident row")

    def test_contributions_and_base_reproduce_the_models_probability(self, client, churn, rows):
        row = self.confident_row(client, rows)
        n_features = len(churn.model_feature_names)
        body = client.post(EXPLAIN, json={"instance": row, "top_k": n_features}).json()
        explanation = body["explanation"]
        assert body["explanation_status"] == "ok"
        assert explanation["explained_class"] == "churned"
        # one entry per raw model feature: one-hot columns summed back, no PII or key
        assert sorted(c["feature"] for c in explanation["contributions"]) == sorted(
            churn.model_feature_names
        )
        total = explanation["base_value"] + sum(
            c["contribution"] for c in explanation["contributions"]
        )
        assert explanation["rest"] == 0
        assert total == pytest.approx(explanation["margin"], abs=1e-9)
        # the margin (TreeSHAP) against the probability (inplace_predict): two computations
        probability = body["prediction"]["probabilities"]["churned"]
        assert 1 / (1 + math.exp(-explanation["margin"])) == pytest.approx(probability, abs=1e-5)
        for item in explanation["contributions"]:
            assert item["value"] == row[item["feature"]]

    def test_top_k_is_sorted_and_the_rest_keeps_the_sum(self, client, rows):
        row = self.confident_row(client, rows)
        explanation = client.post(EXPLAIN, json={"instance": row, "top_k": 3}).json()["explanation"]
        sizes = [abs(c["contribution"]) for c in explanation["contributions"]]
        assert len(sizes) == 3 and sizes == sorted(sizes, reverse=True)
        listed = sum(c["contribution"] for c in explanation["contributions"])
        assert explanation["base_value"] + listed + explanation["rest"] == pytest.approx(
            explanation["margin"], abs=1e-9
        )

    def test_top_k_is_bounded(self, client, rows):
        response = client.post(EXPLAIN, json={"instance": rows[0], "top_k": 0})
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "invalid_input"

    def test_predict_explains_on_request_only(self, client, rows):
        row = self.confident_row(client, rows)
        plain = client.post(PREDICT, json={"instance": row}).json()
        assert plain["explanation"] is None and plain["explanation_status"] is None
        explained = client.post(PREDICT, json={"instance": row, "explain": True}).json()
        assert explained["explanation_status"] == "ok"
        assert explained["prediction"] == plain["prediction"]
        assert len(explained["explanation"]["contributions"]) == 5

    def test_an_explanation_over_budget_is_dropped_and_the_prediction_stands(
        self, client, rows, monkeypatch
    ):
        async def slow(self, *args):
            await asyncio.sleep(5)

        monkeypatch.setattr(Scorer, "explain", slow)
        tight = service.SETTINGS.model_copy(update={"explain_budget_ms": 50})
        monkeypatch.setattr(service, "SETTINGS", tight)
        response = client.post(PREDICT, json={"instance": rows[0], "explain": True})
        body = response.json()
        assert response.status_code == 200 and response.elapsed.total_seconds() < 2
        assert body["explanation"] is None and body["explanation_status"] == "timeout"
        assert body["prediction"]["label"] in ("stayed", "churned")

    def test_explain_without_a_model_answer_is_503(self, client, rows, monkeypatch):
        failing_coalescer(monkeypatch, RuntimeError("boom"))
        response = client.post(EXPLAIN, json={"instance": rows[0]})
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "unavailable"

    def test_linear_contributions_reproduce_the_decision_function(self, demo_models, churn, rows):
        from runners.preprocessor import load_encoder
        from runners.sklearn_runner import linear_contributions, load_estimator

        estimator = load_estimator(demo_models["sklearn"])
        encode = load_encoder(demo_models["preprocessor"], churn)
        features = encode(churn.matrix(rows[:50]))
        contributions = linear_contributions(estimator, features)
        np.testing.assert_allclose(
            contributions.sum(axis=2)[:, 0], estimator.decision_function(features), atol=1e-9
        )


class TestReadiness:
    def unready(self, warm_result, settings=None):
        """A Scoring instance whose scorer's warm-up answers `warm_result`."""
        from api.background import Background

        async def warm(routing):
            return warm_result

        instance = service.Scoring.inner.__new__(service.Scoring.inner)
        scorer = SimpleNamespace(warm=warm, routing=None)
        instance.background = Background(settings or service.SETTINGS, scorer)  # type: ignore[arg-type]
        instance.runner_probe = SimpleNamespace(ready=True)  # every runner answers
        instance.draining = lambda: False
        return instance

    def test_the_started_service_is_ready(self, client):
        assert client.get("/readyz").status_code == 200

    def test_a_warm_up_that_never_passes_keeps_the_service_unready(self):
        settings = service.SETTINGS.model_copy(update={"warmup_timeout_s": 1.0})
        instance = self.unready("model broken", settings)
        asyncio.run(instance.background.warm_up())
        assert instance.__is_ready__() is False

    def test_a_warm_up_passes_once_the_model_answers(self):
        instance = self.unready(None)
        assert instance.__is_ready__() is False  # not before the warm-up ran
        asyncio.run(instance.background.warm_up())
        assert instance.__is_ready__() is True

    @pytest.mark.parametrize(("exception", "passes"), [(None, True), (RuntimeError("x"), False)])
    def test_the_warm_up_scores_the_examples_through_the_runners(
        self, local_scorer, monkeypatch, exception, passes
    ):
        if exception is not None:
            failing_coalescer(monkeypatch, exception)
        problem = asyncio.run(local_scorer.warm(local_scorer.routing))
        assert (problem is None) is passes


def test_unknown_encoded_columns_are_refused(churn):
    with pytest.raises(UseCaseError, match="matches no model feature"):
        churn.feature_sources(["numeric__shoe_size"])
    assert churn.feature_sources(["numeric__age", "categorical__plan_tier_basic"]) == [
        "age",
        "plan_tier",
    ]


JSON = {"content-type": "application/json"}


class TestLimits:
    """ContractMiddleware's concurrency limit (429) and request timeout (504), on a tiny app."""

    def app(self, delay: float, **limits):
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        from api.errors import ContractMiddleware

        async def slow(request):
            await asyncio.sleep(delay)
            return JSONResponse({"ok": True})

        options = {"max_concurrency": 100, "timeout_s": 10.0, **limits}
        return ContractMiddleware(
            Starlette(routes=[Route("/v1/slow", slow, methods=["POST"])]),
            prefix="/v1",
            max_body_bytes=1000,
            contract_version=3,
            **options,
        )

    def test_a_request_over_the_timeout_is_504_in_the_error_shape(self):
        from starlette.testclient import TestClient

        with TestClient(self.app(delay=5, timeout_s=0.1)) as client:
            response = client.post("/v1/slow", json={})
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "timeout"
        assert response.json()["contract_version"] == 3
        assert response.elapsed.total_seconds() < 2

    def test_requests_over_the_concurrency_limit_are_429(self):
        import httpx

        async def burst():
            transport = httpx.ASGITransport(app=self.app(delay=0.2, max_concurrency=2))
            async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
                return await asyncio.gather(*(client.post("/v1/slow", json={}) for _ in range(6)))

        responses = asyncio.run(burst())
        assert sorted(r.status_code for r in responses) == [200, 200, 429, 429, 429, 429]
        refused = next(r for r in responses if r.status_code == 429).json()
        assert refused["error"]["code"] == "too_many_requests"
        assert refused["contract_version"] == 3

    def test_a_body_over_the_limit_is_413(self):
        from starlette.testclient import TestClient

        with TestClient(self.app(delay=0)) as client:
            response = client.post("/v1/slow", content=b"x" * 2000)
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "payload_too_large"

    def test_a_route_can_have_its_own_body_limit(self):
        from starlette.testclient import TestClient

        from api.errors import ContractMiddleware

        app = self.app(delay=0)
        limited = ContractMiddleware(
            app.app,
            prefix="/v1",
            max_body_bytes=1000,
            contract_version=3,
            max_concurrency=10,
            timeout_s=10,
            body_limits={"/v1/slow": 5000},
        )
        with TestClient(limited) as client:
            assert client.post("/v1/slow", content=b"1" * 2000, headers=JSON).status_code == 200
            assert client.post("/v1/slow", content=b"1" * 6000, headers=JSON).status_code == 413


def test_rules_on_columns_match_rules_row_by_row(churn, rows):
    """The batch job's column-wise rules give the labels the service's row-wise rules give,
    missing values and every rule included."""
    import pandas as pd

    from configuration.policy import _rule_label, rule_labels

    variants = []
    for i, row in enumerate(rows):
        variant = dict(row)
        if i % 3 == 0:
            variant["contract_type"] = "month_to_month"
        if i % 5 == 0:
            variant["support_tickets_90d"] = 3.0
        if i % 7 == 0:
            variant["late_payments_12m"] = None
        variants.append(variant)
    expected = [_rule_label(churn, row) for row in variants]
    assert set(expected) == {0, 1}
    assert rule_labels(churn, pd.DataFrame(variants)).tolist() == expected
