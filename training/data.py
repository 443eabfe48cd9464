"""Training data: the churn generator, bundled datasets, files, and checks against a use case."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from configuration import UseCase, UseCaseError

CHURN_CATEGORIES = {
    "contract_type": (["month_to_month", "one_year", "two_year"], [0.55, 0.25, 0.20]),
    "payment_method": (["card", "bank_transfer", "paypal", "invoice"], [0.35, 0.25, 0.25, 0.15]),
    "internet_service": (["none", "dsl", "fiber"], [0.15, 0.40, 0.45]),
    "plan_tier": (["basic", "standard", "premium"], [0.45, 0.35, 0.20]),
    "region": (["north", "south", "east", "west", "central"], [0.2, 0.2, 0.2, 0.2, 0.2]),
}


def generate_churn(n_rows: int, seed: int) -> pd.DataFrame:
    """Synthetic customer-churn table with a known data-generating process.

    Customers draw independent demographics, contract and usage features; churn is Bernoulli
    with logit
        -1.1 + 1.4*[month_to_month] - 0.5*[two_year] - 0.025*tenure + 0.012*(monthly - 70)
        + 0.22*tickets + 0.35*late_payments - 0.45*(satisfaction - 3) + 0.6*[fiber]
        - 0.5*[auto_pay] + 0.006*days_since_last_login - 0.012*logins - 0.02*discount
        + 0.3*[invoice] - 0.2*(products - 2)
    (satisfaction and other missing values enter at their mean). Noise columns (age, region,
    has_partner, streaming, avg_session_minutes) carry little or no signal. Missing values:
    total_charges 2%, satisfaction_score 12%, region 3%, streaming 5%. `email` is personal data
    and never a model input; `customer_id` is the key.
    """
    rng = np.random.default_rng(seed)
    n = n_rows
    cats = {
        name: rng.choice(values, size=n, p=probs)
        for name, (values, probs) in CHURN_CATEGORIES.items()
    }
    tenure = np.clip(rng.gamma(2.0, 14.0, n), 0, 240).round()
    monthly = np.clip(rng.normal(70, 25, n) + 20 * (cats["internet_service"] == "fiber"), 5, 480)
    monthly = monthly.round(2)
    total = np.clip(tenure * monthly * rng.normal(1.0, 0.05, n), 0, 100_000).round(2)
    tickets = rng.poisson(1.2, n).clip(0, 100)
    logins = rng.poisson(18, n).clip(0, 1000)
    session = np.clip(rng.lognormal(2.5, 0.6, n), 0, 600).round(1)
    last_login = np.clip(rng.exponential(12, n), 0, 3650).round()
    late = rng.binomial(12, 0.06, n)
    discount = rng.choice([0, 5, 10, 15, 20, 30], size=n, p=[0.5, 0.15, 0.15, 0.1, 0.07, 0.03])
    satisfaction = rng.integers(1, 6, n).astype(float)
    products = rng.integers(1, 6, n)
    age = rng.integers(18, 90, n)
    paperless = rng.random(n) < 0.6
    auto_pay = rng.random(n) < 0.45
    partner = rng.random(n) < 0.5
    streaming = rng.random(n) < 0.4

    logit = (
        -1.1
        + 1.4 * (cats["contract_type"] == "month_to_month")
        - 0.5 * (cats["contract_type"] == "two_year")
        - 0.025 * tenure
        + 0.012 * (monthly - 70)
        + 0.22 * tickets
        + 0.35 * late
        - 0.45 * (satisfaction - 3)
        + 0.6 * (cats["internet_service"] == "fiber")
        - 0.5 * auto_pay
        + 0.006 * last_login
        - 0.012 * logins
        - 0.02 * discount
        + 0.3 * (cats["payment_method"] == "invoice")
        - 0.2 * (products - 2)
    )
    churned = rng.random(n) < 1.0 / (1.0 + np.exp(-logit))

    frame = pd.DataFrame(
        {
            "customer_id": [f"C-{i:06d}" for i in range(n)],
            "email": [f"customer{i}@example.com" for i in range(n)],
            "age": age.astype(float),
            "tenure_months": tenure,
            "monthly_charges": monthly,
            "total_charges": total,
            "num_products": products.astype(float),
            "support_tickets_90d": tickets.astype(float),
            "logins_30d": logins.astype(float),
            "avg_session_minutes": session,
            "days_since_last_login": last_login,
            "late_payments_12m": late.astype(float),
            "discount_pct": discount.astype(float),
            "satisfaction_score": satisfaction,
            **{name: values.astype(object) for name, values in cats.items()},
            "paperless_billing": paperless,
            "auto_pay": auto_pay,
            "has_partner": partner,
            "streaming": streaming.astype(object),
            "churned": np.where(churned, "churned", "stayed"),
        }
    )
    for column, rate in (
        ("total_charges", 0.02),
        ("satisfaction_score", 0.12),
        ("region", 0.03),
        ("streaming", 0.05),
    ):
        frame.loc[rng.random(n) < rate, column] = None
    return frame


def load_breast_cancer_frame() -> pd.DataFrame:
    """scikit-learn's bundled Wisconsin breast cancer data (no download), snake_case columns."""
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer(as_frame=True)
    frame = bunch.data.rename(columns=lambda c: c.replace(" ", "_"))
    frame["diagnosis"] = np.asarray(bunch.target_names)[bunch.target.to_numpy()]
    frame.insert(0, "sample_id", [f"S-{i:04d}" for i in range(len(frame))])
    return frame


