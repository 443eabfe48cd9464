"""Compile a fitted ColumnTransformer into `runners.encoder.Encoder`, and prove they agree."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from configuration import UseCase
from runners.encoder import Block, Encoder, NumericBlock, OneHotBlock

PARITY_ROWS = 5000


class NotCompilable(ValueError):
    """The transformer holds a step the compiler does not know; serve it with scikit-learn."""


def _numeric(columns: list[str], steps: list[Any]) -> NumericBlock:
    imputer, *rest = steps
    if not isinstance(imputer, SimpleImputer) or imputer.add_indicator:
        raise NotCompilable(f"{columns}: expected a SimpleImputer first, got {imputer!r}")
    center = scale = None
    if rest:
        (scaler,) = rest
        if not isinstance(scaler, StandardScaler):
            raise NotCompilable(f"{columns}: expected a StandardScaler, got {scaler!r}")
        center = np.asarray(scaler.mean_, dtype=np.float64) if scaler.with_mean else None
        scale = np.asarray(scaler.scale_, dtype=np.float64) if scaler.with_std else None
    fill = np.asarray(imputer.statistics_, dtype=np.float64)
    return NumericBlock(tuple(columns), fill, center, scale)


def _onehot(columns: list[str], encoder: OneHotEncoder) -> OneHotBlock:
    if encoder.handle_unknown != "ignore" or encoder.drop is not None:
        raise NotCompilable(f"{columns}: one-hot must ignore unknowns and drop nothing")
    if getattr(encoder, "min_frequency", None) or getattr(encoder, "max_categories", None):
        raise NotCompilable(f"{columns}: infrequent-category grouping is not compiled")
    categories = tuple(tuple(str(v) for v in values) for values in encoder.categories_)
    return OneHotBlock(tuple(columns), categories)


def compile_encoder(
    transformer: ColumnTransformer, input_columns: list[str], feature_names: list[str]
) -> Encoder:
    """Read the fitted parameters out of `transformer` (the shape `training.pipeline` builds)."""
    if transformer.remainder != "drop":
        raise NotCompilable("remainder columns are passed through")
    blocks: list[Block] = []
    for _, step, columns in transformer.transformers_:
        if step == "drop" or len(columns) == 0:
            continue
        columns = list(columns)
        steps = [s for _, s in step.steps] if isinstance(step, Pipeline) else [step]
        if isinstance(steps[-1], OneHotEncoder) and len(steps) == 1:
            blocks.append(_onehot(columns, steps[0]))
        elif all(isinstance(s, SimpleImputer | StandardScaler) for s in steps):
            blocks.append(_numeric(columns, steps))
        else:
            raise NotCompilable(f"{columns}: unsupported steps {steps!r}")
    return Encoder(tuple(input_columns), tuple(blocks), tuple(feature_names))


def random_rows(use_case: UseCase, n_rows: int, seed: int) -> list[dict[str, Any]]:
    """Rows that satisfy the contract, with missing values where allowed and edge values."""
    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = [{} for _ in range(n_rows)]
    for spec in use_case.model_features:
        if spec.type == "numeric":
            assert spec.min is not None and spec.max is not None
            values: list[Any] = rng.uniform(spec.min, spec.max, n_rows).tolist()
            values[: min(2, n_rows)] = [spec.min, spec.max][: min(2, n_rows)]
        elif spec.type == "boolean":
            values = (rng.random(n_rows) < 0.5).tolist()
        else:
            values = rng.choice(list(spec.categories), n_rows).tolist()
        if spec.nullable:
            values = [
                None if m else v for v, m in zip(values, rng.random(n_rows) < 0.2, strict=True)
            ]
        for row, value in zip(rows, values, strict=True):
            row[spec.name] = value
    return rows


def check_parity(
    use_case: UseCase, transformer: ColumnTransformer, encoder: Encoder, n_rows: int = PARITY_ROWS
) -> None:
    """Raise NotCompilable unless the encoder reproduces the transformer exactly."""
    rows = [dict(e) for e in use_case.examples] + random_rows(use_case, n_rows, seed=0)
    expected = np.asarray(transformer.transform(use_case.frame(rows)), dtype=np.float64)
    got = encoder.encode(use_case.matrix(rows))
    if got.shape != expected.shape or not np.array_equal(got, expected):
        bad = int((got != expected).any(axis=1).sum()) if got.shape == expected.shape else "all"
        raise NotCompilable(f"compiled encoder differs from the transformer on {bad} rows")
