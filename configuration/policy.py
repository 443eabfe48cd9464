"""The decision and fallback policy: which answer a row gets, the model's or a deterministic one.

Serving and batch scoring both call `decide`, so that the two never disagree. A row falls back
when the model could not answer it (`model_error`, `timeout`, `model_not_ready`: decided by the
caller) or answered with less confidence than the use case's `fallback.min_confidence`
(`low_confidence`). Confidence is the model's probability of the label it decided.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from configuration.use_case import RangeSpec, UseCase

if TYPE_CHECKING:
    import pandas as pd

FallbackReason = Literal["low_confidence", "model_error", "timeout", "model_not_ready"]
NO_LABEL = -1


@dataclass(frozen=True)
class Decisions:
    """Per row: the class index answered (NO_LABEL for none), the probabilities answered (NaN
    where the answer has none), the model's confidence (NaN where it did not answer) and the
    fallback reason (None for a model answer)."""

    labels: np.ndarray
    probabilities: np.ndarray
    confidence: np.ndarray
    reasons: np.ndarray

    @property
    def scores(self) -> np.ndarray:
        """The positive class's probability (binary) or the answered label's (multiclass)."""
        n, k = self.probabilities.shape
        if k == 2:
            return self.probabilities[:, 1].copy()
        index = np.where(self.labels == NO_LABEL, 0, self.labels)
        scores = self.probabilities[np.arange(n), index]
        return np.where(self.labels == NO_LABEL, np.nan, scores)


def decide(
    use_case: UseCase,
    probabilities: np.ndarray,
    rows: Callable[[np.ndarray], Sequence[Mapping[str, Any]]] | None = None,
    failed: FallbackReason | None = None,
    frame: pd.DataFrame | None = None,
) -> Decisions:
    """The answers for an (n x k) probability matrix (rows of NaN: the model failed on them).

    Fallback rules read the raw rows: `rows(indices)` gives those at some positions (called only
    when a rule must be evaluated), or `frame` holds them all as columns (rules evaluated column
    by column: the batch job's way). `failed` marks every row as failed for that reason (e.g.
    the whole call timed out)."""
    n = len(probabilities)
    policy = use_case.fallback
    reasons = np.full(n, failed, dtype=object)
    if failed is None:
        reasons[np.isnan(probabilities).any(axis=1)] = "model_error"
    answered = reasons == None  # noqa: E711 (elementwise)
    labels = np.full(n, NO_LABEL, dtype=np.int64)
    confidence = np.full(n, np.nan)
    if answered.any():
        labels[answered] = use_case.labels_for(probabilities[answered])
        confidence[answered] = probabilities[answered, labels[answered]]
    reasons[answered & (confidence < policy.min_confidence)] = "low_confidence"
    out = np.array(probabilities, dtype=np.float64, copy=True)
    fallen = np.flatnonzero(reasons != None)  # noqa: E711 (elementwise)
    if len(fallen):
        classes = use_case.target.classes
        out[fallen] = np.nan
        if policy.strategy == "prior":
            prior = np.array([[policy.prior[c] for c in classes]])
            out[fallen] = prior
            labels[fallen] = use_case.labels_for(prior)[0]
        elif policy.strategy == "rule" and frame is not None:
            labels[fallen] = rule_labels(use_case, frame.iloc[fallen])
        elif policy.strategy == "rule":
            assert rows is not None, "rules need the rows"
            labels[fallen] = [_rule_label(use_case, row) for row in rows(fallen)]
        else:
            labels[fallen] = NO_LABEL
    return Decisions(labels, out, confidence, reasons)


def _rule_label(use_case: UseCase, row: Mapping[str, Any]) -> int:
    policy = use_case.fallback
    label = next((r.label for r in policy.rules if r.matches(dict(row))), policy.default_label)
    return use_case.target.classes.index(str(label))


def rule_labels(use_case: UseCase, frame: pd.DataFrame) -> np.ndarray:
    """`_rule_label` for every row of `frame`, column by column (same first-match semantics:
    a missing value matches only a listed null, and never a range)."""
    import pandas as pd  # the batch job's path; the API worker never comes here

    policy = use_case.fallback
    classes = use_case.target.classes
    labels = np.full(len(frame), classes.index(str(policy.default_label)), dtype=np.int64)
    undecided = np.ones(len(frame), dtype=bool)
    for rule in policy.rules:
        matches = undecided.copy()
        for name, condition in rule.when.items():
            column = frame[name]
            if isinstance(condition, RangeSpec):
                values = np.asarray(
                    pd.to_numeric(column.to_numpy(dtype=object, copy=True), errors="coerce"),
                    dtype=np.float64,
                )
                ok = ~np.isnan(values)
                if condition.min is not None:
                    ok &= values >= condition.min
                if condition.max is not None:
                    ok &= values < condition.max
            else:
                allowed = [v for v in condition if v is not None]
                ok = column.isin(allowed).to_numpy() & column.notna().to_numpy()
                if None in condition:
                    ok |= column.isna().to_numpy()
            matches &= ok
        labels[matches] = classes.index(rule.label)
        undecided &= ~matches
    return labels
