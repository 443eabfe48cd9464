"""The scoring API: validate (strict contract) -> preprocess (batched) -> predict (batched)."""

import gc
from typing import Annotated, Any, cast

import bentoml
import numpy as np
from fastapi import FastAPI
from pydantic import Field, ValidationError
from pydantic_core import to_json
from starlette.responses import JSONResponse, Response

from configuration import (
    API_PREFIX,
    ModelInfo,
    ModelRef,
    RowError,
    StoredModel,
    contract_for,
    current_use_case,
    get_settings,
)
from configuration.errors import ContractMiddleware, InferenceFailed, PayloadTooLarge, ScoringError
from runners.artifacts import served_model
from runners.batching import service_options
from runners.coalescing import Coalescer
from runners.preprocessor import Preprocessor
from runners.sklearn_runner import SklearnRunner
from runners.xgboost_runner import XGBoostRunner

SETTINGS = get_settings()
USE_CASE = current_use_case(SETTINGS)
CONTRACT = contract_for(USE_CASE)
Row = CONTRACT.Row
PredictResponse = CONTRACT.PredictResponse
PredictBatchResponse = CONTRACT.PredictBatchResponse
MODEL_RUNNERS = {"xgboost": XGBoostRunner, "sklearn": SklearnRunner}
SERVING_RUNNER = MODEL_RUNNERS[SETTINGS.model_flavor]
BatchRows = Annotated[
    list[dict[str, Any]],
    Field(
        description=f"Rows to score (at most {SETTINGS.max_batch_rows}), each a {Row.__name__}; "
        "each row is validated on its own and an invalid row is reported by index.",
        json_schema_extra={"items": Row.model_json_schema()},
    ),
]

info_app = FastAPI(title="scoring model info")


def stored(model: bentoml.Model) -> StoredModel:
    labels, metadata = model.info.labels, model.info.metadata
    return StoredModel(
        bento_tag=str(model.tag),
        registered_name=labels["registered_name"],
        registered_version=labels["registered_version"],
        alias=labels["alias"],
        run_id=labels["run_id"],
        sha256=metadata["sha256"],
        imported_at=metadata["imported_at"],
        metrics=metadata.get("metrics", {}),
    )


