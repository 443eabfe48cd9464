"""The scoring API: validate (strict contract) -> preprocess (batched) -> predict (batched)
-> decision and fallback policy -> respond. Also explanations and durable async tasks."""

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from typing import Annotated, Any, cast

import bentoml
from fastapi import FastAPI, Header, WebSocket
from pydantic_core import to_json
from starlette.responses import JSONResponse, Response

from api.answers import Scored, predictions
from api.background import Background
from api.contract import (
    API_PREFIX,
    ROUTE_ERRORS,
    SSE_EVENT,
    DriftReport,
    ModelInfo,
    RoutingChange,
    RoutingInfo,
    RoutingSpec,
    TaskInfo,
    contract_for,
)
from api.direct import DirectRoutes, bentoml_api
from api.errors import (
    Conflict,
    ContractMiddleware,
    Forbidden,
    InferenceFailed,
    InferenceTimeout,
    NotFound,
    PayloadTooLarge,
    admin_refusal,
    error_response,
    json_response,
)
from api.onnx_file import RESPONSES as ONNX_RESPONSES
from api.onnx_file import OnnxFiles
from api.openapi import OpenAPIDocument
from api.prediction_log import PredictionLog
from api.routing import RoutingError, data_digest, initial_routing, model_info
from api.scorer import Runners, Scorer
from api.ui import WebPage
from api.v2 import (
    V2_BODIES,
    V2_PREFIX,
    V2_ROUTES,
    OpenInference,
    V2Errors,
    direct_infer,
    open_inference_app,
)
from configuration import current_use_case, get_settings
from configuration.logs import redact_logs
from runners.artifacts import served_model
from runners.batching import bind_apis_once, service_options
from runners.preprocessor import Preprocessor
from runners.sklearn_runner import SklearnRunner
from runners.xgboost_runner import XGBoostRunner

LOG = logging.getLogger(__name__)
SETTINGS = get_settings()
redact_logs(SETTINGS.log_level)  # every worker imports this: no request content in any log line
USE_CASE = current_use_case(SETTINGS)
CONTRACT = contract_for(
    USE_CASE, SETTINGS.explain_max_top_k, SETTINGS.max_batch_rows, SETTINGS.task_max_rows
)
PredictResponse = CONTRACT.PredictResponse
PredictBatchResponse = CONTRACT.PredictBatchResponse
MODEL_RUNNERS = {"xgboost": XGBoostRunner, "sklearn": SklearnRunner}
SERVING_RUNNER = MODEL_RUNNERS[SETTINGS.model_flavor]

ROUTE_BODIES = CONTRACT.route_bodies()
TaskRequest = CONTRACT.TaskRequest
info_app = FastAPI(title="scoring model info")
# the Open Inference Protocol (KServe, Triton, MLServer clients), scored like predict_batch
v2_app = open_inference_app(lambda: bentoml.get_current_service().open_inference)


