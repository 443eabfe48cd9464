"""Batch scoring into a database: parity with the online service, rejects, exactly once across a
real kill, on SQLite and on the machine's PostgreSQL."""

from __future__ import annotations

import json
import re
import signal
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import DateTime, text
from sqlalchemy.exc import DBAPIError

from batch.scoring import BatchError, resolve_models, run
from training.data import generate_churn

from .harness import cli_command, connect, run_cli, start_process

KILL_ROWS = 100_000
KILL_CHUNK = 2_000


@pytest.fixture(scope="module")
def models(demo_models, churn):
    return resolve_models(churn, "xgboost", tag=None, alias="champion")


def leads(n_rows: int, seed: int) -> pd.DataFrame:
    return generate_churn(n_rows, seed=seed).drop(columns=["churned"])


def read_table(url: str, table: str, job_id: str | None = None) -> pd.DataFrame:
    query = (
        "SELECT key, label, score, probabilities, model_name, model_version, fallback_reason "
        f'FROM "{table}"'
    )
    if job_id:
        query += f" WHERE job_id = '{job_id}'"
    with connect(url) as conn:
        return pd.read_sql(text(query), conn).sort_values("key").reset_index(drop=True)


def test_batch_scores_equal_the_online_service(models, churn, api_client, tmp_path):
    frame = leads(300, seed=21)
    frame.to_csv(tmp_path / "in.csv", index=False)
    url = f"sqlite:///{tmp_path / 'out.db'}"
    summary = run(churn, models, str(tmp_path / "in.csv"), url, "scores", chunk_rows=128)
    assert (summary.rows_scored, summary.rows_rejected) == (300, 0)
    batch = read_table(url, "scores").set_index("key")
    rows = [
        {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in r.items()}
        for r in frame.to_dict("records")
    ]
    online = api_client.post("/v1/predict_batch", json={"instances": rows}).json()
    assert online["errors"] == []
    batch = batch.astype(object).where(batch.notna(), None)  # NULL -> None, as JSON has it
    reasons = {p["fallback_reason"] for p in online["predictions"]}
    assert reasons == {None, "low_confidence"}  # both kinds of answer are compared
    for prediction in online["predictions"]:
        stored = batch.loc[prediction["key"]]
        assert stored["label"] == prediction["label"]
        assert stored["score"] == prediction["score"]
        assert stored["fallback_reason"] == prediction["fallback_reason"]
        probabilities = stored["probabilities"]
        assert (probabilities and json.loads(probabilities)) == prediction["probabilities"]
        assert stored["model_version"] == online["model"]["version"]
    with connect(url) as conn:  # the job record names the data that trained its model
        job = conn.execute(text("SELECT data_sha256 FROM scoring_jobs")).scalar()
    assert job == summary.data_sha256 == models.model.info.labels["data_sha256"]
    assert len(job) == 64


def test_a_job_table_of_an_earlier_release_gets_the_lineage_column(models, churn, tmp_path):
    url = f"sqlite:///{tmp_path / 'out.db'}"
    with connect(url) as conn:  # scoring_jobs as created before data lineage
        conn.execute(
            text(
                "CREATE TABLE scoring_jobs (job_id VARCHAR(64) PRIMARY KEY, output_table "
                "VARCHAR(128) NOT NULL, use_case VARCHAR(64) NOT NULL, model VARCHAR(256) NOT "
                "NULL, source TEXT NOT NULL, chunk_rows INTEGER NOT NULL, chunks_done INTEGER NOT "
                "NULL, rows_scored INTEGER NOT NULL, rows_rejected INTEGER NOT NULL, status "
                "VARCHAR(16) NOT NULL, started_at DATETIME NOT NULL, finished_at DATETIME)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO scoring_jobs VALUES ('old', 't', 'churn', 'm', 's', 1, 1, 1, 0, "
                "'finished', '2026-01-01 00:00:00', '2026-01-01 00:00:00')"
            )
        )
        conn.commit()
    leads(20, seed=4).to_csv(tmp_path / "in.csv", index=False)
    summary = run(
        churn, models, str(tmp_path / "in.csv"), url, "scores", chunk_rows=8, job_id="new"
    )
    assert summary.rows_scored == 20
    with connect(url) as conn:
        jobs = dict(conn.execute(text("SELECT job_id, data_sha256 FROM scoring_jobs")).all())
    assert jobs == {"old": None, "new": models.data_sha256} and models.data_sha256


