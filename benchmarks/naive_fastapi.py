"""The reference we must beat: the usual tutorial way to serve this model (FastAPI + pydantic,
a pandas frame and ColumnTransformer.transform per request, XGBClassifier.predict_proba).

Kept out of the product; the benchmark runs it with `uvicorn benchmarks.naive_fastapi:app`.
It loads the same verified model files that the service serves. The handler is `async` so that
requests run one after another on the event loop: faster here than `def` in a 40-thread pool.
"""

from __future__ import annotations

import bentoml
import pandas as pd
import skops.io
import xgboost as xgb
from fastapi import FastAPI

from api.contract import contract_for
from configuration import current_use_case, get_settings
from runners.artifacts import SKOPS_TRUSTED_TYPES, model_tag, verified_file

SETTINGS = get_settings()
USE_CASE = current_use_case(SETTINGS)
Row = contract_for(USE_CASE).Row

preprocessor = skops.io.load(
    verified_file(bentoml.models.get(model_tag(SETTINGS, "preprocessor"))),
    trusted=SKOPS_TRUSTED_TYPES,
)
model = xgb.XGBClassifier(n_jobs=1)
model.load_model(verified_file(bentoml.models.get(model_tag(SETTINGS, "xgboost"))))

app = FastAPI()


@app.post("/v1/predict")
async def predict(body: dict) -> dict:
    row = Row.model_validate(body["instance"])
    frame = USE_CASE.frame(pd.DataFrame([row.model_dump()]))
    probabilities = model.predict_proba(preprocessor.transform(frame))[0]
    return {
        "probabilities": dict(zip(USE_CASE.target.classes, probabilities.tolist(), strict=True))
    }
