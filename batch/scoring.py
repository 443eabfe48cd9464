"""Batch scoring: a file or SQL query scored in process, chunk by chunk, with the very
preprocessing and model the online service loads from the BentoML store, into a database table,
exactly once and resumable (`python -m batch score`)."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import compress
from pathlib import Path
from typing import Any, cast

import bentoml
import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from batch.sink import SCORE_SCHEMA, ScoredChunk, Sink, now
from configuration import UseCase
from configuration.digests import sha256_of
from configuration.policy import decide
from runners.artifacts import newest_import, preprocessor_of
from runners.preprocessor import load_compiled, load_encoder

TRUE_VALUES = {True, "true", "True", "TRUE", "1"}  # True == 1, so the number 1 is in too
FALSE_VALUES = {False, "false", "False", "FALSE", "0"}


class BatchError(ValueError):
    """The job cannot run: a missing column, an unknown model, an unreadable source."""


@dataclass(frozen=True)
class ScoringModels:
    """A stored model and the preprocessor it was trained with, loaded as the runners load them."""

    model: bentoml.Model
    encode: Callable[[pd.DataFrame], np.ndarray]  # a frame typed by UseCase.frame
    predict: Callable[[np.ndarray], np.ndarray]

    @property
    def name(self) -> str:
        return str(self.model.info.labels["registered_name"])

    @property
    def version(self) -> str:
        return str(self.model.info.labels["registered_version"])

    @property
    def data_sha256(self) -> str | None:
        """The training data digest (lineage); None for an import from before it."""
        return self.model.info.labels.get("data_sha256") or None


def resolve_models(use_case: UseCase, flavor: str, tag: str | None, alias: str) -> ScoringModels:
    """By tag (`churn-xgboost:v3-…`, or `:latest` = what `bentoml serve` serves), else the most
    recent import under `alias`."""
    name = use_case.registered_name(flavor)
    if tag is not None:
        model = bentoml.models.get(tag)
    else:
        newest = newest_import(bentoml.models.list(name), alias)
        if newest is None:
            raise BatchError(f"no {name} model imported under alias {alias!r}")
        model = newest
    try:
        preprocessor = preprocessor_of(model)
    except LookupError as exc:
        raise BatchError(str(exc)) from exc
    if flavor == "xgboost":
        from runners.xgboost_runner import load_predictor as load_xgboost

        predict = load_xgboost(model, threads=1)
    else:
        from runners.sklearn_runner import load_predictor as load_sklearn

        predict = load_sklearn(model)
    compiled = load_compiled(preprocessor)
    if compiled is not None:
        return ScoringModels(model, compiled.encode_frame, predict)
    encode_matrix = load_encoder(preprocessor, use_case)
    return ScoringModels(model, lambda frame: encode_matrix(frame.to_numpy(dtype=object)), predict)


def read_chunks(source: str, chunk_rows: int, database: str | None) -> Iterator[pd.DataFrame]:
    """The input in chunks of `chunk_rows`, always in the same order (resuming relies on it):
    a .csv/.parquet path, or `sql:<query>` run against `database`."""
    if source.startswith("sql:"):
        if database is None:
            raise BatchError("a sql: source needs --input-db")
        from sqlalchemy import create_engine, text

        engine = create_engine(database)
        try:
            with engine.connect() as conn:
                yield from pd.read_sql(text(source[4:]), conn, chunksize=chunk_rows)
        finally:
            engine.dispose()
        return
    path = Path(source)
    if not path.is_file():
        raise BatchError(f"input {source} not found")
    if path.suffix == ".csv":
        yield from pd.read_csv(path, chunksize=chunk_rows, keep_default_na=True)
    elif path.suffix in {".parquet", ".pq"}:
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=chunk_rows):
            yield batch.to_pandas()
    else:
        raise BatchError(f"input {source}: expected .csv, .parquet or sql:<query>")


def source_fingerprint(source: str) -> str:
    if source.startswith("sql:"):
        return hashlib.sha256(source.encode()).hexdigest()
    return sha256_of(Path(source))


def validate_chunk(use_case: UseCase, frame: pd.DataFrame) -> tuple[np.ndarray, pd.DataFrame]:
    """Why each row breaks the contract (None where it does not): the same checks the API makes,
    vectorised over the chunk; and the model-input columns typed for the encoder (numbers and
    booleans float64 with NaN, categories as pandas Categoricals over the use case's
    categories), converted once for both. Coerces valid boolean spellings in `frame` in place."""
    n = len(frame)
    reasons = np.full(n, None, dtype=object)
    unset = np.ones(n, dtype=bool)

    def flag(mask: np.ndarray, reason: str) -> None:
        hit = mask & unset
        if hit.any():
            reasons[hit] = reason
            unset[hit] = False

    typed: dict[str, Any] = {}  # column name -> float64 array or Categorical
    for spec in use_case.model_features:
        column = frame[spec.name]
        kind = column.dtype.kind  # float and bool columns (Parquet, CSV) skip pandas' checks
        floats = column.to_numpy() if kind == "f" else None
        if floats is not None:
            present = ~np.isnan(floats)
        else:
            present = np.ones(n, dtype=bool) if kind == "b" else column.notna().to_numpy()
        if not spec.nullable:
            flag(~present, f"{spec.name}: missing")
        if spec.type == "numeric":
            values = (
                floats.astype(np.float64, copy=False)
                if floats is not None
                else np.asarray(pd.to_numeric(column, errors="coerce"), dtype=np.float64)
            )
            flag(present & np.isnan(values), f"{spec.name}: not a number")
            flag(present & np.isinf(values), f"{spec.name}: not finite")
            low, high = float(spec.min or 0.0), float(spec.max or 0.0)  # set for numeric
            with np.errstate(invalid="ignore"):
                flag(values < low, f"{spec.name}: below {spec.min}")
                flag(values > high, f"{spec.name}: above {spec.max}")
            typed[spec.name] = values
        elif spec.type == "boolean":
            if column.dtype == bool:
                typed[spec.name] = column.to_numpy(dtype=np.float64)
            else:  # set membership by hash, as `v in TRUE_VALUES` row by row
                true = column.isin(TRUE_VALUES).to_numpy()
                false = column.isin(FALSE_VALUES).to_numpy()
                flag(present & ~true & ~false, f"{spec.name}: not a boolean")
                truth = np.full(n, None, dtype=object)
                truth[true], truth[false] = True, False
                frame[spec.name] = truth
                typed[spec.name] = np.where(true, 1.0, np.where(false, 0.0, np.nan))
        else:
            codes = category_codes(column, spec.categories)
            codes[~present] = -1
            flag(present & (codes < 0), f"{spec.name}: unknown category")
            typed[spec.name] = pd.Categorical.from_codes(
                codes, dtype=pd.CategoricalDtype(list(spec.categories))
            )
    return reasons, pd.DataFrame(typed)


def category_codes(column: pd.Series, categories: Sequence[str]) -> npt.NDArray[np.int64]:
    """Each value's position in `categories`, -1 where it is not one of them; values are
    compared as their `str()`, as the API's contract compares them. Arrow's hash lookup on
    string columns: a pandas index lookup cost 7x more."""
    try:
        values = pa.array(column.array, from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types
        values = None
    if values is None or not (
        pa.types.is_string(values.type) or pa.types.is_large_string(values.type)
    ):
        values = pa.array(column.astype(str).array)
    found = pc.index_in(values, value_set=pa.array(list(categories), type=values.type))
    return np.asarray(pc.fill_null(found, -1).to_numpy(), dtype=np.int64)


@dataclass
class Summary:
    job_id: str
    model: str
    data_sha256: str | None = None  # the model's training data (lineage)
    rows_scored: int = 0
    rows_rejected: int = 0
    rows_skipped: int = 0
    score_seconds: float = 0.0
    write_seconds: float = 0.0
    resumed_at_chunk: int = 0
    already_finished: bool = False
    reject_reasons: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        rows = self.rows_scored + self.rows_rejected
        total = self.score_seconds + self.write_seconds
        return {
            **self.__dict__,
            "rows_per_s_scoring": round(rows / self.score_seconds) if self.score_seconds else None,
            "rows_per_s_with_write": round(rows / total) if total else None,
        }


def probabilities_json(classes: tuple[str, ...] | list[str], probabilities: np.ndarray) -> pa.Array:
    """The JSON object {class: probability} of each row (null where the row has none), built
    column by column by Arrow; floats in their shortest round-trip form (`1e-7`, `0.25`)."""
    parts: list[Any] = []
    for i, name in enumerate(classes):
        values = pa.array(probabilities[:, i], from_pandas=True)  # NaN -> null
        parts += [("{" if i == 0 else ", ") + json.dumps(name) + ": ", pc.cast(values, pa.string())]
    return pc.binary_join_element_wise(*parts, "}", "")  # null in, null out


def chunk_keys(column: pd.Series | None, offset: int, n: int) -> list[str | None]:
    """Each row's key as its `str()` (None where missing); without a key column, the row's
    position in the input."""
    if column is None:
        return [str(i) for i in range(offset, offset + n)]
    values = column.astype(object).where(column.notna(), None).tolist()
    if isinstance(column.dtype, pd.StringDtype):  # already strings: no str() per row
        return cast(list[str | None], values)
    return [None if key is None else str(key) for key in values]


def score_chunk(
    use_case: UseCase,
    models: ScoringModels,
    frame: pd.DataFrame,
    seen: set[str],
    offset: int,
    job_id: str,
) -> tuple[ScoredChunk, list[tuple]]:
    """(the chunk's scores, column by column; reject rows) for one chunk; `seen` tracks keys
    across chunks."""
    key_column = use_case.key
    keys = chunk_keys(frame[key_column] if key_column else None, offset, len(frame))
    reasons, typed = validate_chunk(use_case, frame)
    distinct = set(keys)
    if len(distinct) == len(keys) and seen.isdisjoint(distinct):  # no repeat: no row-by-row
        if None in distinct:  # one row at most, here
            position = keys.index(None)
            if reasons[position] is None:
                reasons[position] = f"{key_column}: missing key"
            distinct.discard(None)
        seen.update(cast(set[str], distinct))
    else:  # the first row with a key keeps it; a later valid row with it is a duplicate
        for position, key in enumerate(keys):
            if reasons[position] is not None:
                if key is not None:
                    seen.add(key)
            elif key is None:
                reasons[position] = f"{key_column}: missing key"
            elif key in seen:
                reasons[position] = f"{key_column}: duplicate key"
            else:
                seen.add(key)
    valid = reasons == None  # noqa: E711 (elementwise)
    rejected = [(job_id, offset + i, keys[i], reasons[i]) for i in np.flatnonzero(~valid).tolist()]
    shared = {
        "job_id": job_id,
        "model_name": models.name,
        "model_version": models.version,
        "scored_at": now(),
    }
    if not valid.any():
        return ScoredChunk(SCORE_SCHEMA.empty_table(), shared), rejected
    if not valid.all():
        typed, frame = typed[valid], frame[valid].reset_index(drop=True)
    probabilities = models.predict(models.encode(typed))
    decisions = decide(use_case, probabilities, frame=frame)
    classes = use_case.target.classes
    labels = np.where(decisions.labels < 0, len(classes), decisions.labels)  # NO_LABEL: null
    columns = pa.table(
        [
            pa.array(list(compress(keys, valid.tolist())), type=pa.string()),
            pc.take(pa.array([*classes, None], type=pa.string()), pa.array(labels)),
            pa.array(decisions.scores, from_pandas=True),  # NaN (no probabilities): null
            probabilities_json(classes, decisions.probabilities),
            pa.array(decisions.reasons, type=pa.string()),
        ],
        schema=SCORE_SCHEMA,
    )
    return ScoredChunk(columns, shared), rejected


def run(
    use_case: UseCase,
    models: ScoringModels,
    source: str,
    output_db: str,
    table: str,
    *,
    chunk_rows: int,
    job_id: str | None = None,
    input_db: str | None = None,
    force: bool = False,
    progress: Callable[[int], None] | None = None,
) -> Summary:
    """Score `source` into `table`; resume where an interrupted run of the same job stopped."""
    job_id = (
        job_id
        or hashlib.sha256(
            json.dumps(
                [
                    source_fingerprint(source),
                    str(models.model.tag),
                    use_case.source_sha256,
                    table,
                    chunk_rows,
                ]
            ).encode()
        ).hexdigest()[:16]
    )
    sink = Sink(output_db, table)
    try:
        return _run(
            use_case, models, source, sink, table, job_id, chunk_rows, input_db, force, progress
        )
    finally:
        sink.engine.dispose()


def _run(
    use_case: UseCase,
    models: ScoringModels,
    source: str,
    sink: Sink,
    table: str,
    job_id: str,
    chunk_rows: int,
    input_db: str | None,
    force: bool,
    progress: Callable[[int], None] | None,
) -> Summary:
    record = sink.start(
        job_id,
        {
            "output_table": table,
            "use_case": use_case.name,
            "model": str(models.model.tag),
            "data_sha256": models.data_sha256,
            "source": source,
            "chunk_rows": chunk_rows,
        },
        force,
    )
    summary = Summary(job_id=job_id, model=str(models.model.tag), data_sha256=models.data_sha256)
    if record["status"] == "finished":
        summary.already_finished = True
        summary.rows_scored, summary.rows_rejected = record["rows_scored"], record["rows_rejected"]
        return summary
    if (record["chunk_rows"], record["model"]) != (chunk_rows, str(models.model.tag)):
        raise BatchError(
            f"job {job_id} ran with {record['model']} and {record['chunk_rows']} rows per chunk; "
            "resume it with the same, or --force to start over"
        )
    done = summary.resumed_at_chunk = record["chunks_done"]
    required = [*use_case.model_feature_names, *([use_case.key] if use_case.key else [])]
    seen: set[str] = set()
    offset = 0
    began = time.perf_counter()  # scoring time counts the reading of its chunk
    for index, frame in enumerate(read_chunks(source, chunk_rows, input_db)):
        absent = [name for name in required if name not in frame.columns]
        if absent:
            raise BatchError(f"input lacks columns {absent}")
        frame = frame.reset_index(drop=True)
        if index < done:  # committed by an earlier run: only remember its keys
            if use_case.key:
                seen.update(frame[use_case.key].dropna().astype(str))
            summary.rows_skipped += len(frame)
        else:
            scored, rejected = score_chunk(use_case, models, frame, seen, offset, job_id)
            written = time.perf_counter()
            sink.write_chunk(job_id, index, scored, rejected)
            summary.score_seconds += written - began
            summary.write_seconds += time.perf_counter() - written
            summary.rows_scored += len(scored)
            summary.rows_rejected += len(rejected)
            for *_, reason in rejected:
                summary.reject_reasons[reason] = summary.reject_reasons.get(reason, 0) + 1
        offset += len(frame)
        if progress:
            progress(len(frame))
        began = time.perf_counter()
    sink.finish(job_id)
    return summary
