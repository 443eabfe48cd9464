"""Use cases declared in YAML, loaded into a typed schema that training and serving share."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cached_property, lru_cache
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from configuration.digests import sha256_of

if TYPE_CHECKING:
    import pandas as pd

FeatureType = Literal["numeric", "categorical", "boolean", "text"]
IDENTIFIER = r"^[A-Za-z_][A-Za-z0-9_]*$"
GATE_DIRECTIONS = {"roc_auc": "min", "accuracy": "min", "log_loss": "max"}


def registered_name(use_case: str, component: str) -> str:
    """One model name across MLflow and BentoML: <use-case>-<component>."""
    return f"{use_case.replace('_', '-')}-{component}"


class UseCaseError(ValueError):
    """A use case file, or data checked against it, is not valid."""


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FeatureSpec(_Spec):
    """One input column: its type, bounds or categories, and whether it is personal data."""

    name: str = Field(pattern=IDENTIFIER)
    type: FeatureType
    description: str = Field(min_length=1)
    min: float | None = None
    max: float | None = None
    categories: tuple[str, ...] = ()
    nullable: bool = False
    pii: bool = False
    max_length: int = Field(256, gt=0)

    @model_validator(mode="after")
    def _check_type_fields(self) -> FeatureSpec:
        if self.type == "numeric":
            if self.min is None or self.max is None:
                raise ValueError(f"numeric feature {self.name!r} needs finite min and max")
            if not (math.isfinite(self.min) and math.isfinite(self.max) and self.min <= self.max):
                raise ValueError(f"feature {self.name!r}: bounds must be finite with min <= max")
        elif self.min is not None or self.max is not None:
            raise ValueError(f"feature {self.name!r}: min/max apply to numeric features only")
        if self.type == "categorical":
            if len(self.categories) < 1 or len(set(self.categories)) != len(self.categories):
                raise ValueError(f"categorical feature {self.name!r} needs unique categories")
        elif self.categories:
            raise ValueError(f"feature {self.name!r}: categories apply to categorical only")
        return self

    @property
    def is_model_input(self) -> bool:
        """Personal data and free text never reach the model."""
        return not self.pii and self.type != "text"


class TargetSpec(_Spec):
    name: str = Field(pattern=IDENTIFIER)
    classes: tuple[str, ...] = Field(min_length=2)
    description: str = ""


class GateSpec(_Spec):
    """A metric on held-out data that must hold before a model can become champion."""

    min: float | None = None
    max: float | None = None


class RangeSpec(_Spec):
    """A numeric condition: min <= value < max (either bound may be left out)."""

    min: float | None = None
    max: float | None = None


class RuleSpec(_Spec):
    """A fallback rule: when every condition holds, answer `label`. A condition is a list of
    allowed values (null matches a missing value) or a numeric range."""

    when: dict[str, tuple[str | float | bool | None, ...] | RangeSpec] = Field(min_length=1)
    label: str

    def matches(self, row: dict[str, Any]) -> bool:
        for name, condition in self.when.items():
            value = row.get(name)
            if isinstance(value, float) and math.isnan(value):
                value = None
            if isinstance(condition, RangeSpec):
                if value is None or isinstance(value, str):
                    return False
                if condition.min is not None and value < condition.min:
                    return False
                if condition.max is not None and value >= condition.max:
                    return False
            elif value not in condition:
                return False
        return True


class FallbackSpec(_Spec):
    """The deterministic answer given instead of the model's: below `min_confidence`, and when
    the model errors, misses its deadline or is not ready.

    strategies: `prior` answers the declared class prior; `rule` answers the first matching
    rule's label (else `default_label`); `no_decision` answers no label at all."""

    min_confidence: float = Field(
        0.0, ge=0, le=1, description="Model answers less confident than this fall back (0: never)."
    )
    strategy: Literal["prior", "rule", "no_decision"] = "no_decision"
    prior: dict[str, float] = Field(default_factory=dict)
    rules: tuple[RuleSpec, ...] = ()
    default_label: str | None = None