def test_bad_rows_go_to_rejects_with_reasons_and_never_stop_the_job(models, churn, tmp_path):
    frame = leads(50, seed=3).astype(object)
    frame.loc[2, "age"] = 7
    frame.loc[5, "contract_type"] = "weekly"
    frame.loc[8, "tenure_months"] = "many"
    frame.loc[9, "auto_pay"] = "perhaps"
    frame.loc[12, "customer_id"] = frame.loc[11, "customer_id"]
    frame.loc[14, "monthly_charges"] = None
    frame.to_csv(tmp_path / "in.csv", index=False)
    url = f"sqlite:///{tmp_path / 'out.db'}"
    summary = run(churn, models, str(tmp_path / "in.csv"), url, "scores", chunk_rows=16)
    assert (summary.rows_scored, summary.rows_rejected) == (44, 6)
    with connect(url) as conn:
        rejects = dict(conn.execute(text("SELECT row_number, reason FROM scores_rejects")).all())
    assert rejects == {
        2: "age: below 18.0",
        5: "contract_type: unknown category",
        8: "tenure_months: not a number",
        9: "auto_pay: not a boolean",
        12: "customer_id: duplicate key",
        14: "monthly_charges: missing",
    }
    assert len(read_table(url, "scores")) == 44


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_each_row_lands_with_its_job_model_and_time_whatever_its_key(
    database, request, models, churn, tmp_path
):
    """Keys that CSV (PostgreSQL's COPY) must quote, and booleans spelled as the contract allows,
    land as given; every row carries its job, model and a scored_at of this run."""
    url = (
        f"sqlite:///{tmp_path / 'out.db'}"
        if database == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    table = f"scores_{uuid.uuid4().hex[:8]}"
    keys = ["plain", "", "with,comma", 'with "quotes"', "line\nbreak", "ünï €"]
    frame = leads(len(keys), seed=12)
    frame["customer_id"] = keys
    spelled = frame.assign(paperless_billing=["true", "1", "True", "0", "False", "FALSE"])
    frame["paperless_billing"] = [True, True, True, False, False, False]
    frame.to_parquet(tmp_path / "bools.parquet", index=False)
    spelled.to_parquet(tmp_path / "spelled.parquet", index=False)
    before = datetime.now(UTC)
    try:
        summary = run(churn, models, str(tmp_path / "spelled.parquet"), url, table, chunk_rows=4)
        run(churn, models, str(tmp_path / "bools.parquet"), url, f"{table}_b", chunk_rows=4)
        after = datetime.now(UTC)
        assert (summary.rows_scored, summary.rows_rejected) == (6, 0)
        stored = read_table(url, table).set_index("key")
        assert sorted(stored.index) == sorted(keys)
        pd.testing.assert_frame_equal(stored, read_table(url, f"{table}_b").set_index("key"))
        with connect(url) as conn:
            query = text(f'SELECT job_id, model_name, model_version, scored_at FROM "{table}"')
            rows = conn.execute(query.columns(scored_at=DateTime(timezone=True))).all()
            raw = conn.execute(text(f'SELECT scored_at FROM "{table}"')).scalars().all()
        if database == "sqlite":  # as SQLAlchemy writes DateTime there, like the jobs table
            assert all(re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}", v) for v in raw), raw
        for job_id, name, version, scored_at in rows:
            assert (job_id, name, version) == (summary.job_id, models.name, models.version)
            if scored_at.tzinfo is None:  # SQLite keeps UTC without the zone
                scored_at = scored_at.replace(tzinfo=UTC)
            assert before <= scored_at <= after
    finally:
        with connect(url, begin=True) as conn:
            for name in (table, f"{table}_b", f"{table}_rejects", f"{table}_b_rejects"):
                conn.execute(text(f'DROP TABLE IF EXISTS "{name}"'))
            conn.execute(text(f"DELETE FROM scoring_jobs WHERE output_table LIKE '{table}%'"))


def test_keys_repeated_or_missing_are_rejected_within_and_across_chunks(models, churn, tmp_path):
    """The first row with a key keeps it, even an invalid one; later valid rows with it are
    duplicates, in the same chunk or a later one. Chunks of 4: [a b - c] [a d e f] [g h i* j]
    [i k - l]; * is invalid."""
    frame = leads(16, seed=21).astype(object)
    frame["customer_id"] = list("ab-cadefghijik-l")
    frame.loc[frame["customer_id"] == "-", "customer_id"] = None
    frame.loc[10, "age"] = 5
    frame.to_csv(tmp_path / "in.csv", index=False)
    url = f"sqlite:///{tmp_path / 'out.db'}"
    summary = run(churn, models, str(tmp_path / "in.csv"), url, "scores", chunk_rows=4)
    with connect(url) as conn:
        rejects = conn.execute(text("SELECT row_number, key, reason FROM scores_rejects")).all()
    assert sorted(rejects) == [
        (2, None, "customer_id: missing key"),
        (4, "a", "customer_id: duplicate key"),
        (10, "i", "age: below 18.0"),
        (12, "i", "customer_id: duplicate key"),
        (14, None, "customer_id: missing key"),
    ]
    assert summary.rows_scored == 11
    assert sorted(read_table(url, "scores")["key"]) == list("abcdefghjkl")


def test_a_finished_job_is_not_redone_unless_forced(models, churn, tmp_path):
    leads(100, seed=4).to_csv(tmp_path / "in.csv", index=False)
    url = f"sqlite:///{tmp_path / 'out.db'}"
    first = run(churn, models, str(tmp_path / "in.csv"), url, "scores", chunk_rows=40)
    again = run(churn, models, str(tmp_path / "in.csv"), url, "scores", chunk_rows=40)
    assert not first.already_finished and again.already_finished
    assert again.rows_scored == 100 and again.score_seconds == 0
    forced = run(churn, models, str(tmp_path / "in.csv"), url, "scores", chunk_rows=40, force=True)
    assert not forced.already_finished and forced.rows_scored == 100
    assert len(read_table(url, "scores")) == 100


def test_a_job_resumes_only_with_the_model_and_chunking_it_started_with(models, churn, tmp_path):
    leads(30, seed=6).to_csv(tmp_path / "in.csv", index=False)
    url = f"sqlite:///{tmp_path / 'out.db'}"
    source = str(tmp_path / "in.csv")
    run(churn, models, source, url, "scores", chunk_rows=10, job_id="j")
    with connect(url, begin=True) as conn:  # as a run killed after its first chunk leaves it
        conn.execute(text("DELETE FROM scores WHERE key > 'C-000009'"))
        conn.execute(
            text("UPDATE scoring_jobs SET status = 'running', chunks_done = 1, rows_scored = 10")
        )
    with pytest.raises(BatchError, match="rows per chunk; resume it with the same"):
        run(churn, models, source, url, "scores", chunk_rows=20, job_id="j")
    resumed = run(churn, models, source, url, "scores", chunk_rows=10, job_id="j")
    assert resumed.resumed_at_chunk == 1 and resumed.rows_skipped == 10
    assert resumed.rows_scored == 20 and len(read_table(url, "scores")) == 30


def test_a_sql_query_scores_like_the_same_rows_from_a_file(models, churn, tmp_path):
    frame = leads(200, seed=8)
    frame.to_csv(tmp_path / "in.csv", index=False)
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    with connect(url, begin=True) as conn:
        frame.to_sql("leads", conn, index=False)
    run(churn, models, str(tmp_path / "in.csv"), url, "from_file", chunk_rows=64)
    query = "sql:SELECT * FROM leads ORDER BY customer_id"
    run(churn, models, query, url, "from_sql", chunk_rows=64, input_db=url)
    pd.testing.assert_frame_equal(read_table(url, "from_file"), read_table(url, "from_sql"))


def test_a_missing_column_fails_naming_it(models, churn, tmp_path):
    leads(10, seed=1).drop(columns=["tenure_months"]).to_csv(tmp_path / "in.csv", index=False)
    with pytest.raises(BatchError, match=r"lacks columns \['tenure_months'\]"):
        run(
            churn,
            models,
            str(tmp_path / "in.csv"),
            f"sqlite:///{tmp_path / 'o.db'}",
            "s",
            chunk_rows=5,
        )


def kill_mid_run_then_resume(
    url: str, table: str, source: Path, tmp_path: Path, job_id: str
) -> dict:
    """Start the CLI job, SIGKILL it once a few chunks are committed, run it again; the summary
    of the second run."""
    args = [
        "score",
        "--input",
        str(source),
        "--output-db",
        url,
        "--table",
        table,
        "--chunk-rows",
        str(KILL_CHUNK),
        "--job-id",
        job_id,
    ]
    first = start_process(cli_command("batch", *args), tmp_path / "first.log")
    done = 0
    deadline = time.monotonic() + 300
    while done < 5 and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.01)
        try:
            with connect(url) as conn:
                done = (
                    conn.execute(
                        text("SELECT chunks_done FROM scoring_jobs WHERE job_id = :j"),
                        {"j": job_id},
                    ).scalar()
                    or 0
                )
        except DBAPIError:  # the job has not created its tables yet
            continue
    first.send_signal(signal.SIGKILL)
    first.wait()
    with connect(url) as conn:
        status, done = conn.execute(
            text("SELECT status, chunks_done FROM scoring_jobs WHERE job_id = :j"), {"j": job_id}
        ).one()
    assert status == "running" and 5 <= done < KILL_ROWS // KILL_CHUNK, (status, done)
    second = run_cli("batch", *args)
    assert second.returncode == 0, second.stderr[-3000:]
    summary = json.loads(second.stdout)
    assert summary["resumed_at_chunk"] >= done
    return summary


