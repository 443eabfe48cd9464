"""Fit the preprocessing and both models on a use case, and evaluate them on held-out rows."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import xgboost as xgb
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, log_loss, roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from configuration import Settings, UseCase
from configuration.drift import reference_statistics

FLAVORS = ("xgboost", "sklearn")


def build_preprocessor(use_case: UseCase) -> ColumnTransformer:
    """Stock scikit-learn preprocessing: numeric imputed + scaled, booleans imputed,
    categoricals one-hot over the declared categories (missing and unknown -> all zeros)."""
    by_type: dict[str, list[str]] = {"numeric": [], "boolean": [], "categorical": []}
    categories: list[list[str]] = []
    for spec in use_case.model_features:
        by_type[spec.type].append(spec.name)
        if spec.type == "categorical":
            categories.append(list(spec.categories))
    transformers: list[tuple[str, Any, list[str]]] = []
    if by_type["numeric"]:
        numeric = Pipeline(
            [("impute", SimpleImputer(strategy="median")), ("scale", StandardScaler())]
        )
        transformers.append(("numeric", numeric, by_type["numeric"]))
    if by_type["boolean"]:
        transformers.append(
            ("boolean", SimpleImputer(strategy="most_frequent"), by_type["boolean"])
        )
    if by_type["categorical"]:
        onehot = OneHotEncoder(
            categories=categories, handle_unknown="ignore", sparse_output=False, dtype=np.float64
        )
        transformers.append(("categorical", onehot, by_type["categorical"]))
    return ColumnTransformer(transformers, remainder="drop", sparse_threshold=0.0)


def encode_labels(use_case: UseCase, labels: pd.Series) -> np.ndarray:
    index = {name: i for i, name in enumerate(use_case.target.classes)}
    return labels.astype(str).map(index).to_numpy(dtype=np.int64)


def evaluate(use_case: UseCase, y_true: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """ROC AUC, log loss and accuracy on held-out rows; one-vs-rest AUC per class for multiclass."""
    n_classes = len(use_case.target.classes)
    metrics = {
        "log_loss": float(log_loss(y_true, probabilities, labels=list(range(n_classes)))),
        "accuracy": float(accuracy_score(y_true, use_case.labels_for(probabilities))),
    }
    if use_case.task == "binary":
        metrics["roc_auc"] = float(roc_auc_score(y_true, probabilities[:, 1]))
    else:
        metrics["roc_auc"] = float(
            roc_auc_score(y_true, probabilities, multi_class="ovr", average="macro")
        )
        predicted = probabilities.argmax(axis=1)
        for i, name in enumerate(use_case.target.classes):
            metrics[f"roc_auc.{name}"] = float(roc_auc_score(y_true == i, probabilities[:, i]))
            mask = y_true == i
            metrics[f"recall.{name}"] = float((predicted[mask] == i).mean()) if mask.any() else 0.0
    return metrics


@dataclass
class TrainedModels:
    """Everything one training run produces, before it is logged anywhere."""

    preprocessor: ColumnTransformer
    models: dict[str, Any]
    metrics: dict[str, dict[str, float]]
    feature_names: list[str]
    params: dict[str, Any] = field(default_factory=dict)
    reference: dict[str, Any] = field(default_factory=dict)  # drift reference statistics
    # the split: index labels of the input frame's training and held-out rows (lineage)
    train_index: pd.Index = field(default_factory=lambda: pd.Index([]))
    holdout_index: pd.Index = field(default_factory=lambda: pd.Index([]))


def fit(use_case: UseCase, frame: pd.DataFrame, settings: Settings) -> TrainedModels:
    """Split, fit the preprocessing and both models on the training part, evaluate on the rest."""
    x_raw = use_case.frame(frame)
    y = encode_labels(use_case, frame[use_case.target.name])
    x_train, x_test, y_train, y_test = train_test_split(
        x_raw, y, test_size=settings.test_size, random_state=settings.seed, stratify=y
    )
    preprocessor = build_preprocessor(use_case).fit(x_train)
    features_train = preprocessor.transform(x_train)
    features_test = preprocessor.transform(x_test)
    xgb_params = {
        "n_estimators": settings.xgb_n_estimators,
        "max_depth": settings.xgb_max_depth,
        "learning_rate": settings.xgb_learning_rate,
        "tree_method": "hist",
        "random_state": settings.seed,
        "n_jobs": settings.model_threads,
    }
    models: dict[str, Any] = {
        "xgboost": xgb.XGBClassifier(**xgb_params).fit(features_train, y_train),
        "sklearn": LogisticRegression(C=settings.sklearn_c, max_iter=2000).fit(
            features_train, y_train
        ),
    }
    probabilities = {
        flavor: np.asarray(model.predict_proba(features_test)) for flavor, model in models.items()
    }
    metrics = {flavor: evaluate(use_case, y_test, p) for flavor, p in probabilities.items()}
    scores = {
        flavor: p[:, 1] if use_case.task == "binary" else p.max(axis=1)
        for flavor, p in probabilities.items()
    }
    params = {
        "use_case": use_case.name,
        "use_case_sha256": use_case.source_sha256,
        "rows_train": len(x_train),
        "rows_test": len(x_test),
        "seed": settings.seed,
        **{f"xgboost.{k}": v for k, v in xgb_params.items()},
        "sklearn.C": settings.sklearn_c,
        "sklearn.estimator": "LogisticRegression",
    }
    return TrainedModels(
        preprocessor=preprocessor,
        models=models,
        metrics=metrics,
        feature_names=[str(n) for n in preprocessor.get_feature_names_out()],
        params=params,
        reference=reference_statistics(use_case, x_train, scores),
        train_index=x_train.index,
        holdout_index=x_test.index,
    )
