"""ONNX export of each trained model with its preprocessing, as one graph, behind a parity gate.

The graph takes one input per model feature (docs/onnx.md) and answers `probabilities`
(double, n x k). It is assembled from three parts:
- the preprocessing, written here with standard ONNX operators in double precision from the
  compiled encoder (runners/encoder.py: the fitted imputation values, scaler parameters and
  categories the preprocessor runner serves, proven equal to the ColumnTransformer). Not
  skl2onnx's ColumnTransformer converter: it emits ONNX-ML `Imputer` (no double kernel in
  onnxruntime) and `Scaler` (float output), so features are rounded to float32 *before* the
  scaling; a feature one float32 step off an XGBoost split value takes the other branch
  (measured on churn: max |dp| 3.6e-4 on 10 002 rows, refused by the gate). Here the same IEEE
  double operations as the encoder run (impute, subtract, divide), then one cast to float32,
  as the XGBoost runner does;
- the XGBoost model by onnxmltools' converter (the one skl2onnx documents for XGBoost; it reads
  `base_score` into the ensemble's base value), in float32 as XGBoost compares;
- the scikit-learn model by skl2onnx, in double.
Converters have had correctness bugs on exactly this shape (base_score, float32 thresholds), so
an export ships only if onnxruntime's probabilities equal the served computation's within the
configured tolerance on the use case's examples and random valid rows; otherwise it is refused,
with a reason the run records, and training goes on without it.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.compose import ColumnTransformer

from configuration import Settings, UseCase
from runners.encoder import Encoder, NumericBlock, OneHotBlock
from training.encoder_compiler import NotCompilable, compile_encoder, random_rows

LOG = logging.getLogger(__name__)
FEATURES = "features"  # the encoded feature matrix, between the preprocessing and the model
PROBABILITIES = "probabilities"
MISSING_CATEGORY = ""  # a categorical input's missing value: any string outside its categories
OPSET = 13  # ai.onnx; onnxruntime (Python and web) runs every operator used at this version
ML_OPSET = 1  # ai.onnx.ml: OneHotEncoder, TreeEnsembleClassifier
IR_VERSION = 8
MODEL_PREFIX = "model_"  # names of the model part, kept apart from the preprocessing's


class ExportRefused(RuntimeError):
    """The model was not exported: it failed the parity gate, or a converter failed on it."""


@dataclass(frozen=True)
class Export:
    """An ONNX graph that passed the parity gate, and what the gate measured."""

    flavor: str
    graph: bytes
    rows: int
    max_abs_diff: float
    tolerance: float
    rows_per_s: float  # onnxruntime on the parity rows in one call, one thread, inputs ready

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.graph).hexdigest()


def graph_inputs(use_case: UseCase) -> dict[str, str]:
    """Input name -> ONNX element type: categorical features are strings, the others doubles
    (booleans as 1.0 / 0.0), each a column of shape [n, 1]."""
    return {
        f.name: "string" if f.type == "categorical" else "double" for f in use_case.model_features
    }


def feeds(use_case: UseCase, rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """The graph's inputs for raw rows, as the contract validates them: numbers and booleans as
    double with NaN where missing, categories as strings with "" where missing."""
    out: dict[str, np.ndarray] = {}
    for spec in use_case.model_features:
        values = [row.get(spec.name) for row in rows]
        if spec.type == "categorical":
            text = [MISSING_CATEGORY if v is None else str(v) for v in values]
            out[spec.name] = np.array(text, dtype=object).reshape(-1, 1)
        else:
            numbers = [np.nan if v is None else float(v) for v in values]
            out[spec.name] = np.array(numbers, dtype=np.float64).reshape(-1, 1)
    return out


def preprocessing_graph(use_case: UseCase, encoder: Encoder) -> Any:
    """The compiled encoder as an ONNX model: one input per model feature -> FEATURES (double,
    n x d), the same values as `Encoder.encode`."""
    from onnx import TensorProto, helper, numpy_helper

    kinds = {"double": TensorProto.DOUBLE, "string": TensorProto.STRING}
    inputs = [
        helper.make_tensor_value_info(name, kinds[kind], [None, 1])
        for name, kind in graph_inputs(use_case).items()
    ]
    nodes: list[Any] = []
    constants: list[Any] = []

    def constant(name: str, values: np.ndarray) -> str:
        constants.append(numpy_helper.from_array(values, name))
        return name

    parts: list[str] = []
    for b, block in enumerate(encoder.blocks):
        if isinstance(block, NumericBlock):
            raw = f"numeric{b}_raw"
            nodes.append(helper.make_node("Concat", list(block.columns), [raw], axis=1))
            nodes.append(helper.make_node("IsNaN", [raw], [f"numeric{b}_missing"]))
            fill = constant(f"numeric{b}_fill", block.fill)
            value = f"numeric{b}_filled"
            nodes.append(helper.make_node("Where", [f"numeric{b}_missing", fill, raw], [value]))
            if block.center is not None:
                center = constant(f"numeric{b}_center", block.center)
                nodes.append(helper.make_node("Sub", [value, center], [f"numeric{b}_centered"]))
                value = f"numeric{b}_centered"
            if block.scale is not None:
                scale = constant(f"numeric{b}_scale", block.scale)
                nodes.append(helper.make_node("Div", [value, scale], [f"numeric{b}_scaled"]))
                value = f"numeric{b}_scaled"
            parts.append(value)
        elif isinstance(block, OneHotBlock):
            squeeze_axes = constant(f"onehot{b}_axes", np.array([1], dtype=np.int64))
            for column, categories in zip(block.columns, block.categories, strict=True):
                encoded = f"onehot_{column}"
                nodes.append(
                    helper.make_node(
                        "OneHotEncoder",
                        [column],
                        [f"{encoded}_3d"],
                        domain="ai.onnx.ml",
                        cats_strings=list(categories),
                        zeros=1,  # a value outside the categories (missing: "") is all zeros
                    )
                )
                squeezed = f"{encoded}_f32"  # 0.0 and 1.0: exact in float32
                nodes.append(
                    helper.make_node("Squeeze", [f"{encoded}_3d", squeeze_axes], [squeezed])
                )
                nodes.append(helper.make_node("Cast", [squeezed], [encoded], to=TensorProto.DOUBLE))
                parts.append(encoded)
    nodes.append(helper.make_node("Concat", parts, [FEATURES], axis=1))
    width = len(encoder.feature_names)
    graph = helper.make_graph(
        nodes,
        "preprocessing",
        inputs,
        [helper.make_tensor_value_info(FEATURES, TensorProto.DOUBLE, [None, width])],
        initializer=constants,
    )
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("ai.onnx.ml", ML_OPSET)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION)


def model_graph(flavor: str, model: Any, width: int, n_classes: int) -> Any:
    """The fitted model as an ONNX model: FEATURES (double, n x width) -> PROBABILITIES
    (double, n x n_classes). XGBoost compares float32 features, as its runner feeds it."""
    from onnx import TensorProto, helper

    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("ai.onnx.ml", ML_OPSET)]
    features = helper.make_tensor_value_info(FEATURES, TensorProto.DOUBLE, [None, width])
    probabilities = helper.make_tensor_value_info(
        PROBABILITIES, TensorProto.DOUBLE, [None, n_classes]
    )
    if flavor == "xgboost":
        from onnxmltools.convert import convert_xgboost
        from onnxmltools.convert.common.data_types import FloatTensorType

        converted = convert_xgboost(
            model, initial_types=[(f"{FEATURES}_f32", FloatTensorType([None, width]))]
        ).graph
        renamed = {PROBABILITIES: f"{PROBABILITIES}_f32"}
        for node in converted.node:
            node.output[:] = [renamed.get(name, name) for name in node.output]
        nodes = [
            helper.make_node("Cast", [FEATURES], [f"{FEATURES}_f32"], to=TensorProto.FLOAT),
            *converted.node,
            helper.make_node(
                "Cast", [f"{PROBABILITIES}_f32"], [PROBABILITIES], to=TensorProto.DOUBLE
            ),
        ]
        initializers = list(converted.initializer)
    else:
        from skl2onnx import convert_sklearn
        from skl2onnx.common.data_types import DoubleTensorType

        converted = convert_sklearn(
            model,
            initial_types=[(FEATURES, DoubleTensorType([None, width]))],
            options={"zipmap": False},
            target_opset={"": OPSET, "ai.onnx.ml": ML_OPSET},
        ).graph
        nodes, initializers = list(converted.node), list(converted.initializer)
    graph = helper.make_graph(nodes, flavor, [features], [probabilities], initializer=initializers)
    return helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION)


def build_graph(
    use_case: UseCase, preprocessor: ColumnTransformer, flavor: str, model: Any
) -> bytes:
    """One ONNX graph: raw inputs (`graph_inputs`) -> PROBABILITIES, serialised and checked."""
    import onnx
    from onnx import compose

    encoder = compile_encoder(
        preprocessor,
        use_case.model_feature_names,
        [str(n) for n in preprocessor.get_feature_names_out()],
    )
    pre = preprocessing_graph(use_case, encoder)
    # the model part's names prefixed, so that none can clash with a feature's
    head = compose.add_prefix(
        model_graph(flavor, model, len(encoder.feature_names), len(use_case.target.classes)),
        MODEL_PREFIX,
    )
    graph = compose.merge_graphs(
        pre.graph,
        head.graph,
        [(FEATURES, MODEL_PREFIX + FEATURES)],
        name=f"{use_case.name}-{flavor}",
    )
    renamed = {MODEL_PREFIX + PROBABILITIES: PROBABILITIES}
    for node in graph.node:
        node.output[:] = [renamed.get(name, name) for name in node.output]
    graph.output[0].name = PROBABILITIES
    merged = onnx.helper.make_model(
        graph, opset_imports=list(pre.opset_import), ir_version=IR_VERSION
    )
    merged.doc_string = (
        f"{use_case.name}: raw features -> class probabilities {list(use_case.target.classes)}"
    )
    onnx.checker.check_model(merged, full_check=True)
    return bytes(merged.SerializeToString())


def served_probabilities(
    use_case: UseCase,
    preprocessor: ColumnTransformer,
    flavor: str,
    model: Any,
    rows: list[dict[str, Any]],
) -> np.ndarray:
    """Probabilities (n x k) computed as the runners compute them: the fitted preprocessing in
    double, then the Booster on float32 features (runners/xgboost_runner.py) or the estimator's
    `predict_proba` (runners/sklearn_runner.py)."""
    features = np.asarray(preprocessor.transform(use_case.frame(rows)), dtype=np.float64)
    if flavor == "xgboost":
        booster = model.get_booster()
        scores = np.asarray(booster.inplace_predict(features.astype(np.float32)), dtype=np.float64)
        return np.column_stack([1.0 - scores, scores]) if scores.ndim == 1 else scores
    return np.asarray(model.predict_proba(features), dtype=np.float64)


def session(graph: bytes) -> Any:
    """An onnxruntime session of the graph, one thread (as each runner worker has)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    return onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