@pytest.fixture(scope="module")
def kill_input(tmp_path_factory) -> Path:
    frame = leads(KILL_ROWS, seed=99).astype(object)
    frame.loc[[10, 20_000, 77_777], "age"] = 3  # three rejects, spread over the chunks
    path = tmp_path_factory.mktemp("kill") / "leads.csv"
    frame.to_csv(path, index=False)
    return path


def assert_exactly_once(url: str, table: str, reference: pd.DataFrame, job_id: str) -> None:
    killed = read_table(url, table, job_id=job_id)
    assert len(killed) == KILL_ROWS - 3 and killed["key"].is_unique
    pd.testing.assert_frame_equal(killed, reference)
    with connect(url) as conn:
        rejects = (
            conn.execute(
                text(f'SELECT row_number FROM "{table}_rejects" WHERE job_id = :j'), {"j": job_id}
            )
            .scalars()
            .all()
        )
    assert sorted(rejects) == [10, 20_000, 77_777]


@pytest.fixture(scope="module")
def kill_reference(models, churn, kill_input, tmp_path_factory) -> pd.DataFrame:
    url = f"sqlite:///{tmp_path_factory.mktemp('ref') / 'ref.db'}"
    run(churn, models, str(kill_input), url, "scores", chunk_rows=KILL_CHUNK, job_id="killed")
    return read_table(url, "scores", job_id="killed")