@bentoml.service(
    name="scoring",
    **service_options(
        SETTINGS,
        SETTINGS.api_workers,
        routes=[
            *(f"{API_PREFIX}/{r}" for r in ("predict", "predict_batch", "explain")),
            f"{V2_PREFIX}/models/",  # the Open Inference Protocol's infer (and metadata)
        ],
        access_log=False,  # ContractMiddleware writes one line per request, safe for PII
        # ContractMiddleware answers 504 at request_timeout_s; BentoML's timeout is a backstop
        timeout_s=SETTINGS.request_timeout_s + 5,
    ),
)
@bentoml.asgi_app(info_app, path=API_PREFIX)
@bentoml.asgi_app(v2_app, path=V2_PREFIX)
class Scoring:
    """Composes the Preprocessor and the model runners; answers with the serving model's name."""

    preprocessor = bentoml.depends(Preprocessor)
    # Only the configured model runner is a dependency: an idle runner would cost a process,
    # its start-up and its memory (the scikit-learn one: 5 s CPU and 280 MB here).
    model = bentoml.depends(SERVING_RUNNER)

    def __init__(self) -> None:
        from runners import lifecycle

        runners = Runners(
            transform=lambda rows: self.preprocessor.to_async.transform(rows),
            predict_proba=lambda x: self.model.to_async.predict_proba(x),
            contributions=lambda x: self.model.to_async.contributions(x),
            load_preprocessor=lambda version: self.preprocessor.to_async.load(version),
            load_model=lambda version: self.model.to_async.load(version),
        )
        routing = initial_routing(SETTINGS, served_model(SERVING_RUNNER))
        self.scorer = Scorer(SETTINGS, USE_CASE, runners, routing)
        self.onnx_files = OnnxFiles(SETTINGS, USE_CASE.contract_version)
        self.prediction_log = PredictionLog(
            SETTINGS, USE_CASE, functools.partial(data_digest, SETTINGS)
        )
        self.open_inference = OpenInference(
            USE_CASE,
            CONTRACT,
            SETTINGS.max_batch_rows,
            score=lambda rows: self._score_instances(rows, route="v2"),
            ready=self.__is_ready__,
            serving=lambda: self.scorer.routing.champion.ref,
        )
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
        from api.webhooks import DeliveryStore, WebhookSender

        self.deliveries = DeliveryStore(
            self.tasks,
            max_attempts=SETTINGS.webhook_max_attempts,
            backoff_s=SETTINGS.webhook_backoff_s,
            backoff_cap_s=SETTINGS.webhook_backoff_cap_s,
        )
        senders = (WebhookSender(self.deliveries, SETTINGS).run,) if SETTINGS.webhook_secret else ()
        self.runner_probe = lifecycle.RunnerProbe(
            lambda: {"preprocessor": self.preprocessor, "model": self.model}
        )
        self.background = Background(
            SETTINGS,
            self.scorer,
            self.tasks,
            self.routing_table,
            lambda rows: self._score_instances(rows, route="task"),
            also=(self.runner_probe.run, *senders),
        )
        self.draining = lifecycle.draining
        lifecycle.start_worker(SETTINGS.drain_s)  # in a worker: exit with it, drain on SIGTERM
        bind_apis_once(self)
        lifecycle.settle_heap(SETTINGS.gc_young_objects)  # start-up objects stay out of collections

    # ---- background work: warm-up (readiness), async tasks, routing set by admin calls -------
    @bentoml.on_startup
    async def start_background_work(self) -> None:
        self.background.start()

    @bentoml.on_shutdown
    async def stop_background_work(self) -> None:
        await self.background.stop()
        self.tasks.close()
        self.prediction_log.close()  # the lines still queued are written

    @bentoml.on_deployment
    @staticmethod
    def prepare_server_process() -> None:
        """In the `bentoml serve` process, before its workers start: Ctrl-C stops them at
        once (SIGTERM drains), the runners' sockets outlive the drain (runners/lifecycle.py)."""
        from runners import lifecycle

        lifecycle.prepare_server_process()

    def __is_ready__(self) -> bool:
        # warmed up, every runner answers (cached by RunnerProbe), and no SIGTERM yet
        return self.background.ready and self.runner_probe.ready and not self.draining()

    # ---- scoring ---------------------------------------------------------------------------
    def _response(
        self,
        row: dict[str, Any],
        scored: Scored,
        explanation: dict[str, Any] | None = None,
        explanation_status: str | None = None,
    ) -> dict[str, Any]:
        return {
            "prediction": predictions(USE_CASE, [row], scored.decisions, scored.arms)[0],
            "model": scored.routing.champion.ref,
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
        scored = await self.scorer.score([row])
        if not explain:
            return self._answer("predict", row, self._response(row, scored), started)
        try:
            explanation = await asyncio.wait_for(
                self.scorer.explain(row, scored, top_k), SETTINGS.explain_budget_ms / 1000
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
        scored = await self.scorer.score([row])
        try:
            explanation = await asyncio.wait_for(
                self.scorer.explain(row, scored, top_k), SETTINGS.inference_deadline_ms / 1000
            )
        except TimeoutError:
            return error_response(InferenceTimeout("the explanation did not finish in time"))
        if explanation is None:
            reason = scored.decisions.reasons[0]
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
        valid, errors = CONTRACT.validate_rows(instances)
        answers: list[Any] = [None] * len(instances)
        model = self.scorer.routing.champion.ref
        if valid:
            rows = [row for _, row in valid]
            scored = await self.scorer.score(rows)
            model = scored.routing.champion.ref
            answered = predictions(USE_CASE, rows, scored.decisions, scored.arms)
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
        request: TaskRequest,  # type: ignore[valid-type]
        idempotency_key: Annotated[str | None, Header(max_length=128)] = None,
    ) -> Response:
        """Queue rows for scoring; the task id comes back at once (202; 200 when the
        Idempotency-Key names a task already submitted with this payload)."""
        rows: list[Any] = request.instances  # type: ignore[attr-defined]
        if len(rows) > SETTINGS.task_max_rows:
            message = f"{len(rows)} rows exceed the cap of {SETTINGS.task_max_rows}"
            return error_response(PayloadTooLarge(message))
        from api.egress import RefusedURL, check_url
        from api.tasks import IdempotencyConflict

        webhook = request.webhook  # type: ignore[attr-defined]
        if webhook is not None:
            if SETTINGS.webhook_secret is None:
                return error_response(Forbidden("webhooks are off: no webhook secret is set"))
            try:
                await check_url(webhook.url, tuple(SETTINGS.webhook_allowed_hosts))
            except RefusedURL as exc:
                return error_response(Forbidden(f"webhook.url refused: {exc}"))
        subscription = None if webhook is None else (webhook.url, tuple(webhook.events))
        try:
            task, created = await asyncio.to_thread(
                self.tasks.submit, to_json(rows), len(rows), idempotency_key, subscription
            )
        except IdempotencyConflict as exc:
            return error_response(Conflict(str(exc)))
        body = await self._task_body(task)
        return JSONResponse(body, status_code=202 if created else 200)

    async def _task_body(self, task: Any) -> dict[str, Any]:
        """TaskInfo: the task, its links and its webhook's deliveries."""
        from api.tasks import task_body

        body = task_body(task, USE_CASE.contract_version, API_PREFIX)
        if (webhook := await asyncio.to_thread(self.tasks.webhook, task.id)) is not None:
            deliveries = await asyncio.to_thread(self.deliveries.of_task, task.id)
            body["webhook"] = {"url": webhook[0], "events": webhook[1], "deliveries": deliveries}
        return body

    @info_app.get("/tasks/{task_id}", response_model=TaskInfo)
    async def task_status(self, task_id: str) -> Response:
        """A task's status: queued, running, succeeded or failed (404 once expired), and the
        deliveries of its webhook."""
        task = await asyncio.to_thread(self.tasks.get, task_id)
        if task is None:
            return error_response(NotFound("no such task (unknown, or past retention)"))
        return JSONResponse(await self._task_body(task))

    @info_app.get(
        "/tasks/{task_id}/events",
        response_class=Response,
        responses={200: {"content": {"text/event-stream": {"schema": SSE_EVENT}}}},
    )
    async def task_events(
        self,
        task_id: str,
        last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
    ) -> Response:
        """The task's events as server-sent events, as they are stored: `progress` (rows_done,
        rows_total), `predictions` (each scored chunk in predict_batch's shape, `start` its first
        row), then one `completed` or `failed`, and the stream ends. Each has an `id`: send the
        last one received as `Last-Event-ID` to resume after it. Comments keep idle streams
        open."""
        from sse_starlette import EventSourceResponse

        from api.streams import sse_events

        if await asyncio.to_thread(self.tasks.get, task_id) is None:
            return error_response(NotFound("no such task (unknown, or past retention)"))
        after = int(last_event_id) if last_event_id and last_event_id.isdigit() else 0
        events = sse_events(self.tasks, task_id, after, SETTINGS.events_poll_s)
        return EventSourceResponse(events, ping=SETTINGS.events_heartbeat_s)

    @info_app.websocket("/ws")
    async def score_socket(self, websocket: WebSocket) -> None:
        """Rows in, each prediction out as soon as it is scored (api/streams.py)."""
        from api.streams import ScoringSocket

        score = lambda rows: self._score_instances(rows, route="ws")  # noqa: E731
        await ScoringSocket(websocket, score, self.tasks, SETTINGS).serve()

    @info_app.get("/tasks/{task_id}/result", response_model=PredictBatchResponse)
    async def task_result(self, task_id: str) -> Response:
        """The finished task's predictions, in predict_batch's shape (409 until it succeeded)."""
        task = await asyncio.to_thread(self.tasks.get, task_id)
        if task is None:
            return error_response(NotFound("no such task (unknown, or past retention)"))
        if task.status != "succeeded":
            return error_response(Conflict(f"task {task_id} is {task.status}, not succeeded"))
        result = await asyncio.to_thread(self.tasks.result, task_id)
        return Response(result, media_type="application/json")

    @info_app.get("/model", response_model=ModelInfo)
    def model_info(self) -> ModelInfo:
        """What is serving now: use case, the champion and challenger with registry versions,
        aliases, run ids and metrics, and how traffic is shared."""
        return model_info(SETTINGS, USE_CASE, self.scorer.routing)

    @info_app.get("/model.onnx", response_class=Response, responses=ONNX_RESPONSES)
    async def model_onnx(self, if_none_match: Annotated[str | None, Header()] = None) -> Response:
        """The champion's ONNX graph: its preprocessing and model in one graph, for scoring at
        the edge or in a browser (docs/onnx.md); 404 when it has none (refused by the parity
        gate at training, or not exported)."""
        champion = self.scorer.routing.champion.model
        return await asyncio.to_thread(self.onnx_files.response, champion, if_none_match)

    @info_app.get("/drift", response_model=DriftReport)
    async def drift(self) -> Response:
        """PSI of the recent rows the champion answered against its training reference, per
        feature and for the score, and a status against the configured thresholds."""
        return JSONResponse(self.scorer.monitor.drift_report())

    # ---- admin: swap versions without a restart (bearer token; off without one) -------------
    @info_app.get("/admin/routing", response_model=RoutingInfo)
    def get_routing(self, authorization: Annotated[str | None, Header()] = None) -> Response:
        """The routing this worker serves."""
        if (refused := admin_refusal(authorization, SETTINGS.admin_token)) is not None:
            return refused
        return JSONResponse(RoutingInfo(**self.scorer.routing.public()).model_dump(mode="json"))

    @info_app.put("/admin/routing", response_model=RoutingChange)
    async def set_routing(
        self, change: RoutingSpec, authorization: Annotated[str | None, Header()] = None
    ) -> Response:
        """Serve other imported versions (e.g. roll back to the previous champion): the models
        are loaded, verified and warmed before an atomic swap; requests in flight finish with
        the versions they started with. Other API workers follow within `routing_poll_s`."""
        if (refused := admin_refusal(authorization, SETTINGS.admin_token)) is not None:
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
    OpenAPIDocument, path="/docs.json", errors=ROUTE_ERRORS, bodies={**ROUTE_BODIES, **V2_BODIES}
)
cast(Any, Scoring).add_asgi_middleware(  # a bentoml.Service at run time
    ContractMiddleware,
    routes={**ROUTE_ERRORS, **V2_ROUTES},
    prefix=API_PREFIX,
    protocols={V2_PREFIX: V2Errors(USE_CASE.contract_version)},
    max_body_bytes=SETTINGS.max_body_bytes,
    contract_version=USE_CASE.contract_version,
    max_concurrency=SETTINGS.api_max_concurrency,
    timeout_s=SETTINGS.request_timeout_s,
    body_limits={f"{API_PREFIX}/tasks": SETTINGS.task_max_body_bytes},
    streams=frozenset((f"{API_PREFIX}/tasks/{{task_id}}/events",)),
)
# the page at /ui, inside ContractMiddleware: one access line per request there too
cast(Any, Scoring).add_asgi_middleware(
    WebPage, key=USE_CASE.key, examples=[dict(e) for e in USE_CASE.examples]
)


# the scoring routes, inside ContractMiddleware, without the router and request wrappers in front
SERVER = f"BentoML Service/{cast(Any, Scoring).name}"  # the header BentoML's wrapper sets


def _caller(name: str) -> Callable[[], Any]:
    return lambda: getattr(bentoml.get_current_service(), name).local


cast(Any, Scoring).add_asgi_middleware(
    DirectRoutes,
    routes={
        api.route: bentoml_api(api.input_spec, _caller(name), SERVER)
        for name, api in cast(Any, Scoring).apis.items()
    },
    patterns=[direct_infer(lambda: bentoml.get_current_service().open_inference)],
    enabled=SETTINGS.direct_routes,
)