def onnx_probabilities(runtime: Any, use_case: UseCase, rows: list[dict[str, Any]]) -> np.ndarray:
    """onnxruntime's probabilities (n x k) for raw rows."""
    (out,) = runtime.run([PROBABILITIES], feeds(use_case, rows))
    return np.asarray(out, dtype=np.float64)


def parity_rows(use_case: UseCase, n_rows: int, seed: int) -> list[dict[str, Any]]:
    """The use case's examples, then `n_rows` random valid rows (`random_rows`: bounds, edge
    values, missing values where allowed) in which every category of every categorical feature
    appears at least once."""
    rows = random_rows(use_case, n_rows, seed)
    for spec in use_case.model_features:
        if spec.type == "categorical":
            for row, category in zip(rows, spec.categories, strict=False):
                row[spec.name] = category
    return [dict(e) for e in use_case.examples] + rows


def check_parity(
    use_case: UseCase,
    preprocessor: ColumnTransformer,
    flavor: str,
    model: Any,
    graph: bytes,
    settings: Settings,
) -> Export:
    """Run the gate: ExportRefused, with max |dp|, unless onnxruntime's probabilities equal the
    served ones within `onnx_parity_tolerance` on every parity row."""
    rows = parity_rows(use_case, settings.onnx_parity_rows, settings.seed)
    expected = served_probabilities(use_case, preprocessor, flavor, model, rows)
    runtime = session(graph)
    inputs = feeds(use_case, rows)
    started = time.perf_counter()
    (out,) = runtime.run([PROBABILITIES], inputs)
    seconds = time.perf_counter() - started
    got = np.asarray(out, dtype=np.float64)
    if got.shape != expected.shape:
        raise ExportRefused(
            f"ONNX export of {use_case.registered_name(flavor)} refused: it answers shape "
            f"{got.shape}, the served model {expected.shape}"
        )
    diff = np.abs(got - expected)
    worst = float(np.nanmax(diff)) if not np.isnan(got).all() else float("inf")
    if np.isnan(got).any() or worst > settings.onnx_parity_tolerance:
        bad = int((np.isnan(got) | (diff > settings.onnx_parity_tolerance)).any(axis=1).sum())
        raise ExportRefused(
            f"ONNX export of {use_case.registered_name(flavor)} refused by the parity gate: "
            f"max |dp| = {worst:.3g} > {settings.onnx_parity_tolerance:g} on {bad} of "
            f"{len(rows)} rows (the examples and {settings.onnx_parity_rows} random rows)"
        )
    return Export(
        flavor=flavor,
        graph=graph,
        rows=len(rows),
        max_abs_diff=worst,
        tolerance=settings.onnx_parity_tolerance,
        rows_per_s=len(rows) / seconds,
    )


