"""The scoring API: validate (strict contract) -> preprocess (batched) -> predict (batched)
-> decision and fallback policy -> respond. Also explanations and durable async tasks."""

import asyncio
import gc
import logging
import time
from typing import TYPE_CHECKING, Annotated, Any, cast

import bentoml
from fastapi import FastAPI, Header
from pydantic import BaseModel, Field, JsonValue, ValidationError
from pydantic_core import to_json
from starlette.responses import JSONResponse, Response

from api.answers import predictions
from api.contract import (
    API_PREFIX,
    REQUEST,
    DriftReport,
    ModelInfo,
    ModelRef,
    RoutingChange,
    RoutingInfo,
    RoutingSpec,
    RowError,
    StoredModel,
    TaskInfo,
    contract_for,
)
from api.errors import (
    Conflict,
    ContractMiddleware,
    InferenceFailed,
    InferenceTimeout,
    NotFound,
    PayloadTooLarge,
    ScoringError,
    bearer_refusal,
)
from api.openapi import OpenAPIDocument
from api.prediction_log import PredictionLog
from api.routing import Routing, RoutingError, initial_routing
from api.scorer import Runners, Scorer
from configuration import current_use_case, get_settings
from configuration.logs import redact_logs
from configuration.policy import Decisions
from runners.artifacts import served_model
from runners.batching import service_options
from runners.preprocessor import Preprocessor
from runners.sklearn_runner import SklearnRunner
from runners.xgboost_runner import XGBoostRunner

if TYPE_CHECKING:
    from api.tasks import Task

LOG = logging.getLogger(__name__)
redact_logs()  # every worker imports this module: no request content in any log line
SETTINGS = get_settings()
USE_CASE = current_use_case(SETTINGS)
CONTRACT = contract_for(USE_CASE, SETTINGS.explain_max_top_k, SETTINGS.max_batch_rows)
Row = CONTRACT.Row
PredictResponse = CONTRACT.PredictResponse
PredictBatchResponse = CONTRACT.PredictBatchResponse
MODEL_RUNNERS = {"xgboost": XGBoostRunner, "sklearn": SklearnRunner}
SERVING_RUNNER = MODEL_RUNNERS[SETTINGS.model_flavor]

# the error statuses each route can answer, declared in the OpenAPI document (500 always)
ROUTE_ERRORS: dict[str, dict[str, tuple[int, ...]]] = {
    f"{API_PREFIX}/predict": {"post": (400, 413, 429, 504)},
    f"{API_PREFIX}/predict_batch": {"post": (400, 413, 429, 504)},
    f"{API_PREFIX}/explain": {"post": (400, 413, 429, 503, 504)},
    f"{API_PREFIX}/model": {"get": (429,)},
    f"{API_PREFIX}/drift": {"get": (429,)},
    f"{API_PREFIX}/tasks": {"post": (400, 409, 413, 429, 504)},
    f"{API_PREFIX}/tasks/{{task_id}}": {"get": (404, 429)},
    f"{API_PREFIX}/tasks/{{task_id}}/result": {"get": (404, 409, 429)},
    f"{API_PREFIX}/admin/routing": {"get": (401, 403, 404), "put": (400, 401, 403, 404, 503)},
}
# request and response models of BentoML's routes, published in place of what it infers
ROUTE_BODIES = {
    f"{API_PREFIX}/predict": (CONTRACT.PredictRequest, PredictResponse),
    f"{API_PREFIX}/explain": (CONTRACT.ExplainRequest, PredictResponse),
    f"{API_PREFIX}/predict_batch": (CONTRACT.PredictBatchRequest, PredictBatchResponse),
}


def admin_refusal(authorization: str | None) -> JSONResponse | None:
    """None when `authorization` carries the admin token; else the error to answer."""
    refused = bearer_refusal(authorization, SETTINGS.admin_token)
    return None if refused is None else error_response(refused)


info_app = FastAPI(title="scoring model info")


class TaskRequest(BaseModel):
    model_config = REQUEST

    instances: list[JsonValue] = Field(
        description=f"Rows to score (at most {SETTINGS.task_max_rows}, else 413), each a "
        f"{Row.__name__}; validated one by one when the task runs, invalid rows reported by "
        "index in the result.",
        json_schema_extra={"items": {"anyOf": [Row.model_json_schema(), {}]}},
    )


