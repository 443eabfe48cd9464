"""A request's answers (`Scored`) and the responses built from them: predictions as plain dicts
(the shape of the contract's `Prediction`) and explanations mapped back to raw features."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from api.routing import Arm, Routing
from configuration import UseCase
from configuration.policy import NO_LABEL, Decisions


@dataclass(frozen=True)
class Scored:
    """A request's answers: the decisions, the routing that gave them, the arm of each row,
    the answering arms' probabilities (NaN where the model did not answer), the rows' feature
    values they were computed from and, in shadow mode when the runners answered, the
    challenger's."""

    decisions: Decisions
    routing: Routing
    arms: list[Arm]
    probabilities: np.ndarray
    inputs: np.ndarray  # the rows' model-feature values (UseCase.matrix)
    shadow: np.ndarray | None = None


def predictions(
    use_case: UseCase, rows: Sequence[dict[str, Any]], decisions: Decisions, arms: Sequence[Arm]
) -> list[dict[str, Any]]:
    """One `Prediction` dict per row, answered by its arm (the contract tests validate them
    against the model)."""
    classes = use_case.target.classes
    probabilities = decisions.probabilities
    has_probabilities = ~np.isnan(probabilities).any(axis=1)
    scores = decisions.scores
    return [
        {
            "key": row.get(use_case.key) if use_case.key else None,
            "label": None if label == NO_LABEL else classes[label],
            "probabilities": dict(zip(classes, p, strict=True)) if known else None,
            "score": score if known else None,
            "confidence": None if confidence != confidence else confidence,  # NaN: no answer
            "source": "model" if reason is None else "fallback",
            "fallback_reason": reason,
            "arm": arm.name,
            "model_version": arm.model_version,
        }
        for row, arm, label, p, known, score, confidence, reason in zip(
            rows,
            arms,
            decisions.labels.tolist(),
            probabilities.tolist(),
            has_probabilities.tolist(),
            scores.tolist(),
            decisions.confidence.tolist(),
            decisions.reasons.tolist(),
            strict=True,
        )
    ]


class Explainer:
    """Per-feature contributions (TreeSHAP for XGBoost, coefficient x value for a linear
    model), summed from encoded columns back to the use case's raw features."""

    def __init__(self, use_case: UseCase, encoded_names: Sequence[str]) -> None:
        self.use_case = use_case
        self.features = use_case.model_feature_names
        sources = use_case.feature_sources(encoded_names)
        self.source_index = np.array([self.features.index(s) for s in sources])

    def explain(
        self, row: dict[str, Any], contributions: np.ndarray, class_index: int, top_k: int
    ) -> dict[str, Any]:
        """`contributions`: (k', d + 1) for one row, the last column the bias; k' is 1 when the
        model has one margin (binary: the positive class's log-odds), else one per class."""
        classes = self.use_case.target.classes
        explained = len(classes) - 1 if len(contributions) == 1 else class_index
        per_column = contributions[0 if len(contributions) == 1 else class_index]
        base, columns = float(per_column[-1]), per_column[:-1]
        per_feature = np.zeros(len(self.features))
        np.add.at(per_feature, self.source_index, columns)
        order = np.argsort(-np.abs(per_feature), kind="stable")
        top, others = order[:top_k], order[top_k:]
        return {
            "explained_class": classes[explained],
            "base_value": base,
            "margin": base + float(per_feature.sum()),
            "contributions": [
                {
                    "feature": self.features[i],
                    "value": row.get(self.features[i]),
                    "contribution": float(per_feature[i]),
                }
                for i in top.tolist()
            ],
            "rest": float(per_feature[others].sum()),
        }