class DataSpec(_Spec):
    """Where training data comes from: a generator, a bundled scikit-learn dataset, or a file."""

    source: str = Field(
        description="'generator:<name>', 'sklearn:<name>', or a CSV/Parquet path "
        "(relative paths are resolved against the use case file)."
    )


class UseCase(_Spec):
    """A tabular classification use case: the contract of its API and how its models are built."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    description: str
    task: Literal["binary", "multiclass"]
    contract_version: int = Field(1, ge=1)
    key: str | None = Field(None, description="Identifier column echoed in responses.")
    target: TargetSpec
    features: tuple[FeatureSpec, ...] = Field(min_length=1)
    data: DataSpec
    decision_threshold: float = Field(0.5, gt=0, lt=1)
    fallback: FallbackSpec = Field(default_factory=FallbackSpec)
    gates: dict[str, GateSpec] = Field(default_factory=dict)
    examples: tuple[dict[str, Any], ...] = Field(default=(), description="Valid request rows.")
    source_sha256: str = ""

    @field_validator("features")
    @classmethod
    def _unique_names(cls, features: tuple[FeatureSpec, ...]) -> tuple[FeatureSpec, ...]:
        names = [f.name for f in features]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate feature names: {dupes}")
        if not any(f.is_model_input for f in features):
            raise ValueError("at least one feature must be a model input")
        return features

    @field_validator("gates")
    @classmethod
    def _known_gates(cls, gates: dict[str, GateSpec]) -> dict[str, GateSpec]:
        unknown = sorted(set(gates) - set(GATE_DIRECTIONS))
        if unknown:
            raise ValueError(f"unknown gate metrics {unknown}; known: {sorted(GATE_DIRECTIONS)}")
        return gates

    @model_validator(mode="after")
    def _check_references(self) -> UseCase:
        names = {f.name for f in self.features}
        if self.key is not None and self.key not in names:
            raise ValueError(f"key {self.key!r} is not a declared feature")
        if self.target.name in names:
            raise ValueError(f"target {self.target.name!r} must not also be a feature")
        if self.task == "binary" and len(self.target.classes) != 2:
            raise ValueError("a binary task needs exactly two classes")
        self._check_fallback(names)
        return self

    def _check_fallback(self, names: set[str]) -> None:
        fallback, classes = self.fallback, set(self.target.classes)
        if fallback.strategy == "prior":
            if set(fallback.prior) != classes:
                raise ValueError(f"fallback.prior needs a probability per class {sorted(classes)}")
            if abs(sum(fallback.prior.values()) - 1) > 1e-6 or min(fallback.prior.values()) < 0:
                raise ValueError("fallback.prior must be probabilities summing to 1")
        if fallback.strategy == "rule" and fallback.default_label is None:
            raise ValueError("fallback strategy 'rule' needs a default_label")
        labels = [r.label for r in fallback.rules]
        if fallback.default_label is not None:
            labels.append(fallback.default_label)
        unknown_labels = sorted(set(labels) - classes)
        if unknown_labels:
            raise ValueError(f"fallback labels {unknown_labels} are not classes {sorted(classes)}")
        unknown = sorted({n for r in fallback.rules for n in r.when} - names)
        if unknown:
            raise ValueError(f"fallback rules name unknown features {unknown}")

    # ---- derived views -------------------------------------------------------------------
    @cached_property
    def model_features(self) -> tuple[FeatureSpec, ...]:
        """Features that the model sees, in the order the preprocessing expects them."""
        return tuple(f for f in self.features if f.is_model_input)

    @property
    def model_feature_names(self) -> list[str]:
        return [f.name for f in self.model_features]

    @property
    def pii_names(self) -> list[str]:
        return [f.name for f in self.features if f.pii]

    @property
    def positive_class(self) -> str:
        return self.target.classes[-1]

    def registered_name(self, component: str) -> str:
        return registered_name(self.name, component)

    def feature_sources(self, encoded_names: Sequence[str]) -> list[str]:
        """The raw feature each encoded column comes from ("categorical__plan_tier_basic" ->
        "plan_tier"), from the fitted transformer's output names: its "<step>__" prefix dropped,
        then the longest model feature that the rest equals or starts with (plus "_")."""
        by_length = sorted(self.model_feature_names, key=len, reverse=True)
        sources = []
        for encoded in encoded_names:
            rest = encoded.split("__", 1)[-1]
            source = next((f for f in by_length if rest == f or rest.startswith(f"{f}_")), None)
            if source is None:
                raise UseCaseError(f"encoded column {encoded!r} matches no model feature")
            sources.append(source)
        return sources

    def labels_for(self, probabilities: np.ndarray) -> np.ndarray:
        """Class indices from an (n x k) probability matrix: the decision threshold on the
        positive class for binary tasks, the most probable class otherwise."""
        if self.task == "binary":
            return (probabilities[:, 1] >= self.decision_threshold).astype(np.int64)
        return probabilities.argmax(axis=1)

    # ---- shared coercion: the only ways raw rows become model input --------------------------
    def matrix(self, rows: Sequence[dict[str, Any]]) -> np.ndarray:
        """Model-input values as an object matrix (n x model features, in the order of
        `model_feature_names`; None where missing): the compact form rows travel in between
        the API and the preprocessor (a list of dicts costs a validation walk on both sides)."""
        names = self.model_feature_names
        out = np.empty((len(rows), len(names)), dtype=object)
        if rows:
            try:  # validated rows hold every field: one C-level getter per row
                out[:] = list(map(self._feature_getter, rows))
            except KeyError:  # rows with fields left out (examples, tests): missing is None
                out[:] = [[row.get(name) for name in names] for row in rows]
        return out

    @cached_property
    def _feature_getter(self) -> Any:
        names = self.model_feature_names
        getter = itemgetter(*names)
        return getter if len(names) > 1 else lambda row: (row[names[0]],)

    def frame(self, rows: pd.DataFrame | np.ndarray | Sequence[dict[str, Any]]) -> pd.DataFrame:
        """Model-input columns with fixed dtypes: numeric and boolean as float64 (NaN when
        missing), categorical as object (NaN when missing). Training and serving both call this."""
        import pandas as pd  # only the preprocessing worker and training need pandas

        if isinstance(rows, pd.DataFrame):
            raw = rows
        elif isinstance(rows, np.ndarray):
            raw = pd.DataFrame(rows, columns=self.model_feature_names)
        else:
            raw = pd.DataFrame.from_records(list(rows))
        columns: dict[str, Any] = {}
        for spec in self.model_features:
            values = raw[spec.name] if spec.name in raw else pd.Series([None] * len(raw))
            if spec.type == "categorical":
                labels = values.astype(object).to_numpy(copy=True)
                labels[pd.isna(labels)] = np.nan
                columns[spec.name] = labels
            else:
                numbers = pd.to_numeric(values.astype(object), errors="raise")
                columns[spec.name] = numbers.astype("float64").to_numpy()
        return pd.DataFrame(columns, index=range(len(raw)))


@lru_cache(maxsize=16)
def load_use_case(path: Path) -> UseCase:
    """Read and validate a use case YAML file; errors name the file and the offending field."""
    path = Path(path)
    if not path.is_file():
        available = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise UseCaseError(f"use case file {path} not found; available: {available}")
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(raw, dict):
        raise UseCaseError(f"{path}: expected a mapping at the top level")
    raw["source_sha256"] = sha256_of(path)
    try:
        use_case = UseCase.model_validate(raw)
    except ValueError as exc:
        raise UseCaseError(f"{path}: {exc}") from exc
    if use_case.name != path.stem:
        raise UseCaseError(f"{path}: name {use_case.name!r} must match the file name")
    return use_case
