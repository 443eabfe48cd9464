"""GET /v1/model.onnx: the champion's ONNX graph (preprocessing + model, docs/onnx.md) for
inference at the edge, verified like every model file before it is sent, with its SHA-256,
registry version and contract version in headers and an ETag to revalidate against."""

from __future__ import annotations

from typing import Any

from starlette.responses import Response

from api.errors import NotFound, error_response
from configuration import Settings
from runners.artifacts import verified_file

MEDIA_TYPE = "application/octet-stream"  # ONNX has no registered media type
KEY = "onnx"  # the stored model's metadata key of its graph (training/onnx_export.py)
SHA256_HEADER = "X-Model-SHA256"
VERSION_HEADER = "X-Model-Version"
NAME_HEADER = "X-Model-Name"
CONTRACT_HEADER = "X-Contract-Version"
NO_EXPORT = "imported before ONNX exports, or exported with them off"


def _header(description: str, kind: str = "string") -> dict[str, Any]:
    return {"description": description, "schema": {"type": kind}}


HEADERS = {
    SHA256_HEADER: _header("SHA-256 (hex) of the body: the graph's bytes."),
    VERSION_HEADER: _header("MLflow Model Registry version of the model the graph is."),
    NAME_HEADER: _header("Registered model name (`<use-case>-<flavor>`)."),
    CONTRACT_HEADER: _header("Contract version of the use case.", "integer"),
    "ETag": _header("The SHA-256, quoted: send it as If-None-Match to revalidate."),
}
RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The graph (ONNX protobuf): one input per model feature, output "
        "`probabilities` (docs/onnx.md).",
        "content": {MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
        "headers": HEADERS,
    },
    304: {"description": "Not modified: If-None-Match names this graph.", "headers": HEADERS},
}


class OnnxFiles:
    """The verified graph of each stored model, read (and checked) once per model."""

    def __init__(self, settings: Settings, contract_version: int) -> None:
        self.settings = settings
        self.contract_version = contract_version
        self.graphs: dict[str, bytes] = {}

    def response(self, model: Any, if_none_match: str | None) -> Response:
        """The graph of `model` (a stored model of the serving flavor), 304 when
        `if_none_match` holds its ETag, or 404 when it has no graph."""
        labels, metadata = model.info.labels, model.info.metadata
        name, version = labels["registered_name"], labels["registered_version"]
        if KEY not in metadata:
            reason = metadata.get("onnx_refused", NO_EXPORT)
            return error_response(
                NotFound(f"{name} version {version} has no ONNX export: {reason}")
            )
        digest = str(metadata[f"{KEY}_sha256"])
        etag = f'"{digest}"'
        headers = {
            SHA256_HEADER: digest,
            VERSION_HEADER: str(version),
            NAME_HEADER: str(name),
            CONTRACT_HEADER: str(self.contract_version),
            "ETag": etag,
            "Content-Disposition": f'attachment; filename="{name}-v{version}.onnx"',
            "Cache-Control": "no-cache",  # revalidate: the champion can change without a restart
        }
        if if_none_match is not None and etag in if_none_match:
            return Response(status_code=304, headers=headers)
        tag = str(model.tag)
        if tag not in self.graphs:  # the hash (and signature) checked on the bytes we keep
            self.graphs[tag] = verified_file(model, KEY, self.settings).read_bytes()
        return Response(self.graphs[tag], media_type=MEDIA_TYPE, headers=headers)
