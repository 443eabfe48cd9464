"""Drift: reference statistics saved with a model at training, and the population stability
index (PSI) of a sliding window of recent rows against them.

Numeric and boolean features are binned at the training data's deciles (plus a bin for missing
values), categorical ones by category (plus missing); the score by the held-out scores' deciles.
PSI = sum((actual - expected) * ln(actual / expected)) over the bins, proportions floored at
`EPSILON`. Common reading: below 0.1 stable, 0.1-0.25 a moderate shift, above 0.25 a shift.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from configuration.use_case import FeatureSpec, UseCase

EPSILON = 1e-4
SCORE = "__score__"


def _numbers(values: Sequence[Any] | np.ndarray) -> np.ndarray:
    """float64 of each value (bool, int, float), NaN for None: numpy's cast from object does
    float() of each value and takes None as NaN, in one call."""
    array = np.asarray(values, dtype=object) if not isinstance(values, np.ndarray) else values
    return array.astype(np.float64)


def _bin_numbers(reference: dict[str, Any], numbers: np.ndarray) -> np.ndarray:
    bins = np.searchsorted(np.asarray(reference["edges"]), numbers, side="right")
    return np.where(np.isnan(numbers), len(reference["edges"]) + 1, bins)


def bin_values(reference: dict[str, Any], values: Sequence[Any] | np.ndarray) -> np.ndarray:
    """The bin of each value (the last bin: missing)."""
    if "edges" in reference:
        return _bin_numbers(reference, _numbers(values))
    index = {c: i for i, c in enumerate(reference["categories"])}
    missing = len(reference["categories"])
    return np.array([index.get(v, missing) if v is not None else missing for v in values])


def _proportions(bins: np.ndarray, n_bins: int) -> list[float]:
    counts = np.bincount(bins, minlength=n_bins).astype(np.float64)
    return (counts / max(counts.sum(), 1.0)).tolist()


def numeric_reference(values: Sequence[Any] | np.ndarray) -> dict[str, Any]:
    numbers = _numbers(values)
    present = numbers[~np.isnan(numbers)]
    edges: Any = np.unique(np.quantile(present, np.linspace(0.1, 0.9, 9))) if len(present) else []
    reference: dict[str, Any] = {"edges": [float(e) for e in edges]}
    reference["proportions"] = _proportions(bin_values(reference, numbers), len(edges) + 2)
    return reference


def feature_reference(spec: FeatureSpec, values: Sequence[Any] | np.ndarray) -> dict[str, Any]:
    if spec.type == "categorical":
        reference: dict[str, Any] = {"categories": list(spec.categories)}
        bins = bin_values(reference, [None if v != v else v for v in values])  # NaN: missing
        reference["proportions"] = _proportions(bins, len(spec.categories) + 1)
        return reference
    return numeric_reference(values)


def reference_statistics(
    use_case: UseCase, frame: Any, scores: dict[str, np.ndarray]
) -> dict[str, Any]:
    """Per model feature of `frame` (typed by `UseCase.frame`), and per model flavor's scores."""
    return {
        "features": {
            spec.name: feature_reference(spec, frame[spec.name].tolist())
            for spec in use_case.model_features
        },
        "scores": {flavor: numeric_reference(values) for flavor, values in scores.items()},
    }


def psi(expected: Sequence[float], counts: np.ndarray) -> float:
    actual = counts / max(counts.sum(), 1.0)
    e = np.maximum(np.asarray(expected, dtype=np.float64), EPSILON)
    a = np.maximum(actual, EPSILON)
    return float(((a - e) * np.log(a / e)).sum())


class DriftWindow:
    """Bin counts of the last `size` rows the model answered, per feature and for the score."""

    def __init__(
        self, use_case: UseCase, reference: dict[str, Any], score: dict[str, Any], size: int
    ) -> None:
        self.names = [*use_case.model_feature_names, SCORE]
        self.references = [reference["features"][n] for n in use_case.model_feature_names]
        self.references.append(score)
        features = range(len(self.references) - 1)
        self.numeric = [j for j in features if "edges" in self.references[j]]
        self.categorical = [j for j in features if "edges" not in self.references[j]]
        widths = [len(r["proportions"]) for r in self.references]
        self.counts = np.zeros((len(self.names), max(widths)), dtype=np.int64)
        self.bins = np.zeros((size, len(self.names)), dtype=np.int64)
        self.size = size
        self.rows = 0  # rows seen in all; the window holds min(rows, size)
        self.columns = np.arange(len(self.names))
        # what binning needs, worked out once: each numeric column's edges and missing bin,
        # each categorical column's bin by value (None: the missing bin)
        self.edges = [np.asarray(self.references[j]["edges"], np.float64) for j in self.numeric]
        self.missing = np.array([len(edges) + 1 for edges in self.edges], dtype=np.int64)
        self.category_bins = {
            j: {
                **{c: i for i, c in enumerate(self.references[j]["categories"])},
                None: len(self.references[j]["categories"]),
            }
            for j in self.categorical
        }

    def observe(self, matrix: np.ndarray, scores: np.ndarray) -> None:
        """`matrix`: model-feature values (n x features, object, as `UseCase.matrix`)."""
        n = len(scores)
        if n == 0:
            return
        if n > self.size:
            matrix, scores, n = matrix[-self.size :], scores[-self.size :], self.size
        new = np.empty((n, len(self.names)), dtype=np.int64)
        if self.numeric:  # the numeric columns converted in one call, missing ones binned at once
            numbers = _numbers(matrix[:, self.numeric])  # None is NaN
            bins = np.empty(numbers.shape, dtype=np.int64)
            for k, edges in enumerate(self.edges):
                bins[:, k] = np.searchsorted(edges, numbers[:, k], side="right")
            new[:, self.numeric] = np.where(np.isnan(numbers), self.missing, bins)
        for j, index in self.category_bins.items():
            try:  # validated rows hold a category or None: a dict lookup each, in C
                new[:, j] = np.fromiter(map(index.__getitem__, matrix[:, j]), np.int64, n)
            except (KeyError, TypeError):  # a value outside the categories: the missing bin
                new[:, j] = bin_values(self.references[j], matrix[:, j])
        new[:, -1] = bin_values(self.references[-1], scores)
        positions = self.rows + np.arange(n)
        slots = positions % self.size
        evicted = self.bins[slots[positions >= self.size]]  # the rows these overwrite
        self.counts -= self._tally(evicted)
        self.bins[slots] = new
        self.counts += self._tally(new)
        self.rows += n

    def _tally(self, bins: np.ndarray) -> np.ndarray:
        """Counts (features x bins) of a block of bins: one bincount over (feature, bin) codes
        (ufunc.at, the obvious way, is an order of magnitude slower)."""
        width = self.counts.shape[1]
        codes = (self.columns * width + bins).ravel()
        return np.bincount(codes, minlength=self.counts.size).reshape(self.counts.shape)

    @property
    def window_rows(self) -> int:
        return min(self.rows, self.size)

    def values(self) -> dict[str, float]:
        """PSI per feature and for the score (key `__score__`)."""
        return {
            name: psi(reference["proportions"], self.counts[j, : len(reference["proportions"])])
            for j, (name, reference) in enumerate(zip(self.names, self.references, strict=True))
        }