GENERATORS: dict[str, Callable[[int, int], pd.DataFrame]] = {"churn": generate_churn}
BUNDLED: dict[str, Callable[[], pd.DataFrame]] = {"breast_cancer": load_breast_cancer_frame}


def data_file(use_case: UseCase, use_case_path: Path) -> Path | None:
    """The file the use case's training data is read from; None for a generator or a bundled
    dataset."""
    source = use_case.data.source
    kind, _, name = source.partition(":")
    if (kind == "generator" and name in GENERATORS) or (kind == "sklearn" and name in BUNDLED):
        return None
    path = Path(source)
    return path if path.is_absolute() else use_case_path.parent / path


def load_frame(use_case: UseCase, use_case_path: Path, n_rows: int, seed: int) -> pd.DataFrame:
    """Read the use case's training data from its declared source."""
    source = use_case.data.source
    kind, _, name = source.partition(":")
    if kind == "generator" and name in GENERATORS:
        return GENERATORS[name](n_rows, seed)
    if kind == "sklearn" and name in BUNDLED:
        return BUNDLED[name]()
    path = data_file(use_case, use_case_path)
    assert path is not None
    if path.suffix == ".csv":
        return pd.read_csv(path, keep_default_na=True)
    if path.suffix in {".parquet", ".pq"}:
        return pd.read_parquet(path)
    raise UseCaseError(
        f"use case {use_case.name!r}: data source {source!r} is neither a known generator "
        f"{sorted(GENERATORS)}, a bundled dataset {sorted(BUNDLED)}, nor a .csv/.parquet file"
    )


def validate_frame(use_case: UseCase, frame: pd.DataFrame) -> pd.DataFrame:
    """Check a training table against the use case; every error names the column."""
    problems: list[str] = []
    missing = [f.name for f in use_case.model_features if f.name not in frame.columns]
    if use_case.target.name not in frame.columns:
        missing.append(use_case.target.name)
    if missing:
        raise UseCaseError(f"use case {use_case.name!r}: data lacks columns {missing}")
    for spec in use_case.model_features:
        column = frame[spec.name]
        present = column[column.notna()]
        if not spec.nullable and len(present) != len(column):
            problems.append(f"column {spec.name!r}: {len(column) - len(present)} missing values")
        if spec.type == "numeric":
            values = pd.to_numeric(present, errors="coerce")
            if values.isna().any():
                problems.append(f"column {spec.name!r}: non-numeric values")
            elif len(values) and (values.min() < spec.min or values.max() > spec.max):
                problems.append(
                    f"column {spec.name!r}: values in [{values.min()}, {values.max()}] "
                    f"outside bounds [{spec.min}, {spec.max}]"
                )
        elif spec.type == "categorical":
            unknown = sorted(set(present.astype(str)) - set(spec.categories))
            if unknown:
                problems.append(f"column {spec.name!r}: unknown categories {unknown[:5]}")
        elif spec.type == "boolean":
            bad = sorted({str(v) for v in present if v not in (True, False, 0, 1)})
            if bad:
                problems.append(f"column {spec.name!r}: non-boolean values {bad[:5]}")
    labels = frame[use_case.target.name]
    unknown_labels = sorted(set(labels.astype(str)) - set(use_case.target.classes))
    if labels.isna().any() or unknown_labels:
        problems.append(
            f"column {use_case.target.name!r}: labels must be one of "
            f"{list(use_case.target.classes)}; found {unknown_labels[:5]} or missing"
        )
    if problems:
        raise UseCaseError(f"use case {use_case.name!r}: " + "; ".join(problems))
    return frame
