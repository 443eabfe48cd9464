"""The HTTP contract of a use case: strict pydantic request and response models built from YAML."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    ValidationError,
    create_model,
)

from configuration.policy import FallbackReason
from configuration.use_case import FeatureSpec, UseCase

API_PREFIX = "/v1"
VERSION = r"^[1-9][0-9]{0,9}$"  # an MLflow registry version
# the error statuses each route can answer, declared in the OpenAPI document (500 always, 415
# wherever there is a body) and the methods ContractMiddleware allows on each path
ROUTE_ERRORS: dict[str, dict[str, tuple[int, ...]]] = {
    f"{API_PREFIX}/predict": {"post": (400, 413, 429, 504)},
    f"{API_PREFIX}/predict_batch": {"post": (400, 413, 429, 504)},
    f"{API_PREFIX}/explain": {"post": (400, 413, 429, 503, 504)},
    f"{API_PREFIX}/model": {"get": (429,)},
    f"{API_PREFIX}/model.onnx": {"get": (404, 429)},
    f"{API_PREFIX}/drift": {"get": (429,)},
    f"{API_PREFIX}/tasks": {"post": (400, 403, 409, 413, 429, 504)},
    f"{API_PREFIX}/tasks/{{task_id}}": {"get": (404, 429)},
    f"{API_PREFIX}/tasks/{{task_id}}/result": {"get": (404, 409, 429)},
    f"{API_PREFIX}/tasks/{{task_id}}/events": {"get": (404, 429)},
    # a WebSocket (not in the OpenAPI document): 429 instead of the handshake over the limit
    f"{API_PREFIX}/ws": {"get": (429,)},
    f"{API_PREFIX}/admin/routing": {"get": (401, 403, 404), "put": (400, 401, 403, 404, 503)},
}
STRICT = ConfigDict(extra="forbid", strict=True, frozen=True)
# Request bodies: unknown top-level fields refused, no coercion ("yes" is not a boolean).
REQUEST = ConfigDict(extra="forbid", strict=True, protected_namespaces=())


def _feature_field(spec: FeatureSpec, required: bool) -> tuple[Any, Any]:
    """(type, FieldInfo) of one feature: bounds, categories and the description in OpenAPI."""
    description = spec.description + (" (personal data: never a model input)" if spec.pii else "")
    constraints: dict[str, Any] = {}
    kind: Any
    if spec.type == "numeric":
        kind = float
        constraints = {"ge": spec.min, "le": spec.max, "allow_inf_nan": False}
    elif spec.type == "categorical":
        kind = Literal[spec.categories]  # type: ignore[valid-type]
    elif spec.type == "boolean":
        kind = bool
    else:
        kind = str
        constraints = {"max_length": spec.max_length}
    if required:
        return kind, Field(..., description=description, **constraints)
    return kind | None, Field(None, description=description, **constraints)


class ModelRef(BaseModel):
    """Which model made an answer."""

    model_config = ConfigDict(frozen=True, protected_namespaces=())

    name: str = Field(description="Registered model name (MLflow and BentoML).")
    version: str = Field(description="MLflow Model Registry version.")
    alias: str = Field(description="Registry alias this version was imported under.")
    flavor: Literal["xgboost", "sklearn"]
    bento_tag: str = Field(description="Tag of the model in the BentoML store.")


class StoredModel(BaseModel):
    """One model as imported into the BentoML store, with its lineage."""

    model_config = ConfigDict(frozen=True, protected_namespaces=())

    bento_tag: str
    registered_name: str
    registered_version: str
    alias: str
    run_id: str
    sha256: str = Field(description="SHA-256 of the model file, verified before loading.")
    imported_at: str
    metrics: dict[str, float] = Field(default_factory=dict, description="Held-out metrics.")
    data_sha256: str | None = Field(
        None,
        description="SHA-256 of the whole training table (as CSV, every row) this version was "
        "trained on; null for an import from before data lineage.",
    )
    data_rows: int | None = Field(None, description="Rows of that table (training + held out).")

    @classmethod
    def of(cls, model: Any) -> StoredModel:
        """The lineage of a `bentoml.Model` as its import recorded it."""
        labels, metadata = model.info.labels, model.info.metadata
        rows = metadata.get("data_rows")
        return cls(
            bento_tag=str(model.tag),
            registered_name=labels["registered_name"],
            registered_version=labels["registered_version"],
            alias=labels["alias"],
            run_id=labels["run_id"],
            sha256=metadata["sha256"],
            imported_at=metadata["imported_at"],
            metrics=metadata.get("metrics", {}),
            data_sha256=labels.get("data_sha256") or None,
            data_rows=int(rows) if rows else None,
        )


class RoutingInfo(BaseModel):
    """Which versions answer, and how traffic is shared between them."""

    model_config = ConfigDict(frozen=True, protected_namespaces=())

    champion: ModelRef
    challenger: ModelRef | None = None
    mode: Literal["off", "split", "shadow"] = Field(
        description="split: `share` of request keys get the challenger's answer (sticky); "
        "shadow: the challenger scores every row too, measured, never returned."
    )
    share: float


class RoutingSpec(BaseModel):
    """The versions to serve: MLflow registry versions of the serving flavor, imported into
    the model store (the Bento packs the newest `packed_versions`)."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        protected_namespaces=(),
        json_schema_extra={"examples": [{"champion": "1"}]},
    )

    champion: str = Field(pattern=VERSION, description="Registry version that answers.")
    challenger: str | None = Field(
        None, pattern=VERSION, description="Registry version of the challenger."
    )
    mode: Literal["off", "split", "shadow"] = "off"
    share: float = Field(0.0, ge=0, le=1, description="Share of keys for the challenger (split).")