@pytest.mark.process
def test_killed_and_resumed_job_writes_each_row_exactly_once_sqlite(
    kill_input, kill_reference, tmp_path
):
    url = f"sqlite:///{tmp_path / 'scores.db'}"
    kill_mid_run_then_resume(url, "scores", kill_input, tmp_path, "killed")
    assert_exactly_once(url, "scores", kill_reference, "killed")


@pytest.mark.process
def test_killed_and_resumed_job_writes_each_row_exactly_once_postgres(
    postgres_url, kill_input, kill_reference, tmp_path
):
    table = job_id = f"scores_{uuid.uuid4().hex[:8]}"
    try:
        kill_mid_run_then_resume(postgres_url, table, kill_input, tmp_path, job_id)
        assert_exactly_once(postgres_url, table, kill_reference, job_id)
    finally:
        with connect(postgres_url, begin=True) as conn:
            conn.execute(text(f'DROP TABLE IF EXISTS "{table}", "{table}_rejects"'))
            conn.execute(text("DELETE FROM scoring_jobs WHERE output_table = :t"), {"t": table})


@pytest.mark.process
def test_the_old_training_score_command_still_scores_with_a_deprecation_warning(models, tmp_path):
    source = tmp_path / "few.csv"
    generate_churn(20, seed=5).to_csv(source, index=False)
    url = f"sqlite:///{tmp_path / 'alias.db'}"
    run = run_cli("training", "score", "--input", str(source), "--output-db", url, timeout_s=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "deprecated" in run.stderr and "python -m batch score" in run.stderr
    assert json.loads(run.stdout)["rows_scored"] == 20
