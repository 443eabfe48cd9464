"""Batch scoring: a file or SQL query scored in process, chunk by chunk, with the very
preprocessing and model the online service loads from the BentoML store, into a database table,
exactly once and resumable (`python -m training score`)."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Any

import bentoml
import numpy as np
import pandas as pd

from configuration import UseCase
from configuration.policy import decide
from runners.preprocessor import load_compiled, load_encoder
from training.batch_sink import Sink, now

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


def resolve_models(use_case: UseCase, flavor: str, tag: str | None, alias: str) -> ScoringModels:
    """By tag (`churn-xgboost:v3-…`, or `:latest` = what `bentoml serve` serves), else the most
    recent import under `alias`."""
    name = use_case.registered_name(flavor)
    if tag is not None:
        model = bentoml.models.get(tag)
    else:
        aliased = [m for m in bentoml.models.list(name) if m.info.labels.get("alias") == alias]
        if not aliased:
            raise BatchError(f"no {name} model imported under alias {alias!r}")
        model = max(aliased, key=lambda m: m.info.creation_time)
    preprocessor = bentoml.models.get(str(model.info.metadata["preprocessor_tag"]))
    if preprocessor.info.metadata["sha256"] != model.info.metadata["preprocessor_sha256"]:
        raise BatchError(f"{preprocessor.tag} is not the preprocessor {model.tag} was trained with")
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
    digest = hashlib.sha256()
    with Path(source).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def validate_chunk(use_case: UseCase, frame: pd.DataFrame) -> tuple[pd.Series, pd.DataFrame]:
    """Why each row breaks the contract (None where it does not): the same checks the API makes,
    vectorised over the chunk; and the model-input columns typed as `UseCase.frame` types them
    (numbers and booleans float64 with NaN, categories object with NaN), converted once for
    both. Coerces valid boolean spellings in `frame` in place."""
    n = len(frame)
    reasons = np.full(n, None, dtype=object)
    unset = np.ones(n, dtype=bool)

    def flag(mask: np.ndarray, reason: str) -> None:
        hit = mask & unset
        if hit.any():
            reasons[hit] = reason
            unset[hit] = False

    typed: dict[str, np.ndarray] = {}
    for spec in use_case.model_features:
        column = frame[spec.name]
        present = column.notna().to_numpy()
        if not spec.nullable:
            flag(~present, f"{spec.name}: missing")
        if spec.type == "numeric":
            values = np.asarray(pd.to_numeric(column, errors="coerce"), dtype=np.float64)
            flag(present & np.isnan(values), f"{spec.name}: not a number")
            flag(present & np.isinf(values), f"{spec.name}: not finite")
            low, high = float(spec.min or 0.0), float(spec.max or 0.0)  # set for numeric
            with np.errstate(invalid="ignore"):
                flag(values < low, f"{spec.name}: below {spec.min}")
                flag(values > high, f"{spec.name}: above {spec.max}")
            typed[spec.name] = values
        elif spec.type == "boolean":
            if column.dtype == bool:
                truth = column
            else:
                truth = column.map(
                    lambda v: True if v in TRUE_VALUES else False if v in FALSE_VALUES else None
                )
                flag(present & truth.isna().to_numpy(), f"{spec.name}: not a boolean")
                frame[spec.name] = truth
            typed[spec.name] = np.asarray(truth.astype("float64"), dtype=np.float64)
        else:
            flag(
                present & ~column.astype(str).isin(spec.categories).to_numpy(),
                f"{spec.name}: unknown category",
            )
            labels = column.astype(object).to_numpy(copy=True)
            labels[~present] = np.nan
            typed[spec.name] = labels
    return pd.Series(reasons, index=frame.index, dtype=object), pd.DataFrame(typed)


@dataclass
class Summary:
    job_id: str
    model: str
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


def score_chunk(
    use_case: UseCase,
    models: ScoringModels,
    frame: pd.DataFrame,
    seen: set[str],
    offset: int,
    job_id: str,
) -> tuple[list[tuple], list[tuple]]:
    """(prediction rows, reject rows) for one chunk; `seen` tracks keys across chunks."""
    key_column = use_case.key
    keys = (
        frame[key_column].astype(object).where(frame[key_column].notna(), None)
        if key_column
        else pd.Series(range(offset, offset + len(frame)), index=frame.index).astype(str)
    )
    reasons, typed = validate_chunk(use_case, frame)
    reasons[keys.isna() & reasons.isna()] = f"{key_column}: missing key"
    for position, key in enumerate(keys.tolist()):
        if key is None:
            continue
        key = str(key)
        if key in seen and reasons.iat[position] is None:
            reasons.iat[position] = f"{key_column}: duplicate key"
        seen.add(key)
    valid = reasons.isna().to_numpy()
    rejected = [
        (job_id, offset + i, None if keys.iat[i] is None else str(keys.iat[i]), reasons.iat[i])
        for i in np.flatnonzero(~valid).tolist()
    ]
    if not valid.any():
        return [], rejected
    scored_frame = frame[valid]
    probabilities = models.predict(models.encode(typed[valid]))
    decisions = decide(use_case, probabilities, frame=scored_frame.reset_index(drop=True))
    classes = use_case.target.classes
    # the JSON object {class: probability} as json.dumps writes it (floats by repr), from a
    # template: json.dumps per row was a third of the time of a chunk
    keys_json = [json.dumps(c).replace("%", "%%") for c in classes]
    template = "{" + ", ".join(f"{k}: %r" for k in keys_json) + "}"
    class_names = np.array([*classes, None], dtype=object)  # NO_LABEL (-1) picks the None
    scores = decisions.scores.astype(object)
    scores[np.isnan(decisions.scores)] = None  # a fallback without probabilities: NULLs
    answered = ~np.isnan(decisions.probabilities).any(axis=1)
    probabilities = np.full(len(answered), None, dtype=object)
    probabilities[answered] = [
        template % tuple(p) for p in decisions.probabilities[answered].tolist()
    ]
    # columns zipped into rows in C: a row-by-row comprehension was a third of the chunk
    scored = list(
        zip(
            repeat(job_id),
            map(str, keys[valid].tolist()),
            class_names[decisions.labels].tolist(),
            scores.tolist(),
            probabilities.tolist(),
            repeat(models.name),
            repeat(models.version),
            decisions.reasons.tolist(),
            repeat(now()),
        )
    )
    return scored, rejected


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
            "source": source,
            "chunk_rows": chunk_rows,
        },
        force,
    )
    summary = Summary(job_id=job_id, model=str(models.model.tag))
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
            began = time.perf_counter()
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
    sink.finish(job_id)
    return summary
