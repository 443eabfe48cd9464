"""Data lineage: which exact data trained a model (docs/training.md, "Data lineage").

MLflow's own dataset digest hashes at most the first 10,000 rows and keeps 8 hex characters, so
two different training files can share it. Here the digest is the SHA-256 of the whole table as
trained on: the validated frame written as CSV (pandas, no index, `\\n` line ends, empty for a
missing value), every row, in order; the same for the training and held-out parts of the split,
and the SHA-256 of the source file's bytes when the data came from a file. They go to the MLflow
run (tags, and three dataset inputs), the import copies them into each stored model (signed
labels and metadata), and `promote` refuses a version without them or whose file changed."""

from __future__ import annotations

import hashlib
import logging
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
import mlflow.data.pandas_dataset
import pandas as pd
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.dataset_source_registry import resolve_dataset_source

from configuration.digests import sha256_of

LOG = logging.getLogger(__name__)
CSV_CHUNK_ROWS = 50_000  # rows written to the hash at once (bounded memory on large tables)
MLFLOW_DIGEST_CHARS = 36  # MLflow's dataset digest column holds this many characters
TAGS = (  # run tags, and the stored models' metadata keys
    "data_sha256",
    "data_rows",
    "data_source",
    "data_source_sha256",
    "train_sha256",
    "holdout_sha256",
)


class LineageError(RuntimeError):
    """A model version whose training data cannot be vouched for."""


def frame_sha256(frame: pd.DataFrame) -> str:
    """SHA-256 of `frame`'s full content, as CSV (header, then every row in order)."""
    digest = hashlib.sha256()
    for start in range(0, max(len(frame), 1), CSV_CHUNK_ROWS):
        chunk = frame.iloc[start : start + CSV_CHUNK_ROWS]
        text = chunk.to_csv(index=False, header=start == 0, lineterminator="\n", na_rep="")
        digest.update(text.encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class DataLineage:
    data_sha256: str
    data_rows: int
    data_source: str  # as declared by the use case (a file is given by its resolved path)
    data_source_sha256: str  # the file's bytes; "" for a generator or a bundled dataset
    train_sha256: str
    holdout_sha256: str

    @classmethod
    def of(
        cls,
        frame: pd.DataFrame,
        source: str,
        file: Path | None,
        train_index: pd.Index,
        holdout_index: pd.Index,
    ) -> DataLineage:
        return cls(
            data_sha256=frame_sha256(frame),
            data_rows=len(frame),
            data_source=str(file.resolve()) if file is not None else source,
            data_source_sha256=sha256_of(file) if file is not None else "",
            train_sha256=frame_sha256(frame.loc[train_index]),
            holdout_sha256=frame_sha256(frame.loc[holdout_index]),
        )

    def tags(self) -> dict[str, str]:
        return {key: str(value) for key, value in asdict(self).items()}

    def log(
        self,
        name: str,
        frame: pd.DataFrame,
        target: str,
        train_index: pd.Index,
        holdout_index: pd.Index,
    ) -> None:
        """In the active MLflow run: the tags, and the table and both parts of its split as
        dataset inputs (contexts source, training, evaluation) carrying our digests."""
        mlflow.set_tags(self.tags())
        parts = [
            ("source", frame, self.data_sha256),
            ("training", frame.loc[train_index], self.train_sha256),
            ("evaluation", frame.loc[holdout_index], self.holdout_sha256),
        ]
        # a file is MLflow's local file source; generated or bundled data, a source by name
        source: DatasetSource = CodeDatasetSource({"data_source": self.data_source})
        if self.data_source_sha256:
            with warnings.catch_warnings():  # MLflow registers its local source twice, and says so
                warnings.filterwarnings(
                    "ignore", "The specified dataset source can be interpreted in multiple ways"
                )
                source = resolve_dataset_source(self.data_source)
        for context, part, sha256 in parts:
            dataset = mlflow.data.pandas_dataset.from_pandas(
                part,
                source=source,
                targets=target,
                name=f"{name}-{context}",
                digest=sha256[:MLFLOW_DIGEST_CHARS],
            )
            mlflow.log_input(
                dataset, context=context, tags={"sha256": sha256, "rows": str(len(part))}
            )


def check_run(run_tags: dict[str, Any], name: str) -> str:
    """The data digest of a run's model version `name`; LineageError if the run has none, or if
    its data file is still reachable and its bytes no longer hash to what was trained on."""
    digest = run_tags.get("data_sha256")
    if not digest:
        raise LineageError(f"{name} not promoted: its run records no data digest (data_sha256)")
    source = Path(str(run_tags.get("data_source", "")))
    expected = run_tags.get("data_source_sha256")
    if expected and source.is_absolute() and source.is_file():
        if (actual := sha256_of(source)) != expected:
            raise LineageError(
                f"{name} not promoted: its training file {source} changed since training "
                f"(SHA-256 {actual[:12]}..., trained on {expected[:12]}...)"
            )
    elif expected:
        LOG.warning("%s: its training file %s is not reachable here: not rechecked", name, source)
    return str(digest)
