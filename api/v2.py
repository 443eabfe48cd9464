"""The Open Inference Protocol (V2) over REST, as KServe, Triton and MLServer speak it: health,
model metadata and `infer` with one named input per feature. Rows go through the contract and
then `/v1/predict_batch`'s own scoring (runners, batching, fallbacks, metrics, prediction log);
errors are the protocol's `{"error": "..."}`, never quoting request values."""

from __future__ import annotations

import logging
import re
import struct
import uuid
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, WithJsonSchema
from pydantic_core import to_json
from starlette.responses import PlainTextResponse, Response
from starlette.types import Scope

from api.contract import Contract, ModelRef, RowError
from api.direct import Direct
from api.errors import (
    MASKED_MESSAGE,
    ErrorShape,
    InferenceFailed,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    ScoringError,
    normalise,
)
from configuration import UseCase

LOG = logging.getLogger(__name__)
V2_PREFIX = "/v2"
# the datatype each feature type is declared with in the metadata, and those it accepts
DECLARED = {"numeric": "FP64", "categorical": "BYTES", "text": "BYTES", "boolean": "BOOL"}
INTEGERS = {
    f"{kind}{bits}": f"<{kind[0].lower()}{bits // 8}"
    for kind in ("INT", "UINT")
    for bits in (8, 16, 32, 64)
}
FLOATS = {"FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}
NUMPY_TYPES = {"BOOL": "?", **INTEGERS, **FLOATS}  # little-endian, for the binary extension
ACCEPTED = {
    "numeric": frozenset((*INTEGERS, *FLOATS)),  # JSON numbers: any numeric type, widened
    "categorical": frozenset(("BYTES",)),
    "text": frozenset(("BYTES",)),
    "boolean": frozenset(("BOOL",)),
}
Datatype = Literal[
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BF16", "BYTES",
]  # fmt: skip
# every field of a /v1 prediction but `key` and `probabilities` is an output of its own
ROW_OUTPUTS = {
    "label": "BYTES",
    "score": "FP64",
    "confidence": "FP64",
    "source": "BYTES",
    "fallback_reason": "BYTES",
    "arm": "BYTES",
    "model_version": "BYTES",
}
Scalar = int | float | str | bool | None  # an element of a tensor
# Tensor data and parameters are published with these types but parsed as any JSON (5x faster
# than checking each element against a union here); the contract checks each value after.
SCALAR = {"type": ["number", "string", "boolean", "null"]}
Data = Annotated[
    list[Any],
    WithJsonSchema(
        {"type": "array", "items": {"anyOf": [SCALAR, {"type": "array", "items": SCALAR}]}}
    ),
]
Parameters = Annotated[  # the protocol's: a string, number or boolean each
    dict[str, Any],
    WithJsonSchema(
        {"type": "object", "additionalProperties": {"type": ["number", "string", "boolean"]}}
    ),
]
REQUEST_ID = r"^[A-Za-z0-9._:-]{1,64}$"
BINARY_HEADER = "inference-header-content-length"  # Triton's binary tensor data extension
# the infer route's paths (MODEL_PATHS + /infer under V2_PREFIX), path parameters by name
INFER_PATH = re.compile(
    f"{V2_PREFIX}/models/(?P<model_name>[^/]+)(?:/versions/(?P<model_version>[^/]+))?/infer"
)
BINARY_SIZE = "binary_data_size"
LENGTH = struct.Struct("<I")  # a BYTES element's length in binary data
NOT_READY = "the model is not ready (starting, a runner unreachable, or stopping)"
MAX_ROW_ERRORS = 3

# path template -> {method: the error statuses it can answer}: ContractMiddleware's route table
# (405 with Allow, the access line's route) and the responses in the OpenAPI document
MODEL_PATHS = ("/models/{model_name}", "/models/{model_name}/versions/{model_version}")
V2_ROUTES: dict[str, dict[str, tuple[int, ...]]] = {
    f"{V2_PREFIX}/health/live": {"get": (429,)},
    f"{V2_PREFIX}/health/ready": {"get": (429, 503)},
    **{f"{V2_PREFIX}{path}": {"get": (404, 429)} for path in MODEL_PATHS},
    **{f"{V2_PREFIX}{path}/ready": {"get": (404, 429, 503)} for path in MODEL_PATHS},
    **{f"{V2_PREFIX}{path}/infer": {"post": (400, 404, 413, 429, 504)} for path in MODEL_PATHS},
}
WHEN = {
    400: "Invalid input: not JSON, not an inference request, an unknown or missing input, a "
    "wrong datatype or shape, or a value outside the contract (the row and feature are named).",
    404: "No such model, or not its version.",
    413: "The body or the number of rows is over the limit.",
    429: "The service is at its concurrency limit: retry later.",
    500: "An internal error; logged, never detailed in the response.",
    503: "Not ready: starting, a runner unreachable, or stopping.",
    504: "The request did not finish within the service's timeout.",
}


class ProtocolError(BaseModel):
    """Every error of the V2 routes, as the protocol words it."""

    error: str = Field(description="What went wrong; request values are never quoted.")


class TensorInput(BaseModel):
    """One input: a feature's values for every row, in row order (row-major; nested arrays are
    flattened). `null` is a missing value."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(description="A feature of the model (its metadata lists them).")
    shape: list[Annotated[int, Field(ge=0)]] = Field(
        min_length=1, max_length=2, description="[rows] or [rows, 1]."
    )
    datatype: Datatype = Field(
        description="BYTES for categorical and text features, BOOL for booleans; numeric "
        "features take FP64 or any other numeric type."
    )
    parameters: Parameters | None = Field(
        None, description="`binary_data_size` for the binary tensor data extension; others ignored."
    )
    data: Data | None = Field(
        None,
        description="The values, flat or one array per row; left out only when they come as "
        "binary data.",
    )


class TensorOutputRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(description="An output of the model (its metadata lists them).")
    parameters: Parameters | None = Field(
        None, description="Ignored: outputs are always JSON (`binary_data` too)."
    )


class InferenceRequest(BaseModel):
    """Rows to score as one input tensor per feature, all with the same number of rows."""

    model_config = ConfigDict(extra="forbid", strict=True)

    id: str | None = Field(
        None,
        pattern=REQUEST_ID,
        description="Returned in the response (at most 64 of `A-Za-z0-9._:-`).",
    )
    parameters: Parameters | None = Field(
        None,
        description="`content_type` may be `pd` (MLServer's pandas codec: one input per column, "
        "what this endpoint takes anyway); others are ignored.",
    )
    inputs: list[TensorInput] = Field(min_length=1, description="One per feature given.")
    outputs: list[TensorOutputRequest] | None = Field(
        None, description="The outputs to answer; all of them when left out or empty."
    )


class TensorOutput(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: list[Scalar] = Field(description="Row-major; `null` where there is no value.")


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str = Field(description="The registry version of the champion.")
    id: str = Field(description="The request's `id`, else a new one.")
    outputs: list[TensorOutput]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, bool | list[str]] = Field(
        description="Inputs: `optional` (may be left out, or null); probabilities: `classes`, "
        "the order of its columns."
    )


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ServerLive(BaseModel):
    live: bool


class Readiness(BaseModel):
    ready: bool


class ModelReadiness(BaseModel):
    name: str
    ready: bool


V2_BODIES = {f"{V2_PREFIX}{p}/infer": (InferenceRequest, InferenceResponse) for p in MODEL_PATHS}


class V2Errors(ErrorShape):
    """The protocol's error body, `{"error": "..."}`, for ContractMiddleware. No 415: clients
    such as tritonclient send no Content-Type; a body that is not JSON is a 400."""

    json_only = False

    def body(self, status: int, message: str) -> dict[str, Any]:
        return {"error": message}

    def rewrite(self, status: int, payload: Any) -> dict[str, Any]:
        if isinstance(payload, dict) and isinstance(payload.get("error"), str):
            return {"error": payload["error"]}  # ours: only this module answers /v2
        if status >= 500:
            return {"error": MASKED_MESSAGE}
        return {"error": normalise(status, payload)["error"]["message"]}


class OpenInference:
    """The protocol over one use case: its metadata, and `infer` as rows for `score` (predict
    batch's scoring, which answers its response body) and its answer back as tensors."""

    def __init__(
        self,
        use_case: UseCase,
        contract: Contract,
        max_rows: int,
        score: Callable[[list[Any]], Awaitable[dict[str, Any]]],
        ready: Callable[[], bool],
        serving: Callable[[], ModelRef],
    ) -> None:
        self.use_case = use_case
        self.contract = contract
        self.max_rows = max_rows
        self.score = score
        self.ready = ready
        self.serving = serving  # the champion
        self.features = {f.name: f for f in use_case.features}
        self.required = [n for n, f in contract.Row.model_fields.items() if f.is_required()]
        self.classes = list(use_case.target.classes)
        self.row_list = TypeAdapter(list[contract.Row])  # type: ignore[name-defined]
        self.outputs = {"probabilities": "FP64", **ROW_OUTPUTS}

    # ---- metadata and readiness ------------------------------------------------------------
    def check_model(self, model_name: str, model_version: str | None = None) -> None:
        """NotFound unless `model_name` (and `model_version`, when given) is what serves."""
        if model_name != self.use_case.name:
            raise NotFound("no such model")
        if model_version is not None and model_version != self.serving().version:
            raise NotFound(f"model {model_name} does not serve that version")

    def metadata(self) -> dict[str, Any]:
        model = self.serving()
        return {
            "name": self.use_case.name,
            "versions": [model.version],
            "platform": model.flavor,
            "inputs": [
                {
                    "name": f.name,
                    "datatype": DECLARED[f.type],
                    "shape": [-1, 1],
                    "parameters": {"optional": f.name not in self.required},
                }
                for f in self.use_case.features
            ],
            "outputs": [
                {
                    "name": "probabilities",
                    "datatype": "FP64",
                    "shape": [-1, len(self.classes)],
                    "parameters": {"classes": self.classes},
                },
                *(
                    {"name": n, "datatype": t, "shape": [-1], "parameters": {}}
                    for n, t in ROW_OUTPUTS.items()
                ),
            ],
        }

    # ---- inference ---------------------------------------------------------------------------
    async def infer(self, body: bytes, binary_header: str | None) -> dict[str, Any]:
        """The response to an inference request (the model already checked): every row valid
        and scored, or an InvalidInput naming the first problems."""
        request, buffer = self.parse(body, binary_header)
        wanted = self.wanted_outputs(request)
        rows = self.rows(request, buffer)
        instances, errors = self.validate(rows)
        if errors:
            shown = "; ".join(f"row {e.index}: {e.message}" for e in errors[:MAX_ROW_ERRORS])
            more = len(errors) - MAX_ROW_ERRORS
            raise InvalidInput(shown + (f" (and {more} more rows)" if more > 0 else ""))
        answer = await self.score(instances)
        predictions = answer["predictions"]
        if any(p is None for p in predictions):  # validated above: cannot happen
            raise InferenceFailed("a row could not be scored")
        return {
            "model_name": self.use_case.name,
            "model_version": answer["model"].version,
            "id": request.id or uuid.uuid4().hex,
            "outputs": [self.output(name, predictions) for name in wanted],
        }

    def parse(self, body: bytes, binary_header: str | None) -> tuple[InferenceRequest, bytes]:
        """The request, and the binary data after its JSON (Triton's extension: the header
        gives the JSON's length)."""
        split = len(body)
        if binary_header is not None:
            if not binary_header.isdigit() or int(binary_header) > len(body):
                raise InvalidInput(f"{BINARY_HEADER}: not a length within the body")
            split = int(binary_header)
        try:
            request = InferenceRequest.model_validate_json(body[:split])
        except ValidationError as exc:
            raise InvalidInput(validation_message(exc)) from None
        content_type = (request.parameters or {}).get("content_type")
        if content_type not in (None, "pd"):
            raise InvalidInput("parameters.content_type: only 'pd' (one input per column) is taken")
        return request, body[split:]

    def validate(self, rows: list[dict[str, Any]]) -> tuple[list[BaseModel], list[RowError]]:
        """The rows as the contract's Row models (predict_batch takes them as they are), and
        the errors of those that are not valid, worded as predict_batch words them."""
        try:
            return self.row_list.validate_python(rows), []
        except ValidationError:  # which rows, worded by the contract
            return [], [
                error.model_copy(update={"index": index})
                for index, row in enumerate(rows)
                for error in self.contract.validate_rows([row])[1]
            ]

    def wanted_outputs(self, request: InferenceRequest) -> list[str]:
        if not request.outputs:
            return list(self.outputs)
        wanted: list[str] = []
        for index, output in enumerate(request.outputs):
            if output.name not in self.outputs:
                raise InvalidInput(f"outputs[{index}]: not an output of model {self.use_case.name}")
            if output.name not in wanted:
                wanted.append(output.name)
        return wanted

    def rows(self, request: InferenceRequest, buffer: bytes) -> list[dict[str, Any]]:
        """The request's rows as dicts of raw values (None where missing), not yet validated."""
        columns: dict[str, list[Any]] = {}
        offset = 0
        for index, tensor in enumerate(request.inputs):
            spec = self.features.get(tensor.name)
            if spec is None:
                raise InvalidInput(f"inputs[{index}]: not an input of model {self.use_case.name}")
            name = spec.name
            if name in columns:
                raise InvalidInput(f"input {name}: given twice")
            if tensor.datatype not in ACCEPTED[spec.type]:
                declared = DECLARED[spec.type]
                raise InvalidInput(f"input {name}: {tensor.datatype}, the model takes {declared}")
            if len(tensor.shape) == 2 and tensor.shape[1] != 1:
                raise InvalidInput(f"input {name}: shape must be [rows] or [rows, 1]")
            size = (tensor.parameters or {}).get(BINARY_SIZE)
            if size is not None:
                if (
                    not isinstance(size, int)
                    or isinstance(size, bool)
                    or not 0 <= size <= len(buffer) - offset
                ):
                    raise InvalidInput(f"input {name}: {BINARY_SIZE} is not within the binary data")
                values = from_binary(name, tensor.datatype, buffer[offset : offset + size])
                offset += size
            elif tensor.data is None:
                raise InvalidInput(f"input {name}: no data")
            else:
                values = flatten(tensor.data)
                if tensor.datatype in FLOATS:  # NaN is a missing value, as in numpy and pandas
                    values = [None if v != v else v for v in values]
                elif tensor.datatype in INTEGERS and not all(
                    v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in values
                ):
                    raise InvalidInput(f"input {name}: {tensor.datatype} data must be integers")
            if len(values) != tensor.shape[0]:
                raise InvalidInput(
                    f"input {name}: shape {tensor.shape} holds {tensor.shape[0]} values, "
                    f"data has {len(values)}"
                )
            columns[name] = values
        if offset != len(buffer):
            raise InvalidInput("binary data beyond the inputs' binary_data_size")
        missing = [name for name in self.required if name not in columns]
        if missing:
            raise InvalidInput(f"missing inputs: {', '.join(missing)}")
        counts = {len(values) for values in columns.values()}
        if len(counts) > 1:
            raise InvalidInput(f"the inputs disagree on the number of rows: {sorted(counts)}")
        count = counts.pop()
        if count > self.max_rows:
            raise PayloadTooLarge(f"{count} rows exceed the cap of {self.max_rows}")
        names = list(columns)
        return [
            dict(zip(names, values, strict=True))
            for values in zip(*columns.values())  # noqa: B905
        ]

    def output(self, name: str, predictions: list[dict[str, Any]]) -> dict[str, Any]:
        """One output tensor over the predictions, `null` where a value is missing."""
        if name == "probabilities":
            classes = self.classes
            data: list[Any] = []
            for p in predictions:
                probabilities = p["probabilities"]
                data += (
                    [None] * len(classes)
                    if probabilities is None
                    else [probabilities[c] for c in classes]
                )
            return {
                "name": name,
                "datatype": "FP64",
                "shape": [len(predictions), len(classes)],
                "data": data,
            }
        return {
            "name": name,
            "datatype": ROW_OUTPUTS[name],
            "shape": [len(predictions)],
            "data": [p[name] for p in predictions],
        }


def flatten(data: list[Any]) -> list[Any]:
    """Row-major values of nested arrays (`[[a], [b]]`); flat ones as they are (a list in a
    flat array stays: the contract refuses it)."""
    if not data or not isinstance(data[0], list):
        return data
    flat: list[Any] = []
    for value in data:
        flat.extend(flatten(value) if isinstance(value, list) else (value,))
    return flat


def from_binary(name: str, datatype: str, raw: bytes) -> list[Any]:
    """Values of one input sent as binary data: little-endian numbers (NaN is a missing value:
    binary has no null), one byte per BOOL, or BYTES as a 4-byte length and UTF-8 text each."""
    if datatype == "BYTES":
        values: list[Any] = []
        position = 0
        while position < len(raw):
            if position + LENGTH.size > len(raw):
                raise InvalidInput(f"input {name}: binary BYTES data is truncated")
            (length,) = LENGTH.unpack_from(raw, position)
            position += LENGTH.size
            if position + length > len(raw):
                raise InvalidInput(f"input {name}: binary BYTES data is truncated")
            try:
                values.append(raw[position : position + length].decode("utf-8"))
            except UnicodeDecodeError:
                raise InvalidInput(f"input {name}: BYTES values must be UTF-8 text") from None
            position += length
        return values
    dtype = np.dtype(NUMPY_TYPES[datatype]) if datatype in NUMPY_TYPES else None
    if dtype is None:
        raise InvalidInput(f"input {name}: {datatype} is not taken as binary data")
    if len(raw) % dtype.itemsize:
        raise InvalidInput(f"input {name}: binary data is not a whole number of {datatype} values")
    array = np.frombuffer(raw, dtype=dtype)
    if datatype in FLOATS:
        return [None if v != v else v for v in array.astype(np.float64).tolist()]
    return array.tolist()


def validation_message(exc: ValidationError) -> str:
    """Where and what, from pydantic's errors (never the input)."""
    details = exc.errors(include_url=False, include_input=False, include_context=False)
    parts = [
        f"{'.'.join(str(p) for p in d['loc']) or 'body'}: {d['msg']}"
        for d in details[:MAX_ROW_ERRORS]
    ]
    more = len(details) - MAX_ROW_ERRORS
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def _json(body: Any, status: int = 200) -> Response:
    return Response(to_json(body), status_code=status, media_type="application/json")


def _error(error: ScoringError) -> Response:
    return _json({"error": error.message}, error.status)


def _responses(path: str, method: str, ok: type[BaseModel] | None) -> dict[int | str, Any]:
    """The OpenAPI responses of a route: 200 with `ok`, and each error it can answer."""
    statuses = sorted({*V2_ROUTES[f"{V2_PREFIX}{path}"][method], 500})
    responses: dict[int | str, Any] = {
        status: {
            "model": ProtocolError,
            "description": f"{HTTPStatus(status).phrase}. {WHEN[status]}",
        }
        for status in statuses
    }
    if ok is not None:
        responses[200] = {"model": ok, "description": "OK"}
    return responses


def _path_parameters(path: str) -> dict[str, Any]:
    """OpenAPI parameters of `path`'s placeholders (the handlers read them from the request,
    so that FastAPI adds no 422 this API never answers)."""
    names = [part[1:-1] for part in path.split("/") if part.startswith("{")]
    return {
        "parameters": [
            {"name": n, "in": "path", "required": True, "schema": {"type": "string"}} for n in names
        ]
    }


def open_inference_app(current: Callable[[], OpenInference]) -> FastAPI:
    """The V2 routes, to mount at `V2_PREFIX`; `current()` is the worker's OpenInference."""
    app = FastAPI(
        title="Open Inference Protocol (V2)", openapi_url=None, docs_url=None, redoc_url=None
    )

    @app.get(
        "/health/live",
        response_class=Response,
        responses=_responses("/health/live", "get", ServerLive),
    )
    async def server_live() -> Response:
        """Live: the server answers."""
        return _json({"live": True})

    @app.get(
        "/health/ready",
        response_class=Response,
        responses=_responses("/health/ready", "get", Readiness),
    )
    async def server_ready() -> Response:
        """Ready: the model answers (as /readyz); 503 before, and while stopping."""
        if not current().ready():
            return _error(InferenceFailed(NOT_READY))
        return _json({"ready": True})

    for path in MODEL_PATHS:

        @app.get(
            path,
            response_class=Response,
            responses=_responses(path, "get", ModelMetadata),
            openapi_extra=_path_parameters(path),
        )
        async def model_metadata(request: Request) -> Response:
            """The model: its name, version, platform, one input per feature (datatype, shape
            [-1, 1], whether it is optional) and the outputs."""
            protocol = current()
            try:
                protocol.check_model(**request.path_params)
            except ScoringError as exc:
                return _error(exc)
            return _json(protocol.metadata())

        @app.get(
            f"{path}/ready",
            response_class=Response,
            responses=_responses(f"{path}/ready", "get", ModelReadiness),
            openapi_extra=_path_parameters(path),
        )
        async def model_ready(request: Request) -> Response:
            """Whether the model answers (as /readyz); 503 when not."""
            protocol = current()
            try:
                protocol.check_model(**request.path_params)
            except ScoringError as exc:
                return _error(exc)
            if not protocol.ready():
                return _error(InferenceFailed(NOT_READY))
            return _json({"name": protocol.use_case.name, "ready": True})

        @app.post(
            f"{path}/infer",
            response_class=Response,
            responses=_responses(f"{path}/infer", "post", None),  # 200 and the body: V2_BODIES
            openapi_extra=_path_parameters(path),
        )
        async def infer(request: Request) -> Response:
            """Score rows given as one input per feature (see the model's metadata): through
            the same contract, runners, batching and fallbacks as /v1/predict_batch. Outputs:
            `probabilities` (FP64, rows x classes) and one per field of a /v1 prediction
            (`label`, `score`, `confidence`, `source`, `fallback_reason`, `arm`,
            `model_version`); `null` where there is no value. A row that is not valid makes
            the request a 400 naming the row and the feature."""
            body = await request.body()
            header = request.headers.get(BINARY_HEADER)
            return await infer_response(current(), request.path_params, body, header)

    return app


async def infer_response(
    protocol: OpenInference, path_params: dict[str, str], body: bytes, binary_header: str | None
) -> Response:
    """The infer route's answer (also given without FastAPI's router: `direct_infer`)."""
    try:
        protocol.check_model(**path_params)
        return _json(await protocol.infer(body, binary_header))
    except ScoringError as exc:
        return _error(exc)


def direct_infer(current: Callable[[], OpenInference]) -> tuple[re.Pattern[str], Direct]:
    """The infer route for api.direct.DirectRoutes: its path pattern and handler. An error
    the handler does not answer is a 500 as FastAPI's would be (the V2 error shape is
    ContractMiddleware's)."""
    binary_header = BINARY_HEADER.encode()

    async def handle(scope: Scope, body: bytes) -> Response:
        match = INFER_PATH.fullmatch(scope["path"])
        assert match is not None  # DirectRoutes matched it
        params = {name: value for name, value in match.groupdict().items() if value is not None}
        headers = (v.decode("latin-1") for k, v in scope["headers"] if k == binary_header)
        try:
            return await infer_response(current(), params, body, next(headers, None))
        except Exception:
            LOG.exception("%s failed", scope["path"])
            return PlainTextResponse("Internal Server Error", status_code=500)

    return INFER_PATH, handle


def request_for(use_case: UseCase, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The inference request for `rows` (as /v1 takes them): one input per feature that any
    row has, with its declared datatype, `null` where a row lacks the value."""
    given = [f for f in use_case.features if any(f.name in row for row in rows)]
    return {
        "inputs": [
            {
                "name": f.name,
                "datatype": DECLARED[f.type],
                "shape": [len(rows), 1],
                "data": [row.get(f.name) for row in rows],
            }
            for f in given
        ]
    }
