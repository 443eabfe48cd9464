"""The batch scoring function on Apache Spark (`mapInPandas`), for inputs beyond one machine.

Each Spark task loads the same stored preprocessor and model as `batch.scoring` (from the
BentoML store, which executors must be able to read: local disk in local mode, a shared or
exported store on a cluster) and scores its partition with `batch.scoring.score_chunk`. pyspark
is an optional extra, in the dev lock: `bash .ci/setup dev` (requirements/dev.txt).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pandas as pd

from batch.scoring import ScoringModels, resolve_models, score_chunk
from configuration import PROJECT_ROOT, UseCase, load_use_case

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

OUTPUT_SCHEMA = (
    "key string, label string, score double, probabilities string, model_name string, "
    "model_version string, fallback_reason string, reject_reason string"
)
ORDER_COLUMN = "_scoring_order"
DUPLICATE_COLUMN = "_scoring_duplicate"


def local_session(app_name: str = "scoring", cores: int = 2) -> SparkSession:
    """A local-mode session whose Python workers import this project."""
    from pyspark.sql import SparkSession

    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(PROJECT_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    return (
        SparkSession.builder.master(f"local[{cores}]")
        .appName(app_name)
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", str(cores))
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .getOrCreate()
    )


def score_frame(use_case_path: str, flavor: str, model_tag: str, frame: DataFrame) -> DataFrame:
    """Scores and rejects of a Spark DataFrame, one output row per input row."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    use_case = load_use_case(use_case_path)
    ordered = frame.withColumn(ORDER_COLUMN, F.monotonically_increasing_id())
    if use_case.key:  # a repeated key is rejected after its first occurrence, as in one process
        first = Window.partitionBy(use_case.key).orderBy(ORDER_COLUMN)
        ordered = ordered.withColumn(DUPLICATE_COLUMN, F.row_number().over(first) > 1)

    def score_partition(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        job_use_case: UseCase = load_use_case(use_case_path)
        models = resolve_models(job_use_case, flavor, model_tag, alias="")
        for batch in batches:
            yield _score_batch(job_use_case, models, batch.reset_index(drop=True))

    return ordered.mapInPandas(score_partition, OUTPUT_SCHEMA)


def score_parquet(
    spark: SparkSession,
    use_case_path: str,
    flavor: str,
    model_tag: str,
    source: str,
    output: str,
) -> dict[str, int]:
    """Score a Parquet dataset into Parquet: `<output>/scores` and `<output>/rejects`."""
    result = score_frame(use_case_path, flavor, model_tag, spark.read.parquet(source)).cache()
    scored = result.filter("reject_reason IS NULL").drop("reject_reason")
    rejects = result.filter("reject_reason IS NOT NULL").select("key", "reject_reason")
    scored.write.mode("overwrite").parquet(f"{output}/scores")
    rejects.write.mode("overwrite").parquet(f"{output}/rejects")
    counts = {"rows_scored": scored.count(), "rows_rejected": rejects.count()}
    result.unpersist()
    return counts


def _score_batch(use_case: UseCase, models: ScoringModels, batch: pd.DataFrame) -> pd.DataFrame:
    columns = [c.split()[0] for c in OUTPUT_SCHEMA.split(", ")]
    repeated = batch.pop(DUPLICATE_COLUMN) if DUPLICATE_COLUMN in batch else None
    batch = batch.drop(columns=[ORDER_COLUMN])
    rows: list[dict[str, object]] = []  # rejects
    if repeated is not None and repeated.any():
        reason = f"{use_case.key}: duplicate key"
        rows += [
            {"key": str(k), "reject_reason": reason} for k in batch.loc[repeated, use_case.key]
        ]
        batch = batch.loc[~repeated].reset_index(drop=True)
    scored, rejected = score_chunk(use_case, models, batch, set(), 0, job_id="spark")
    table = scored.table()
    # object columns: pyspark 4.3 cannot convert pandas 3's arrow-backed string columns
    out = pd.DataFrame(
        {name: table[name].to_numpy(zero_copy_only=False) for name in columns[:-1]}, dtype=object
    )
    out["reject_reason"] = None
    rows += [{"key": r[2], "reject_reason": r[3]} for r in rejected]
    if rows:
        rejects = pd.DataFrame(rows, columns=columns, dtype=object)
        out = pd.concat([out, rejects], ignore_index=True) if len(out) else rejects
    return out.astype({"score": "float64"})