def converter_failures() -> tuple[type[BaseException], ...]:
    """What a converter or onnxruntime raises on a model it cannot handle: a refusal, not a
    failed training (onnxruntime's errors derive from Exception only)."""
    from onnx.checker import ValidationError
    from onnx.shape_inference import InferenceError
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

    return (
        NotCompilable,
        ValueError,
        TypeError,
        KeyError,
        NotImplementedError,
        RuntimeError,
        ValidationError,
        InferenceError,
        ort_errors.Fail,
        ort_errors.InvalidArgument,
        ort_errors.InvalidGraph,
        ort_errors.NotImplemented,
    )


def export(
    use_case: UseCase,
    preprocessor: ColumnTransformer,
    flavor: str,
    model: Any,
    settings: Settings,
) -> Export:
    """Build the flavor's graph and run the parity gate; ExportRefused saying why not."""
    try:
        graph = build_graph(use_case, preprocessor, flavor, model)
        return check_parity(use_case, preprocessor, flavor, model, graph, settings)
    except ExportRefused:
        raise
    except converter_failures() as exc:
        raise ExportRefused(
            f"ONNX export of {use_case.registered_name(flavor)} refused: the conversion "
            f"failed ({type(exc).__name__}: {exc})"
        ) from exc


# What a run records of its exports (MLflow), and what an import reads back.
ARTIFACT = "onnx/{flavor}.onnx"
TAG_STATUS = "onnx.{flavor}"  # "exported" or "refused"
TAG_REASON = "onnx.{flavor}.reason"
TAG_SHA256 = "onnx.{flavor}.sha256"
METRIC_DIFF = "onnx.{flavor}.max_abs_diff"
EXPORTED, REFUSED = "exported", "refused"
STORED_FILE = "model.onnx"


