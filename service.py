"""The scoring API: validate (strict contract) -> preprocess (batched) -> predict (batched)
-> decision and fallback policy -> respond. Also explanations and durable async tasks."""

import asyncio
import gc
import logging
from typing import Annotated, Any, Literal, cast

import bentoml
import httpx
import numpy as np
from bentoml.exceptions import ServiceUnavailable
from fastapi import FastAPI, Header
from pydantic import BaseModel, Field, ValidationError
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
from configuration.errors import (
    Conflict,
    ContractMiddleware,
    InferenceFailed,
    InferenceTimeout,
    NotFound,
    PayloadTooLarge,
    ScoringError,
)
from configuration.openapi import OpenAPIErrors
from configuration.policy import FALLBACK_REASONS, Decisions, FallbackReason, decide
from runners.answers import Explainer, predictions
from runners.artifacts import served_model
from runners.batching import service_options
from runners.coalescing import Coalescer
from runners.metrics import fallbacks
from runners.preprocessor import Preprocessor
from runners.sklearn_runner import SklearnRunner
from runners.tasks import IdempotencyConflict, Task, TaskStore, TaskWorker
from runners.xgboost_runner import XGBoostRunner

LOG = logging.getLogger(__name__)
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

TopK = Annotated[
    int,
    Field(ge=1, le=SETTINGS.explain_max_top_k, description="Features listed in the explanation."),
]
# the error statuses each route can answer, declared in the OpenAPI document (500 always)
ROUTE_ERRORS: dict[str, dict[str, tuple[int, ...]]] = {
    f"{API_PREFIX}/predict": {"post": (400, 413, 429, 504)},
    f"{API_PREFIX}/predict_batch": {"post": (400, 413, 429, 504)},
    f"{API_PREFIX}/explain": {"post": (400, 413, 429, 503, 504)},
    f"{API_PREFIX}/model": {"get": (429,)},
    f"{API_PREFIX}/tasks": {"post": (400, 409, 413, 429, 504)},
    f"{API_PREFIX}/tasks/{{task_id}}": {"get": (404, 429)},
    f"{API_PREFIX}/tasks/{{task_id}}/result": {"get": (404, 409, 429)},
}
NOT_READY_ERRORS = (ServiceUnavailable, httpx.TransportError, OSError)

info_app = FastAPI(title="scoring model info")


class TaskRequest(BaseModel):
    instances: BatchRows = Field(
        description=f"Rows to score (at most {SETTINGS.task_max_rows}); validated one by one "
        "when the task runs, invalid rows reported by index in the result."
    )


class TaskInfo(BaseModel):
    task_id: str
    status: Literal["queued", "running", "succeeded", "failed"]
    rows: int
    attempts: int = Field(description="Times a worker started on it.")
    idempotency_key: str | None
    created_at: str
    updated_at: str
    expires_at: str = Field(description="When the task and its result are deleted.")
    error: str | None
    contract_version: int
    links: dict[str, str]


