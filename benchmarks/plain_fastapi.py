"""The plain app a competent engineer would write instead of this project: FastAPI with an async
endpoint and a pydantic model of the row, uvicorn with uvloop and httptools and one worker per
core, and per request one pandas frame, the fitted ColumnTransformer and
XGBClassifier.predict_proba. The benchmark's reference for latency at low load; it serves the
same verified model files as the service, at `/v1/predict` and `/v1/predict_batch` with the
same request bodies. Not part of the product: `uvicorn benchmarks.plain_fastapi:app`."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from fastapi import FastAPI
from pydantic import BaseModel, create_model

from benchmarks.peers import stored_model
from configuration import current_use_case

USE_CASE = current_use_case()
FEATURES = USE_CASE.model_features
TYPES = {"numeric": float, "boolean": bool, "categorical": str}
# categories as object (None -> NaN), numbers and booleans as float64: what the pipeline was fit on
DTYPES = {f.name: object if f.type == "categorical" else np.float64 for f in FEATURES}
CATEGORICAL = [f.name for f in FEATURES if f.type == "categorical"]

Row: type[BaseModel] = create_model(  # extra fields (keys, personal data) are ignored
    "Row", **{f.name: (TYPES[f.type] | None, None) for f in FEATURES}
)
One = create_model("One", instance=(Row, ...))
Batch = create_model("Batch", instances=(list[Row], ...))  # type: ignore[valid-type]

preprocessor, model = stored_model()
CLASSES = USE_CASE.target.classes

app = FastAPI()


def probabilities(rows: list[BaseModel]) -> list[dict[str, float]]:
    frame = pd.DataFrame.from_records([r.model_dump() for r in rows], columns=list(DTYPES))
    frame = frame.astype(DTYPES)
    frame[CATEGORICAL] = frame[CATEGORICAL].fillna(np.nan)  # None -> NaN, as at training
    scores = model.predict_proba(preprocessor.transform(frame))
    return [dict(zip(CLASSES, p, strict=True)) for p in scores.tolist()]


@app.post("/v1/predict")
async def predict(body: One) -> dict[str, Any]:  # type: ignore[valid-type]
    return {"prediction": {"probabilities": probabilities([body.instance])[0]}}  # type: ignore[attr-defined]


@app.post("/v1/predict_batch")
async def predict_batch(body: Batch) -> dict[str, Any]:  # type: ignore[valid-type]
    answers = probabilities(body.instances)  # type: ignore[attr-defined]
    return {"predictions": [{"probabilities": p} for p in answers]}
