"""The compiled encoder against the fitted scikit-learn ColumnTransformer it was compiled from."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batch.scoring import validate_chunk
from configuration import UseCase
from runners.encoder import Encoder
from training.data import generate_churn
from training.encoder_compiler import (
    NotCompilable,
    check_parity,
    compile_encoder,
    random_rows,
)
from training.pipeline import build_preprocessor


@pytest.fixture(scope="module")
def fitted(churn):
    frame = generate_churn(3000, seed=11)
    transformer = build_preprocessor(churn).fit(churn.frame(frame))
    names = [str(n) for n in transformer.get_feature_names_out()]
    return transformer, compile_encoder(transformer, churn.model_feature_names, names)


def value_strategy(spec):
    if spec.type == "numeric":
        base = st.floats(spec.min, spec.max, allow_nan=False)
    elif spec.type == "boolean":
        base = st.booleans()
    else:
        base = st.sampled_from(spec.categories)
    return st.one_of(st.none(), base) if spec.nullable else base


def rows_strategy(use_case: UseCase):
    row = st.fixed_dictionaries({s.name: value_strategy(s) for s in use_case.model_features})
    return st.lists(row, min_size=1, max_size=50)


def test_identical_on_twenty_thousand_random_rows(churn, fitted):
    transformer, encoder = fitted
    rows = random_rows(churn, 20_000, seed=3)
    frame = churn.frame(rows)
    expected = transformer.transform(frame)
    np.testing.assert_array_equal(encoder.encode(churn.matrix(rows)), expected)
    np.testing.assert_array_equal(encoder.encode_frame(frame), expected)  # the batch entry
    # batch scoring hands the encoder categories as Categoricals over the use case's categories
    _, typed = validate_chunk(churn, pd.DataFrame(rows))
    assert isinstance(typed["contract_type"].dtype, pd.CategoricalDtype)
    np.testing.assert_array_equal(encoder.encode_frame(typed), expected)


def test_identical_on_generated_edge_cases(churn, fitted):
    transformer, encoder = fitted

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(rows_strategy(churn))
    def check(rows):
        frame = churn.frame(rows)
        expected = transformer.transform(frame)
        np.testing.assert_array_equal(encoder.encode(churn.matrix(rows)), expected)
        np.testing.assert_array_equal(encoder.encode_frame(frame), expected)

    check()


def test_unknown_and_missing_categories_encode_as_zeros_like_scikit_learn(churn, fitted):
    transformer, encoder = fitted
    row = dict(churn.examples[0])
    rows = [row, {**row, "region": "atlantis"}, {**row, "region": None}]
    expected = transformer.transform(churn.frame(rows))
    np.testing.assert_array_equal(encoder.encode(churn.matrix(rows)), expected)
    np.testing.assert_array_equal(encoder.encode_frame(churn.frame(rows)), expected)
    region = [i for i, n in enumerate(encoder.feature_names) if n.startswith("categorical__region")]
    assert encoder.encode(churn.matrix(rows))[1:, region].sum() == 0


def test_round_trips_through_json(churn, fitted):
    _, encoder = fitted
    again = Encoder.from_dict(encoder.to_dict())
    raw = churn.matrix([dict(e) for e in churn.examples])
    assert again.feature_names == encoder.feature_names
    np.testing.assert_array_equal(again.encode(raw), encoder.encode(raw))


def test_parity_check_catches_a_wrong_parameter(churn, fitted):
    transformer, encoder = fitted
    spec = encoder.to_dict()
    spec["blocks"][0]["center"][0] += 1e-9
    with pytest.raises(NotCompilable, match="differs from the transformer"):
        check_parity(churn, transformer, Encoder.from_dict(spec))


def test_unknown_steps_are_not_compiled(churn):
    from sklearn.compose import ColumnTransformer
    from sklearn.preprocessing import MinMaxScaler

    frame = churn.frame(generate_churn(200, seed=1)).fillna({"total_charges": 0.0})
    transformer = ColumnTransformer([("x", MinMaxScaler(), ["age"])]).fit(frame)
    with pytest.raises(NotCompilable, match="unsupported steps"):
        compile_encoder(transformer, ["age"], ["x__age"])


def test_the_served_preprocessor_uses_the_compiled_form(demo_models):
    from runners.preprocessor import Preprocessor

    assert "encoder" in demo_models["preprocessor"].info.metadata
    assert Preprocessor.inner().compiled


def test_the_model_answers_float32_input_exactly_as_float64(churn, fitted, demo_models):
    """The XGBoost runner converts features to float32 itself (XGBoost compares float32 values
    with its split conditions): its answers equal inplace_predict on the float64 features."""
    from runners.xgboost_runner import load_booster, predictor

    _, encoder = fitted
    features = encoder.encode(churn.matrix(random_rows(churn, 20_000, seed=5)))
    booster = load_booster(demo_models["xgboost"], threads=1)
    expected = np.asarray(booster.inplace_predict(features), dtype=np.float64)
    np.testing.assert_array_equal(predictor(booster)(features)[:, 1], expected)