def task_body(task: Task) -> dict[str, Any]:
    base = f"{API_PREFIX}/tasks/{task.id}"
    return {
        **task.public(),
        "contract_version": USE_CASE.contract_version,
        "links": {"status": base, "result": f"{base}/result"},
    }


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
        routes=[f"{API_PREFIX}/{r}" for r in ("predict", "predict_batch", "explain")],
        # ContractMiddleware answers 504 at request_timeout_s; BentoML's timeout is a backstop
        timeout_s=SETTINGS.request_timeout_s + 5,
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
        encoded_names = [str(n) for n in preprocessor.info.metadata["feature_names"]]  # type: ignore[union-attr]
        self.explainer = Explainer(USE_CASE, encoded_names)
        self.fallbacks = {reason: fallbacks().labels(reason=reason) for reason in FALLBACK_REASONS}
        self.ready = False
        self.tasks = TaskStore(
            SETTINGS.task_database_url,
            retention_s=SETTINGS.task_retention_s,
            lease_s=SETTINGS.task_lease_s,
            max_attempts=SETTINGS.task_max_attempts,
        )
        self._background: list[asyncio.Task[None]] = []
        gc.freeze()  # start-up objects are permanent: keep them out of every future collection

    # ---- readiness: models loaded and verified (runners), then a warm-up prediction ----------
    @bentoml.on_startup
    async def start_background_work(self) -> None:
        worker = TaskWorker(
            self.tasks, self._score_instances, SETTINGS.api_max_batch_rows, SETTINGS.task_poll_s
        )
        self._background = [
            asyncio.create_task(self._warm_up()),
            asyncio.create_task(worker.run()),
        ]

    @bentoml.on_shutdown
    async def stop_background_work(self) -> None:
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self.tasks.close()

    async def _warm_up(self) -> None:
        """Score the use case's examples through the runners until the model answers them all
        (runners may still be starting; the inference deadline does not apply). /readyz is 503
        until then, and stays 503 if it never does within `warmup_timeout_s`."""
        rows = [dict(CONTRACT.Row.model_validate(e).__dict__) for e in USE_CASE.examples] or [{}]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SETTINGS.warmup_timeout_s
        problem = "no attempt"
        while loop.time() < deadline:
            try:
                probabilities = await self._coalesce(rows)
            except Exception as exc:  # runners still starting, or broken: retried until deadline
                problem = repr(exc)
            else:
                if np.isfinite(probabilities).all():
                    self.ready = True
                    LOG.info("warm-up passed: the model scored %d example rows", len(rows))
                    return
                problem = "the model failed on an example row"
            await asyncio.sleep(0.5)
        LOG.error("warm-up failed within %s s (%s): not ready", SETTINGS.warmup_timeout_s, problem)

    def __is_ready__(self) -> bool:
        return self.ready

    # ---- scoring ---------------------------------------------------------------------------
    async def _run_runners(self, rows: list[dict[str, Any]]) -> np.ndarray:
        """Probabilities (n x k) for a coalesced batch; a row that a runner failed on stays NaN
        (never guessed) and is not sent on to the model."""
        features = await self.preprocessor.to_async.transform(USE_CASE.matrix(rows))
        ok = ~np.isnan(features).any(axis=1)
        probabilities = np.full((len(rows), len(USE_CASE.target.classes)), np.nan)
        if ok.any():
            probabilities[ok] = await self.model.to_async.predict_proba(features[ok])
        return probabilities

    async def _decide(self, rows: list[dict[str, Any]]) -> Decisions:
        """The answer for each row: the model's within the deadline, else the fallback's."""
        failed: FallbackReason | None = None
        try:
            probabilities = await asyncio.wait_for(
                self._coalesce(rows), SETTINGS.inference_deadline_ms / 1000
            )
        except (TimeoutError, httpx.TimeoutException):
            failed = "timeout"  # the batch runs on; its result for these rows is dropped
        except NOT_READY_ERRORS as exc:
            failed = "model_not_ready"
            LOG.warning("runner unavailable: %s", exc)
        except Exception:  # any other runner failure: logged, answered by the fallback
            failed = "model_error"
            LOG.exception("runner call failed")
        if failed is not None:
            probabilities = np.full((len(rows), len(USE_CASE.target.classes)), np.nan)
        decisions = decide(USE_CASE, probabilities, lambda index: [rows[i] for i in index], failed)
        for reason in decisions.reasons[decisions.fallback].tolist():
            self.fallbacks[reason].inc()
        return decisions

    async def _explain(
        self, row: dict[str, Any], decisions: Decisions, top_k: int
    ) -> dict[str, Any] | None:
        """The explanation of the model's answer for one row (None when it has none)."""
        if decisions.reasons[0] not in (None, "low_confidence"):
            return None
        features = await self.preprocessor.to_async.transform(USE_CASE.matrix([row]))
        if np.isnan(features).any():
            return None
        contributions = await self.model.to_async.contributions(features)
        label = int(decisions.labels[0])
        return self.explainer.explain(row, contributions[0], max(label, 0), top_k)

    def _response(
        self,
        row: dict[str, Any],
        decisions: Decisions,
        explanation: dict[str, Any] | None = None,
        explanation_status: str | None = None,
    ) -> dict[str, Any]:
        return {
            "prediction": predictions(USE_CASE, [row], decisions)[0],
            "model": self.model_ref,
            "contract_version": USE_CASE.contract_version,
            "explanation": explanation,
            "explanation_status": explanation_status,
        }

    @bentoml.api(route=f"{API_PREFIX}/predict")
    async def predict(
        self,
        instance: Row,  # type: ignore[valid-type]
        explain: bool = False,
        top_k: TopK = 5,
    ) -> PredictResponse:  # type: ignore[valid-type]
        """Score one row; with `explain`, add the explanation if it fits the time budget."""
        row = dict(instance.__dict__)  # type: ignore[attr-defined]  # flat: no model_dump walk
        decisions = await self._decide([row])
        if not explain:
            return json_response(self._response(row, decisions))
        try:
            explanation = await asyncio.wait_for(
                self._explain(row, decisions, top_k), SETTINGS.explain_budget_ms / 1000
            )
        except TimeoutError:
            return json_response(self._response(row, decisions, explanation_status="timeout"))
        except Exception:  # the prediction stands; the explanation is reported missing
            LOG.exception("explanation failed")
            explanation = None
        status = "ok" if explanation is not None else "unavailable"
        return json_response(
            self._response(row, decisions, explanation=explanation, explanation_status=status)
        )

    @bentoml.api(route=f"{API_PREFIX}/explain")
    async def explain(self, instance: Row, top_k: TopK = 5) -> PredictResponse:  # type: ignore[valid-type]
        """Score one row and explain the model's answer: per-feature contributions to its
        margin (TreeSHAP for XGBoost), top `top_k` first. 504 past the inference deadline, 503
        when the model cannot answer this row."""
        row = dict(instance.__dict__)  # type: ignore[attr-defined]
        decisions = await self._decide([row])
        try:
            explanation = await asyncio.wait_for(
                self._explain(row, decisions, top_k), SETTINGS.inference_deadline_ms / 1000
            )
        except TimeoutError:
            return error_response(InferenceTimeout("the explanation did not finish in time"))
        if explanation is None:
            reason = decisions.reasons[0]
            return error_response(InferenceFailed(f"the model could not answer ({reason})"))
        return json_response(
            self._response(row, decisions, explanation=explanation, explanation_status="ok")
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
        return json_response(await self._score_instances(instances))

    async def _score_instances(self, instances: list[Any]) -> dict[str, Any]:
        """predict_batch's response body: each row validated on its own, valid rows scored."""
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
        answers: list[Any] = [None] * len(instances)
        if valid:
            rows = [row for _, row in valid]
            for (index, _), answer in zip(
                valid, predictions(USE_CASE, rows, await self._decide(rows)), strict=True
            ):
                answers[index] = answer
        return {
            "predictions": answers,
            "errors": errors,
            "model": self.model_ref,
            "contract_version": USE_CASE.contract_version,
        }

    # ---- async tasks: durable, for requests too large to wait for ---------------------------
    @info_app.post("/tasks", status_code=202, response_model=TaskInfo)
    async def submit_task(
        self,
        request: TaskRequest,
        idempotency_key: Annotated[str | None, Header(max_length=128)] = None,
    ) -> Response:
        """Queue rows for scoring; the task id comes back at once (202; 200 when the
        Idempotency-Key names a task already submitted with this payload)."""
        if len(request.instances) > SETTINGS.task_max_rows:
            message = f"{len(request.instances)} rows exceed the cap of {SETTINGS.task_max_rows}"
            return error_response(PayloadTooLarge(message))
        payload = to_json(request.instances)
        try:
            task, created = await asyncio.to_thread(
                self.tasks.submit, payload, len(request.instances), idempotency_key
            )
        except IdempotencyConflict as exc:
            return error_response(Conflict(str(exc)))
        return JSONResponse(task_body(task), status_code=202 if created else 200)

    @info_app.get("/tasks/{task_id}", response_model=TaskInfo)
    async def task_status(self, task_id: str) -> Response:
        """A task's status: queued, running, succeeded or failed (404 once expired)."""
        task = await asyncio.to_thread(self.tasks.get, task_id)
        if task is None:
            return error_response(NotFound(f"no task {task_id} (unknown, or past retention)"))
        return JSONResponse(task_body(task))

    @info_app.get("/tasks/{task_id}/result", response_model=PredictBatchResponse)
    async def task_result(self, task_id: str) -> Response:
        """The finished task's predictions, in predict_batch's shape (409 until it succeeded)."""
        task = await asyncio.to_thread(self.tasks.get, task_id)
        if task is None:
            return error_response(NotFound(f"no task {task_id} (unknown, or past retention)"))
        if task.status != "succeeded":
            return error_response(Conflict(f"task {task_id} is {task.status}, not succeeded"))
        result = await asyncio.to_thread(self.tasks.result, task_id)
        return Response(result, media_type="application/json")

    @info_app.get("/model", response_model=ModelInfo)
    def model_info(self) -> ModelInfo:
        """What is serving: use case, models, registry versions and aliases, run ids, metrics."""
        return self.info


cast(Any, Scoring).add_asgi_middleware(OpenAPIErrors, path="/docs.json", errors=ROUTE_ERRORS)
cast(Any, Scoring).add_asgi_middleware(  # a bentoml.Service at run time
    ContractMiddleware,
    prefix=API_PREFIX,
    max_body_bytes=SETTINGS.max_body_bytes,
    contract_version=USE_CASE.contract_version,
    max_concurrency=SETTINGS.api_max_concurrency,
    timeout_s=SETTINGS.request_timeout_s,
    body_limits={f"{API_PREFIX}/tasks": SETTINGS.task_max_body_bytes},
)