def log_exports(
    settings: Settings,
    use_case: UseCase,
    preprocessor: ColumnTransformer,
    models: dict[str, Any],
) -> dict[str, Export | ExportRefused]:
    """Inside an active MLflow run: export each model, log each graph that passes the gate
    (artifact, SHA-256, max |dp|) and each refusal's reason (a tag and a warning)."""
    import tempfile

    import mlflow

    outcomes: dict[str, Export | ExportRefused] = {}
    if not settings.onnx_export:
        return outcomes
    for flavor, model in models.items():
        try:
            done = export(use_case, preprocessor, flavor, model, settings)
        except ExportRefused as refused:
            LOG.warning("%s; training goes on without it", refused)
            mlflow.set_tags(
                {
                    TAG_STATUS.format(flavor=flavor): REFUSED,
                    TAG_REASON.format(flavor=flavor): str(refused),
                }
            )
            outcomes[flavor] = refused
            continue
        with tempfile.TemporaryDirectory(prefix="scoring-onnx-") as scratch:
            path = Path(scratch) / f"{flavor}.onnx"
            path.write_bytes(done.graph)
            mlflow.log_artifact(str(path), artifact_path=Path(ARTIFACT).parent.as_posix())
        mlflow.set_tags(
            {
                TAG_STATUS.format(flavor=flavor): EXPORTED,
                TAG_SHA256.format(flavor=flavor): done.sha256,
            }
        )
        mlflow.log_metric(METRIC_DIFF.format(flavor=flavor), done.max_abs_diff)
        LOG.info(
            "exported %s to ONNX: %d bytes, max |dp| %.3g on %d rows",
            use_case.registered_name(flavor),
            len(done.graph),
            done.max_abs_diff,
            done.rows,
        )
        outcomes[flavor] = done
    return outcomes


def stored_export(
    run: Any, flavor: str, scratch: Path
) -> tuple[dict[str, tuple[str, bytes]], dict[str, Any]]:
    """For an import: the run's graph of `flavor` as an extra file of the stored model, if it
    matches the SHA-256 its run recorded, and metadata saying what the gate found (or why
    there is no graph: `onnx_refused`)."""
    import mlflow

    tags = run.data.tags
    status = tags.get(TAG_STATUS.format(flavor=flavor))
    if status != EXPORTED:
        reason = tags.get(TAG_REASON.format(flavor=flavor), "the run exported no ONNX graph")
        return {}, {"onnx_refused": reason}
    path = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path=ARTIFACT.format(flavor=flavor), dst_path=str(scratch)
    )
    graph = Path(path).read_bytes()
    expected = tags.get(TAG_SHA256.format(flavor=flavor))
    if hashlib.sha256(graph).hexdigest() != expected:
        reason = (
            f"run {run.info.run_id}: {ARTIFACT.format(flavor=flavor)} does not match the "
            "SHA-256 recorded when it passed the parity gate"
        )
        LOG.warning("%s; imported without it", reason)
        return {}, {"onnx_refused": reason}
    diff = run.data.metrics.get(METRIC_DIFF.format(flavor=flavor))
    return {"onnx": (STORED_FILE, graph)}, {} if diff is None else {"onnx_max_abs_diff": diff}
