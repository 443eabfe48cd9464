"""CLI: python -m batch {score,score-spark} [--use-case NAME]: score a table with the served
models."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from batch.scoring import BatchError, resolve_models
from batch.scoring import run as run_batch
from configuration import Settings, UseCaseError, get_settings
from training import jobs
from training.pipeline import FLAVORS
from training.registry import CHAMPION


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="python -m batch", description=__doc__)
    commands = root.add_subparsers(dest="command", required=True)
    use_case_help = "use case name (a YAML file in configuration/use_cases); default: settings"

    score = commands.add_parser("score", help="batch-score a file or SQL query into a table")
    score.add_argument("--use-case", help=use_case_help)
    score.add_argument("--input", required=True, help="a .csv/.parquet path, or sql:<query>")
    score.add_argument("--input-db", help="SQLAlchemy URL a sql: input runs against")
    score.add_argument("--output-db", help="SQLAlchemy URL (default: settings, SQLite)")
    score.add_argument("--table", help="output table (default: <use_case>_scores)")
    score.add_argument("--model", help="BentoML tag, e.g. churn-xgboost:latest (what serves)")
    score.add_argument("--alias", default=CHAMPION, help="else: the latest import of this alias")
    score.add_argument("--flavor", choices=FLAVORS, help="default: settings.model_flavor")
    score.add_argument("--chunk-rows", type=int, help="rows per transaction (default: settings)")
    score.add_argument("--job-id", help="default: derived from the input, model and table")
    score.add_argument("--force", action="store_true", help="redo a finished job")

    on_spark = commands.add_parser("score-spark", help="batch-score Parquet on Spark (local)")
    on_spark.add_argument("--use-case", help=use_case_help)
    on_spark.add_argument("--input", required=True, help="a Parquet file or folder")
    on_spark.add_argument("--output", required=True, help="folder for scores/ and rejects/")
    on_spark.add_argument("--model", help="BentoML tag (default: the latest champion import)")
    on_spark.add_argument("--flavor", choices=FLAVORS, help="default: settings.model_flavor")
    on_spark.add_argument("--cores", type=int, default=2, help="local[N] cores")
    return root


def score(settings: Settings, args: argparse.Namespace) -> dict:
    """The batch job with a progress bar; returns its summary."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    use_case, _ = jobs.use_case_of(settings, args.use_case)
    models = resolve_models(use_case, args.flavor or settings.model_flavor, args.model, args.alias)
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task(f"scoring with {models.model.tag}", total=None)
        summary = run_batch(
            use_case,
            models,
            args.input,
            args.output_db or settings.batch_database_url,
            args.table or f"{use_case.name}_scores",
            chunk_rows=args.chunk_rows or settings.batch_chunk_rows,
            job_id=args.job_id,
            input_db=args.input_db,
            force=args.force,
            progress=lambda rows: bar.advance(task, rows),
        )
    return summary.as_dict()


def score_spark(settings: Settings, args: argparse.Namespace) -> dict:
    """The batch scoring function on a local Spark session (pyspark: the `spark` extra)."""
    from batch.spark import local_session, score_parquet

    use_case, path = jobs.use_case_of(settings, args.use_case)
    flavor = args.flavor or settings.model_flavor
    models = resolve_models(use_case, flavor, args.model, CHAMPION)
    spark = local_session(cores=args.cores)
    try:
        started = time.perf_counter()
        counts = score_parquet(
            spark, str(path), flavor, str(models.model.tag), args.input, args.output
        )
    finally:
        spark.stop()
    rows = counts["rows_scored"] + counts["rows_rejected"]
    seconds = time.perf_counter() - started
    return {
        **counts,
        "model": str(models.model.tag),
        "data_sha256": models.data_sha256,
        "rows_per_s": round(rows / seconds),
    }


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    try:
        if args.command == "score":
            print(json.dumps(score(settings, args), indent=2, default=str))
        else:
            print(json.dumps(score_spark(settings, args)))
    except (UseCaseError, LookupError, BatchError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