def task_body(task: "Task") -> dict[str, Any]:
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
        access_log=False,  # ContractMiddleware writes one line per request, safe for PII
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
        self.runner_calls = Runners(
            transform=lambda rows: self.preprocessor.to_async.transform(rows),
            predict_proba=lambda x: self.model.to_async.predict_proba(x),
            contributions=lambda x: self.model.to_async.contributions(x),
            load_preprocessor=lambda version: self.preprocessor.to_async.load(version),
            load_model=lambda version: self.model.to_async.load(version),
        )
        routing = initial_routing(SETTINGS, served_model(SERVING_RUNNER))
        self.scorer = Scorer(SETTINGS, USE_CASE, self.runner_calls, routing)
        self.prediction_log = PredictionLog(SETTINGS, USE_CASE)
        self.ready = False
        # api.tasks (and SQLAlchemy, ~0.1 s of import) only where the API worker needs it:
        # every worker imports this module, and the runner workers start faster without it
        from api.routing_table import RoutingTable
        from api.tasks import TaskStore

        self.tasks = TaskStore(
            SETTINGS.task_database_url,
            retention_s=SETTINGS.task_retention_s,
            lease_s=SETTINGS.task_lease_s,
            max_attempts=SETTINGS.task_max_attempts,
        )
        self.routing_table = RoutingTable(self.tasks.engine)
        self._background: list[asyncio.Task[None]] = []
        from runners import lifecycle

        self.runner_probe = lifecycle.RunnerProbe(
            lambda: {"preprocessor": self.preprocessor, "model": self.model}
        )
        self.draining = lifecycle.draining
        lifecycle.start_worker(SETTINGS.drain_s)  # in a worker: exit with it, drain on SIGTERM
        gc.freeze()  # start-up objects are permanent: keep them out of every future collection

    @property
    def model_ref(self) -> ModelRef:
        return self.scorer.routing.champion.ref

    # ---- background work: warm-up (readiness), async tasks, routing set by admin calls -------
    @bentoml.on_startup
    async def start_background_work(self) -> None:
        from api.tasks import TaskWorker

        worker = TaskWorker(
            self.tasks,
            lambda rows: self._score_instances(rows, route="task"),
            SETTINGS.api_max_batch_rows,
            SETTINGS.task_poll_s,
        )
        self._background = [
            asyncio.create_task(self._warm_up()),
            asyncio.create_task(worker.run()),
            asyncio.create_task(self._follow_routing_table()),
            asyncio.create_task(self._update_drift_gauges()),
            asyncio.create_task(self.runner_probe.run()),
        ]

    @bentoml.on_shutdown
    async def stop_background_work(self) -> None:
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self.tasks.close()

    @bentoml.on_deployment
    @staticmethod
    def prepare_server_process() -> None:
        """In the `bentoml serve` process, before its workers start: Ctrl-C stops them at
        once (SIGTERM drains), the runners' sockets outlive the drain (runners/lifecycle.py)."""
        from runners import lifecycle

        lifecycle.prepare_server_process()

    async def _warm_up(self) -> None:
        """Score the use case's examples with every arm through the runners until the models
        answer them all (runners may still be starting). /readyz is 503 until then, and stays
        503 if they never do within `warmup_timeout_s`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SETTINGS.warmup_timeout_s
        problem: str | None = "no attempt"
        while loop.time() < deadline:
            problem = await self.scorer.warm(self.scorer.routing)
            if problem is None:
                self.ready = True
                LOG.info("warm-up passed: the models scored the example rows")
                return
            await asyncio.sleep(0.5)
        LOG.error("warm-up failed within %s s (%s): not ready", SETTINGS.warmup_timeout_s, problem)

    def __is_ready__(self) -> bool:
        # warmed up, every runner answers (cached by RunnerProbe), and no SIGTERM yet
        return self.ready and self.runner_probe.ready and not self.draining()

    async def _follow_routing_table(self) -> None:
        """Apply the routing an admin call stored (through this worker or another, or before a
        restart) once it differs from what this worker serves."""
        while True:
            try:
                spec = await asyncio.to_thread(self.routing_table.read)
                if spec is not None and spec != self.scorer.routing.spec():
                    routing, seconds = await self.scorer.swap(spec)
                    LOG.info("now serving %s (swapped in %.3f s)", routing.spec(), seconds)
            except Exception:  # an unreadable table or a version that cannot load: keep serving
                LOG.exception("cannot apply the stored routing")
            await asyncio.sleep(SETTINGS.routing_poll_s)

    async def _update_drift_gauges(self) -> None:
        while True:
            await asyncio.sleep(SETTINGS.drift_update_s)
            try:
                self.scorer.drift_report()
            except Exception:  # the gauges stay as they were; scoring goes on
                LOG.exception("drift update failed")

    # ---- scoring ---------------------------------------------------------------------------
    def _response(
        self,
        row: dict[str, Any],
        scored: tuple[Decisions, Routing],
        explanation: dict[str, Any] | None = None,
        explanation_status: str | None = None,
    ) -> dict[str, Any]:
        return {
            "prediction": predictions(USE_CASE, [row], scored[0])[0],
            "model": scored[1].champion.ref,
            "contract_version": USE_CASE.contract_version,
            "explanation": explanation,
            "explanation_status": explanation_status,
        }

    @bentoml.api(route=f"{API_PREFIX}/predict", input_spec=CONTRACT.PredictRequest)
    async def predict(
        self, instance: Any, explain: bool = False, top_k: int = 5
    ) -> PredictResponse:  # type: ignore[valid-type]
        """Score one row; with `explain`, add the explanation if it fits the time budget."""
        started = time.perf_counter()
        row = dict(instance.__dict__)  # type: ignore[attr-defined]  # flat: no model_dump walk
        scored = await self.scorer.decide([row])
        if not explain:
            return self._answer("predict", row, self._response(row, scored), started)
        try:
            explanation = await asyncio.wait_for(
                self.scorer.explain(row, scored[0], top_k), SETTINGS.explain_budget_ms / 1000
            )
        except TimeoutError:
            body = self._response(row, scored, explanation_status="timeout")
            return self._answer("predict", row, body, started)
        except Exception:  # the prediction stands; the explanation is reported missing
            LOG.exception("explanation failed")
            explanation = None
        status = "ok" if explanation is not None else "unavailable"
        body = self._response(row, scored, explanation=explanation, explanation_status=status)
        return self._answer("predict", row, body, started)

    def _answer(
        self, route: str, row: dict[str, Any], body: dict[str, Any], started: float
    ) -> Response:
        """The response, after its line in the prediction log."""
        self.prediction_log.record(route, [row], [body["prediction"]], started)
        return json_response(body)

    @bentoml.api(route=f"{API_PREFIX}/explain", input_spec=CONTRACT.ExplainRequest)
    async def explain(self, instance: Any, top_k: int = 5) -> PredictResponse:  # type: ignore[valid-type]
        """Score one row and explain the model's answer: per-feature contributions to its
        margin (TreeSHAP for XGBoost), top `top_k` first. 504 past the inference deadline, 503
        when the model cannot answer this row."""
        started = time.perf_counter()
        row = dict(instance.__dict__)  # type: ignore[attr-defined]
        scored = await self.scorer.decide([row])
        try:
            explanation = await asyncio.wait_for(
                self.scorer.explain(row, scored[0], top_k), SETTINGS.inference_deadline_ms / 1000
            )
        except TimeoutError:
            return error_response(InferenceTimeout("the explanation did not finish in time"))
        if explanation is None:
            reason = scored[0].reasons[0]
            return error_response(InferenceFailed(f"the model could not answer ({reason})"))
        body = self._response(row, scored, explanation=explanation, explanation_status="ok")
        return self._answer("explain", row, body, started)

    @bentoml.api(route=f"{API_PREFIX}/predict_batch", input_spec=CONTRACT.PredictBatchRequest)
    async def predict_batch(self, instances: list[Any]) -> PredictBatchResponse:  # type: ignore[valid-type]
        """Score a list of rows; results in request order, invalid rows reported by index."""
        if len(instances) > SETTINGS.max_batch_rows:
            return error_response(
                PayloadTooLarge(
                    f"{len(instances)} rows exceed the cap of {SETTINGS.max_batch_rows}"
                )
            )
        return json_response(await self._score_instances(instances))

    async def _score_instances(
        self, instances: list[Any], route: str = "predict_batch"
    ) -> dict[str, Any]:
        """predict_batch's response body: each row validated on its own, valid rows scored."""
        started = time.perf_counter()
        errors: list[RowError] = []
        valid: list[tuple[int, dict[str, Any]]] = []
        for index, raw in enumerate(instances):
            if isinstance(raw, Row):  # validated with the body
                valid.append((index, dict(raw.__dict__)))
                continue
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
        model = self.model_ref
        if valid:
            rows = [row for _, row in valid]
            decisions, routing = await self.scorer.decide(rows)
            model = routing.champion.ref
            answered = predictions(USE_CASE, rows, decisions)
            for (index, _), answer in zip(valid, answered, strict=True):
                answers[index] = answer
            self.prediction_log.record(route, rows, answered, started)
        return {
            "predictions": answers,
            "errors": errors,
            "model": model,
            "contract_version": USE_CASE.contract_version,
        }

    # ---- async tasks: durable, for requests too large to wait for ---------------------------
    @info_app.post(
        "/tasks",
        status_code=202,
        response_model=TaskInfo,
        responses={200: {"model": TaskInfo, "description": "The task this Idempotency-Key names."}},
    )
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
        from api.tasks import IdempotencyConflict

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
        """What is serving now: use case, the champion and challenger with registry versions,
        aliases, run ids and metrics, and how traffic is shared."""
        routing = self.scorer.routing
        champion = routing.champion
        return ModelInfo(
            use_case=USE_CASE.name,
            task=USE_CASE.task,
            classes=list(USE_CASE.target.classes),
            decision_threshold=USE_CASE.decision_threshold,
            contract_version=USE_CASE.contract_version,
            serving=champion.ref,
            routing=RoutingInfo(**routing.public()),
            models={
                "preprocessor": stored(champion.preprocessor),
                SETTINGS.model_flavor: stored(champion.model),
            },
        )

    @info_app.get("/drift", response_model=DriftReport)
    async def drift(self) -> Response:
        """PSI of the recent rows the champion answered against its training reference, per
        feature and for the score, and a status against the configured thresholds."""
        return JSONResponse(self.scorer.drift_report())

    # ---- admin: swap versions without a restart (bearer token; off without one) -------------
    @info_app.get("/admin/routing", response_model=RoutingInfo)
    def get_routing(self, authorization: Annotated[str | None, Header()] = None) -> Response:
        """The routing this worker serves."""
        if (refused := admin_refusal(authorization)) is not None:
            return refused
        return JSONResponse(RoutingInfo(**self.scorer.routing.public()).model_dump(mode="json"))

    @info_app.put("/admin/routing", response_model=RoutingChange)
    async def set_routing(
        self, change: RoutingSpec, authorization: Annotated[str | None, Header()] = None
    ) -> Response:
        """Serve other imported versions (e.g. roll back to the previous champion): the models
        are loaded, verified and warmed before an atomic swap; requests in flight finish with
        the versions they started with. Other API workers follow within `routing_poll_s`."""
        if (refused := admin_refusal(authorization)) is not None:
            return refused
        try:
            routing, seconds = await self.scorer.swap(change.model_dump())
        except RoutingError as exc:
            return error_response(NotFound(str(exc)))
        except Exception as exc:  # the new versions failed to load or warm: keep the old ones
            LOG.exception("swap refused")
            return error_response(InferenceFailed(f"swap refused, still serving: {exc}"))
        await asyncio.to_thread(self.routing_table.write, routing.spec())
        body = {**RoutingInfo(**routing.public()).model_dump(mode="json"), "swap_s": seconds}
        return JSONResponse(body)


cast(Any, Scoring).add_asgi_middleware(
    OpenAPIDocument, path="/docs.json", errors=ROUTE_ERRORS, bodies=ROUTE_BODIES
)
cast(Any, Scoring).add_asgi_middleware(  # a bentoml.Service at run time
    ContractMiddleware,
    routes=ROUTE_ERRORS,
    prefix=API_PREFIX,
    max_body_bytes=SETTINGS.max_body_bytes,
    contract_version=USE_CASE.contract_version,
    max_concurrency=SETTINGS.api_max_concurrency,
    timeout_s=SETTINGS.request_timeout_s,
    body_limits={f"{API_PREFIX}/tasks": SETTINGS.task_max_body_bytes},
)
