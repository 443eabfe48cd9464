"""Unit tests: use case loading, the generated contract, and the shared frame coercion."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from pydantic import ValidationError

from api.contract import contract_for
from configuration import load_use_case
from configuration.settings import USE_CASE_DIR
from configuration.use_case import UseCaseError

SHIPPED = sorted(p.stem for p in USE_CASE_DIR.glob("*.yaml"))


def write_use_case(tmp_path: Path, name: str, mutate) -> Path:
    raw = yaml.safe_load((USE_CASE_DIR / "churn.yaml").read_text())
    raw["name"] = name
    mutate(raw)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def row_from_schema(use_case, bound: str) -> dict:
    """A row built from the declared features alone (`examples` are optional): every numeric
    feature at its `bound` ("min" or "max"), the first or last category, True or False."""
    first = bound == "min"
    values = {
        "numeric": lambda f: getattr(f, bound),
        "categorical": lambda f: f.categories[0 if first else -1],
        "boolean": lambda f: first,
        "text": lambda f: "x" * (1 if first else f.max_length),
    }
    return {f.name: values[f.type](f) for f in use_case.features}


def test_the_demo_use_cases_are_shipped():
    assert {"breast_cancer", "churn"} <= set(SHIPPED)
    for name in ("breast_cancer", "churn"):
        assert load_use_case(USE_CASE_DIR / f"{name}.yaml").examples, name


@pytest.mark.parametrize("name", SHIPPED)
def test_every_use_case_loads_and_rows_at_its_bounds_and_examples_pass_its_contract(name):
    use_case = load_use_case(USE_CASE_DIR / f"{name}.yaml")
    contract = contract_for(use_case)
    for row in [row_from_schema(use_case, "min"), row_from_schema(use_case, "max")]:
        contract.Row.model_validate(row)
    for example in use_case.examples:
        contract.Row.model_validate(example)


def test_a_use_case_without_examples_loads_and_its_contract_has_no_example(tmp_path):
    use_case = load_use_case(write_use_case(tmp_path, "plain", lambda r: r.pop("examples")))
    assert use_case.examples == ()
    row_model = contract_for(use_case).Row
    assert "example" not in row_model.model_json_schema()
    row_model.model_validate(row_from_schema(use_case, "min"))


def test_churn_declares_mixed_features_with_pii_kept_out_of_the_model(churn):
    types = {f.type for f in churn.model_features}
    assert types == {"numeric", "categorical", "boolean"}
    assert len(churn.model_features) >= 18
    assert churn.pii_names == ["email"]
    assert "email" not in churn.model_feature_names
    assert churn.key not in churn.model_feature_names


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda r: r["features"][2].pop("min"), "'age' needs finite min and max"),
        (lambda r: r["features"][2].update(max=float("inf")), "bounds must be finite"),
        (lambda r: r["features"][14].update(categories=[]), "'contract_type' needs unique"),
        (lambda r: r["features"][3].update(typo=1), "typo"),
        (lambda r: r.update(gates={"f1": {"min": 0.5}}), "unknown gate metrics ['f1']"),
        (lambda r: r.update(key="nope"), "key 'nope' is not a declared feature"),
        (lambda r: r["features"].append(dict(r["features"][2])), "duplicate feature names"),
        (
            lambda r: r.update(task="binary", target={"name": "y", "classes": ["a", "b", "c"]}),
            "exactly two classes",
        ),
    ],
)
def test_invalid_use_case_files_fail_naming_the_problem(tmp_path, mutate, fragment):
    path = write_use_case(tmp_path, "broken", mutate)
    with pytest.raises(UseCaseError) as info:
        load_use_case(path)
    assert fragment in str(info.value)
    assert str(path) in str(info.value)


def test_unknown_use_case_lists_the_available_ones(tmp_path):
    with pytest.raises(UseCaseError, match="available"):
        load_use_case(tmp_path / "nope.yaml")


class TestRowContract:
    def row(self, churn, **changes):
        return {**churn.examples[0], **changes}

    def test_valid_row_passes(self, churn):
        contract_for(churn).Row.model_validate(self.row(churn))

    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("age", 17),
            ("age", 101),
            ("age", math.nan),
            ("age", math.inf),
            ("age", "41"),
            ("age", True),
            ("contract_type", "weekly"),
            ("auto_pay", "yes"),
            ("auto_pay", 1),
            ("customer_id", "x" * 65),
        ],
    )
    def test_bad_values_are_rejected_naming_the_field(self, churn, field, value):
        with pytest.raises(ValidationError) as info:
            contract_for(churn).Row.model_validate(self.row(churn, **{field: value}))
        assert info.value.errors()[0]["loc"] == (field,)

    def test_unknown_fields_and_missing_required_fields_are_rejected(self, churn):
        row_model = contract_for(churn).Row
        with pytest.raises(ValidationError, match=r"Extra inputs"):
            row_model.model_validate(self.row(churn, surprise=1))
        incomplete = self.row(churn)
        del incomplete["tenure_months"]
        with pytest.raises(ValidationError, match="tenure_months"):
            row_model.model_validate(incomplete)

    def test_nullable_pii_and_key_fields_may_be_omitted(self, churn):
        row = self.row(churn)
        for name in ("total_charges", "region", "email", "customer_id", "streaming"):
            row.pop(name)
        contract_for(churn).Row.model_validate(row)

    def test_schema_carries_descriptions_bounds_and_categories(self, churn):
        schema = contract_for(churn).Row.model_json_schema()
        assert schema["additionalProperties"] is False
        age = schema["properties"]["age"]
        assert (age["minimum"], age["maximum"]) == (18, 100)
        assert age["description"] == "Age in years."
        assert schema["properties"]["contract_type"]["enum"] == [
            "month_to_month",
            "one_year",
            "two_year",
        ]
        assert "personal data" in schema["properties"]["email"]["description"]
        assert schema["properties"]["total_charges"]["anyOf"][0]["maximum"] == 100_000


def test_frame_types_columns_identically_for_dicts_and_frames(churn):
    rows = [dict(e) for e in churn.examples]
    frame = churn.frame(rows)
    assert list(frame.columns) == churn.model_feature_names
    assert frame["auto_pay"].tolist() == [0.0, 1.0]
    assert np.isnan(frame["total_charges"].iloc[1]) and np.isnan(frame["streaming"].iloc[1])
    assert frame["region"].isna().tolist() == [False, True]
    again = churn.frame(frame)
    assert again.equals(frame)


def test_matrix_takes_each_feature_as_row_get_would(churn):
    """UseCase.matrix (one itemgetter per row, falling back for rows with fields left out)
    against row.get of each model feature, None where missing, in order."""
    from training.encoder_compiler import random_rows

    names = churn.model_feature_names
    full = [
        {"customer_id": f"C-{i}", "email": "x@example.com"} | {n: r.get(n) for n in names}
        for i, r in enumerate(random_rows(churn, 300, seed=4))
    ]
    partial = [{k: v for j, (k, v) in enumerate(r.items()) if j % 3} for r in full[:50]]
    for rows in (full, partial, [*full[:10], {}], [], [{}]):
        expected = [[row.get(n) for n in names] for row in rows]
        got = churn.matrix(rows)
        assert got.shape == (len(rows), len(names)) and got.dtype == object
        assert got.tolist() == expected
        assert [type(v) for v in got.ravel()] == [type(e) for row in expected for e in row]