class RoutingChange(RoutingInfo):
    swap_s: float = Field(description="Seconds to load, verify and warm the versions and swap.")


WebhookEvent = Literal["completed", "failed"]
# one server-sent event as a client reads it: `data` is JSON text
SSE_EVENT = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "pattern": "^[0-9]+$"},
        "event": {"enum": ["predictions", "progress", "completed", "failed"]},
        "data": {"type": "string", "contentMediaType": "application/json"},
    },
    "required": ["id", "event", "data"],
}


class WebhookSpec(BaseModel):
    """Where to deliver the task's terminal events: a signed POST (Standard Webhooks)."""

    model_config = REQUEST

    url: str = Field(
        max_length=2048,
        # printable ASCII only: one meaning in every regex engine (pydantic's, hypothesis')
        pattern=r"^https?://[!-~]+$",
        description="http(s) URL whose host is on the service's allowlist and resolves to a "
        "public address (else 403).",
    )
    events: list[WebhookEvent] = Field(
        ["completed", "failed"], min_length=1, max_length=2, description="Events to deliver."
    )


class WebhookAttempt(BaseModel):
    at: str
    status_code: int | None = Field(description="The receiver's answer; null if none came.")
    error: str | None = None


class WebhookDelivery(BaseModel):
    webhook_id: str = Field(description="The `webhook-id` header: the same on every retry.")
    event: WebhookEvent
    status: Literal["pending", "delivered", "failed"]
    attempts: list[WebhookAttempt]
    next_attempt_at: str | None
    delivered_at: str | None


class TaskWebhook(BaseModel):
    url: str
    events: list[WebhookEvent]
    deliveries: list[WebhookDelivery]


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
    links: dict[str, str] = Field(description="status, result and events (the event stream).")
    webhook: TaskWebhook | None = Field(None, description="Deliveries of the task's webhook.")


class DriftReport(BaseModel):
    status: Literal["ok", "warning", "drift", "insufficient_data", "unavailable"]
    model_version: str = Field(description="The champion whose reference is compared.")
    window_rows: int
    min_rows: int
    thresholds: dict[str, float] = Field(description="PSI from which a status is warning/drift.")
    features: dict[str, float] = Field(description="PSI per model feature.")
    score: float | None = Field(description="PSI of the model's score.")
    drifting: list[str] = Field(description="Features (and `score`) at or over the warning.")


class ModelInfo(BaseModel):
    """What is serving."""

    model_config = ConfigDict(frozen=True, protected_namespaces=())

    use_case: str
    task: Literal["binary", "multiclass"]
    classes: list[str]
    decision_threshold: float
    contract_version: int
    serving: ModelRef = Field(description="The champion.")
    routing: RoutingInfo
    models: dict[str, StoredModel] = Field(description="The champion's models by component.")


class Contribution(BaseModel):
    """One raw feature's share of the margin (its one-hot columns summed)."""

    feature: str
    value: Any = Field(description="The request's value of the feature.")
    contribution: float = Field(description="Added to the margin (log-odds for binary).")


