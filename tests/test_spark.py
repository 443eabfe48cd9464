"""The batch scoring function on Spark (local mode) against the single-machine job, row for row."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
from sqlalchemy import text

from batch.scoring import resolve_models, run
from training.data import generate_churn

from .harness import IN_CI, connect

pytestmark = pytest.mark.process  # a Spark JVM


@pytest.fixture(scope="module")
def spark():
    if shutil.which("java") is None:  # Spark needs a JVM, which pip cannot install
        if IN_CI:
            pytest.fail("java is not installed: the Spark test cannot run")
        pytest.skip("java is not installed (Spark needs Java 17); CI requires it")
    from batch.spark import local_session

    session = local_session("scoring-tests")
    yield session
    session.stop()


def test_spark_scores_equal_the_single_machine_job(demo_models, churn, spark, tmp_path):
    from batch.spark import score_frame
    from configuration import get_settings

    frame = generate_churn(5000, seed=17).drop(columns=["churned"]).astype(object)
    frame.loc[4, "age"] = 3
    frame.loc[900, "plan_tier"] = "gold"
    frame.loc[2500, "customer_id"] = frame.loc[1200, "customer_id"]
    frame = frame.infer_objects()
    frame["plan_tier"] = frame["plan_tier"].astype(str).where(frame["plan_tier"].notna(), None)
    frame.to_parquet(tmp_path / "leads.parquet", index=False)

    models = resolve_models(churn, "xgboost", tag=None, alias="champion")
    url = f"sqlite:///{tmp_path / 'single.db'}"
    run(churn, models, str(tmp_path / "leads.parquet"), url, "scores", chunk_rows=1000)
    with connect(url) as conn:
        single = pd.read_sql(
            text("SELECT key, label, score, probabilities, model_version FROM scores"), conn
        )
        single_rejects = pd.read_sql(text("SELECT key, reason FROM scores_rejects"), conn)

    use_case_path = str(get_settings().use_case_path())
    scored = score_frame(
        use_case_path,
        "xgboost",
        str(models.model.tag),
        spark.read.parquet(str(tmp_path / "leads.parquet")),
    ).toPandas()
    on_spark = scored[scored["reject_reason"].isna()]
    spark_rejects = scored[scored["reject_reason"].notna()]

    columns = ["key", "label", "score", "probabilities", "model_version"]
    pd.testing.assert_frame_equal(
        on_spark[columns].sort_values("key").reset_index(drop=True),
        single[columns].sort_values("key").reset_index(drop=True),
    )
    assert len(on_spark) == 4997
    assert sorted(zip(spark_rejects["key"], spark_rejects["reject_reason"], strict=True)) == sorted(
        zip(single_rejects["key"], single_rejects["reason"], strict=True)
    )