def error_response(error: ScoringError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def json_response(body: dict[str, Any]) -> Response:
    """A response body (the shape of the route's declared response model) serialised by
    pydantic-core and sent as is: BentoML's own response path builds a TypeAdapter and a JSON
    schema on every request, and response models cost a validation per prediction."""
    return Response(to_json(body), media_type="application/json")


@bentoml.service(
    name="scoring",
    **service_options(
        SETTINGS,
        SETTINGS.api_workers,
        routes=[f"{API_PREFIX}/predict", f"{API_PREFIX}/predict_batch"],
    ),
)
@bentoml.asgi_app(info_app, path=API_PREFIX)
class Scoring:
    """Composes the Preprocessor and the model runners; answers with the serving model's name."""

    preprocessor = bentoml.depends(Preprocessor)
    # Only the configured model runner is a dependency: an idle runner would cost a process,
    # its start-up and its memory (the scikit-learn one: 5 s CPU and 280 MB here).
    model = bentoml.depends(SERVING_RUNNER)

    def __init__(self) -> None:
        self._coalesce = Coalescer(
            self._run_runners, SETTINGS.api_max_batch_rows, SETTINGS.api_max_in_flight
        )
        model = served_model(SERVING_RUNNER)
        preprocessor = served_model(Preprocessor)
        if model.info.metadata["preprocessor_sha256"] != preprocessor.info.metadata["sha256"]:
            raise RuntimeError(
                f"{model.tag} was trained with {model.info.metadata['preprocessor_tag']!s}, but "
                f"{preprocessor.tag} is the latest preprocessor: re-import with "
                "`python -m training import`"
            )
        self.model_ref = ModelRef(
            name=model.info.labels["registered_name"],
            version=model.info.labels["registered_version"],
            alias=model.info.labels["alias"],
            flavor=SETTINGS.model_flavor,
            bento_tag=str(model.tag),
        )
        self.info = ModelInfo(
            use_case=USE_CASE.name,
            task=USE_CASE.task,
            classes=list(USE_CASE.target.classes),
            decision_threshold=USE_CASE.decision_threshold,
            contract_version=USE_CASE.contract_version,
            serving=self.model_ref,
            models={"preprocessor": stored(preprocessor), SETTINGS.model_flavor: stored(model)},
        )
        gc.freeze()  # start-up objects are permanent: keep them out of every future collection

    async def _run_runners(self, rows: list[dict[str, Any]]) -> np.ndarray:
        """Probabilities (n x k) for a coalesced batch; a row that a runner failed on stays NaN
        (never guessed) and is not sent on to the model."""
        features = await self.preprocessor.to_async.transform(USE_CASE.matrix(rows))
        ok = ~np.isnan(features).any(axis=1)
        probabilities = np.full((len(rows), len(USE_CASE.target.classes)), np.nan)
        if ok.any():
            probabilities[ok] = await self.model.to_async.predict_proba(features[ok])
        return probabilities

    async def _score(self, rows: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities (n x k) and the mask of rows that were scored."""
        probabilities = await self._coalesce(rows)
        return probabilities, ~np.isnan(probabilities).any(axis=1)

    def _predictions(
        self, rows: list[dict[str, Any]], probabilities: np.ndarray
    ) -> list[dict[str, Any]]:
        """`Prediction`s as plain dicts (the contract tests check them against the model)."""
        classes = USE_CASE.target.classes
        decided = USE_CASE.decide(probabilities).tolist()
        score_column = 1 if USE_CASE.task == "binary" else None
        return [
            {
                "key": row.get(USE_CASE.key) if USE_CASE.key else None,
                "label": classes[label],
                "probabilities": dict(zip(classes, p, strict=True)),
                "score": p[label if score_column is None else score_column],
            }
            for row, label, p in zip(rows, decided, probabilities.tolist(), strict=True)
        ]

    @bentoml.api(route=f"{API_PREFIX}/predict")
    async def predict(self, instance: Row) -> PredictResponse:  # type: ignore[valid-type]
        """Score one row."""
        row = dict(instance.__dict__)  # type: ignore[attr-defined]  # flat: no model_dump walk
        probabilities, ok = await self._score([row])
        if not ok[0]:
            return error_response(InferenceFailed("the model could not score this row"))
        return json_response(
            {
                "prediction": self._predictions([row], probabilities)[0],
                "model": self.model_ref,
                "contract_version": USE_CASE.contract_version,
            }
        )

    @bentoml.api(route=f"{API_PREFIX}/predict_batch")
    async def predict_batch(self, instances: BatchRows) -> PredictBatchResponse:  # type: ignore[valid-type]
        """Score a list of rows; results in request order, invalid rows reported by index."""
        if len(instances) > SETTINGS.max_batch_rows:
            return error_response(
                PayloadTooLarge(
                    f"{len(instances)} rows exceed the cap of {SETTINGS.max_batch_rows}"
                )
            )
        errors: list[RowError] = []
        valid: list[tuple[int, dict[str, Any]]] = []
        for index, raw in enumerate(instances):
            try:
                valid.append((index, dict(Row.model_validate(raw).__dict__)))
            except ValidationError as exc:
                details = exc.errors(include_url=False, include_input=False, include_context=False)
                message = "; ".join(
                    f"{'.'.join(str(p) for p in d['loc']) or 'row'}: {d['msg']}" for d in details
                )
                errors.append(
                    RowError(index=index, code="invalid_input", message=message, details=details)
                )
        predictions: list[Any] = [None] * len(instances)
        if valid:
            rows = [row for _, row in valid]
            probabilities, ok = await self._score(rows)
            scored = self._predictions(rows, probabilities)
            for (index, _), prediction, row_ok in zip(valid, scored, ok, strict=True):
                if row_ok:
                    predictions[index] = prediction
                else:
                    errors.append(
                        RowError(
                            index=index,
                            code="inference_failed",
                            message="the model could not score this row",
                        )
                    )
        return json_response(
            {
                "predictions": predictions,
                "errors": sorted(errors, key=lambda e: e.index),
                "model": self.model_ref,
                "contract_version": USE_CASE.contract_version,
            }
        )

    @info_app.get("/model", response_model=ModelInfo)
    def model_info(self) -> ModelInfo:
        """What is serving: use case, models, registry versions and aliases, run ids, metrics."""
        return self.info


cast(Any, Scoring).add_asgi_middleware(  # a bentoml.Service at run time
    ContractMiddleware, prefix=API_PREFIX, max_body_bytes=SETTINGS.max_body_bytes
)