class Explanation(BaseModel):
    """Why the model answered as it did: `base_value` + every feature's contribution = `margin`
    (the top `top_k` features are listed, `rest` sums the others)."""

    explained_class: str = Field(description="Binary: the positive class; else the answered one.")
    base_value: float = Field(description="The model's margin before any feature.")
    margin: float = Field(description="The model's raw output: log-odds for binary tasks.")
    contributions: list[Contribution] = Field(description="Largest absolute contributions first.")
    rest: float = Field(description="Sum of the contributions not listed.")


class RowError(BaseModel):
    """Why one row was not scored."""

    index: int = Field(description="Position of the row in the request, from 0.")
    code: str = Field(description="Machine-readable reason, e.g. invalid_input, inference_failed.")
    message: str = Field(description="What is wrong, naming the field.")
    details: list[dict[str, Any]] = Field(default_factory=list)


def _no_text_or_bool(value: Any) -> Any:
    if isinstance(value, str | bool):
        raise ValueError("Input should be a valid integer")
    return value


class Contract:
    """The request and response models of one use case, built once and cached."""

    def __init__(
        self,
        use_case: UseCase,
        max_top_k: int = 50,
        max_batch_rows: int = 1000,
        max_task_rows: int = 100_000,
    ) -> None:
        self.use_case = use_case
        title = "".join(part.capitalize() for part in use_case.name.split("_"))
        fields: dict[str, Any] = {}
        for spec in use_case.features:
            required = not (spec.nullable or spec.pii or spec.name == use_case.key)
            fields[spec.name] = _feature_field(spec, required)
        examples = [dict(e) for e in use_case.examples]
        self.Row: type[BaseModel] = create_model(
            f"{title}Row",
            __config__=ConfigDict(
                extra="forbid",
                strict=True,
                frozen=True,
                title=f"{title}Row",
                json_schema_extra={"example": examples[0]} if examples else None,
            ),
            __doc__=f"One {use_case.name} row: {use_case.description.strip()}",
            **fields,
        )
        classes = use_case.target.classes
        label_type: Any = Literal[classes]  # type: ignore[valid-type]
        source_type: Any = Literal["model", "fallback"]
        arm_type: Any = Literal["champion", "challenger"]
        reason_type: Any = FallbackReason | None
        explanation_status_type: Any = Literal["ok", "timeout", "unavailable"] | None
        self.Prediction: type[BaseModel] = create_model(
            f"{title}Prediction",
            __config__=ConfigDict(frozen=True),
            __doc__="The answer for one row: the model's, or the use case's deterministic "
            "fallback (`source` says which, `fallback_reason` why).",
            key=(str | None, Field(None, description=f"The request's {use_case.key or 'key'}.")),
            label=(
                label_type | None,
                Field(description="Answered class; null for a 'no decision' fallback."),
            ),
            probabilities=(
                dict[str, float] | None,
                Field(
                    description=f"Probability per class, for classes {list(classes)}; null when "
                    "the answer is a fallback without probabilities (rule, no decision)."
                ),
            ),
            score=(
                float | None,
                Field(
                    description="Probability of the positive class (binary) or of the answered "
                    "class (multiclass); null with `probabilities`."
                ),
            ),
            confidence=(
                float | None,
                Field(
                    description="The model's probability of the label it decided; null when "
                    "the model did not answer."
                ),
            ),
            source=(source_type, Field(description="Who answered.")),
            fallback_reason=(
                reason_type,
                Field(description="Why the answer is a fallback; null for a model answer."),
            ),
            arm=(arm_type, Field(description="Which arm answered: champion or challenger.")),
            model_version=(str, Field(description="Registry version of the model that answered.")),
        )
        self.PredictResponse: type[BaseModel] = create_model(
            f"{title}PredictResponse",
            __config__=ConfigDict(frozen=True, protected_namespaces=()),
            prediction=(self.Prediction, ...),
            model=(ModelRef, ...),
            contract_version=(int, Field(description="Version of this request/response contract.")),
            explanation=(
                Explanation | None,
                Field(None, description="Present when asked for (explain) and within budget."),
            ),
            explanation_status=(
                explanation_status_type,
                Field(
                    None,
                    description="null when no explanation was asked for; timeout when it did "
                    "not finish within the budget; unavailable when the model had no answer.",
                ),
            ),
        )
        self.PredictBatchResponse: type[BaseModel] = create_model(
            f"{title}PredictBatchResponse",
            __config__=ConfigDict(frozen=True, protected_namespaces=()),
            predictions=(
                list[self.Prediction | None],  # type: ignore[name-defined]
                Field(description="One entry per request row, in order; null where it failed."),
            ),
            errors=(list[RowError], Field(description="Rows that were not scored, by index.")),
            model=(ModelRef, ...),
            contract_version=(int, ...),
        )
        top_k: Any = (
            Annotated[int, BeforeValidator(_no_text_or_bool)],
            Field(
                5,
                ge=1,
                le=max_top_k,
                strict=False,  # JSON Schema's integer: 14.0 is one, "14" and true are not
                description="Features listed in the explanation.",
            ),
        )
        instance: Any = (self.Row, Field(description="The row to score."))
        self.PredictRequest: type[BaseModel] = create_model(
            f"{title}PredictRequest",
            __config__=REQUEST,
            instance=instance,
            explain=(
                bool,
                Field(False, description="Add the explanation if it fits the time budget."),
            ),
            top_k=top_k,
        )
        self.ExplainRequest: type[BaseModel] = create_model(
            f"{title}ExplainRequest", __config__=REQUEST, instance=instance, top_k=top_k
        )
        # Any JSON value is accepted as an item: each is validated on its own, and one that is
        # not a valid row (not even an object) is reported by index while its neighbours score.
        item: Any = Annotated[self.Row | JsonValue, Field(union_mode="left_to_right")]
        self.PredictBatchRequest: type[BaseModel] = create_model(
            f"{title}PredictBatchRequest",
            __config__=REQUEST,
            instances=(
                list[item],
                Field(
                    description=f"Rows to score (at most {max_batch_rows}, else 413), each a "
                    f"{self.Row.__name__}; a row that is not valid is reported by index in "
                    "`errors` and its neighbours are scored."
                ),
            ),
        )

        self.TaskRequest: type[BaseModel] = create_model(
            "TaskRequest",
            __config__=REQUEST,
            instances=(
                list[JsonValue],
                Field(
                    description=f"Rows to score (at most {max_task_rows}, else 413), each a "
                    f"{self.Row.__name__}; validated one by one when the task runs, invalid "
                    "rows reported by index in the result.",
                    json_schema_extra={"items": {"anyOf": [self.Row.model_json_schema(), {}]}},
                ),
            ),
            webhook=(
                WebhookSpec | None,
                Field(None, description="Deliver the task's completion to this URL, signed."),
            ),
        )

    def route_bodies(self) -> dict[str, tuple[type[BaseModel], type[BaseModel]]]:
        """Request and response models of BentoML's routes, published in place of what it
        infers."""
        return {
            f"{API_PREFIX}/predict": (self.PredictRequest, self.PredictResponse),
            f"{API_PREFIX}/explain": (self.ExplainRequest, self.PredictResponse),
            f"{API_PREFIX}/predict_batch": (self.PredictBatchRequest, self.PredictBatchResponse),
        }

    def validate_rows(
        self, instances: list[Any]
    ) -> tuple[list[tuple[int, dict[str, Any]]], list[RowError]]:
        """Each item on its own: ([(index, row)] of the valid ones, the errors of the others).
        An item already parsed as a Row (with the request body) is valid; any other value is
        validated alone, so that its errors name its fields, and never its neighbours'."""
        valid: list[tuple[int, dict[str, Any]]] = []
        errors: list[RowError] = []
        for index, raw in enumerate(instances):
            if isinstance(raw, self.Row):
                valid.append((index, dict(raw.__dict__)))  # flat: no model_dump walk
                continue
            try:
                valid.append((index, dict(self.Row.model_validate(raw).__dict__)))
            except ValidationError as exc:
                details = exc.errors(include_url=False, include_input=False, include_context=False)
                message = "; ".join(
                    f"{'.'.join(str(p) for p in d['loc']) or 'row'}: {d['msg']}" for d in details
                )
                errors.append(
                    RowError(index=index, code="invalid_input", message=message, details=details)
                )
        return valid, errors


_CONTRACTS: dict[tuple[str, str, int, int, int], Contract] = {}


def contract_for(
    use_case: UseCase, max_top_k: int = 50, max_batch_rows: int = 1000, max_task_rows: int = 100_000
) -> Contract:
    """The contract of a use case, built once per use case file content and limits."""
    cache_key = (use_case.name, use_case.source_sha256, max_top_k, max_batch_rows, max_task_rows)
    if cache_key not in _CONTRACTS:
        _CONTRACTS[cache_key] = Contract(use_case, max_top_k, max_batch_rows, max_task_rows)
    return _CONTRACTS[cache_key]
