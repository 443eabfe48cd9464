"""Model lifecycle against a real `bentoml serve`: versions swapped under load without a failed
or mixed request, rollback, admin authentication, champion/challenger split and shadow."""

from __future__ import annotations

import asyncio
import shutil
import time

import httpx
import pytest

from api.routing import bucket

from .harness import build_bento, metric_total, rows, run_cli, run_python, serving

pytestmark = pytest.mark.e2e
TOKEN = "test-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def two_versions(demo_models, session_dir, tmp_path_factory) -> dict[str, str]:
    """A copy of the session's stores with a second version: trained again (another seed) and
    imported under the alias `candidate`. The environment that serves them."""
    home = tmp_path_factory.mktemp("lifecycle")
    shutil.copytree(session_dir / "bentoml", home / "bentoml")
    shutil.copy(session_dir / "mlflow.db", home / "mlflow.db")
    env = {
        "BENTOML_HOME": str(home / "bentoml"),
        "SCORING_MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
        "SCORING_TASK_DATABASE_URL": f"sqlite:///{home / 'tasks.db'}",
        "SCORING_SEED": "7",
    }
    for command in (["train"], ["import", "--alias", "candidate"]):
        result = run_cli("training", *command, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
    return {**env, "SCORING_ADMIN_TOKEN": TOKEN}


def put_routing(base: str, **spec) -> httpx.Response:
    return httpx.put(f"{base}/v1/admin/routing", json=spec, headers=ADMIN, timeout=120)


def test_admin_routes_are_off_without_a_token(server):
    response = httpx.get(f"{server}/v1/admin/routing", timeout=30)
    assert response.status_code == 404 and "disabled" in response.json()["error"]["message"]


def test_swap_and_rollback_under_load_fail_no_request(two_versions, churn, tmp_path):
    with serving(tmp_path / "serve.log", two_versions) as (base, _):
        info = httpx.get(f"{base}/v1/model", timeout=30).json()
        assert info["serving"]["version"] == "1" and info["routing"]["mode"] == "off"
        assert httpx.get(f"{base}/v1/admin/routing", timeout=30).status_code == 401
        wrong = httpx.get(
            f"{base}/v1/admin/routing", headers={"Authorization": "Bearer no"}, timeout=30
        )
        assert wrong.status_code == 403
        unknown = put_routing(base, champion="99")
        assert unknown.status_code == 404 and "version 99" in unknown.json()["error"]["message"]

        answers: list[tuple[float, int, dict]] = []
        swaps: dict[str, float] = {}

        async def load(stop: asyncio.Event) -> None:
            async with httpx.AsyncClient(base_url=base, timeout=60) as client:

                async def one_client(i: int) -> None:
                    n = 0
                    while not stop.is_set():
                        row = dict(churn.examples[n % 2], customer_id=f"L-{i}-{n}")
                        response = await client.post(
                            "/v1/predict_batch", json={"instances": [row, row]}
                        )
                        answers.append((time.monotonic(), response.status_code, response.json()))
                        n += 1

                await asyncio.gather(*(one_client(i) for i in range(16)))

        async def operate() -> None:
            stop = asyncio.Event()
            traffic = asyncio.create_task(load(stop))
            async with httpx.AsyncClient(base_url=base, timeout=120, headers=ADMIN) as admin:
                await asyncio.sleep(1.5)
                swapped = await admin.put("/v1/admin/routing", json={"champion": "2"})
                assert swapped.status_code == 200, swapped.text
                swaps["to_2"] = swapped.json()["swap_s"]
                model = (await admin.get("/v1/model")).json()
                assert model["serving"]["version"] == "2"
                await asyncio.sleep(1.5)
                back = await admin.put("/v1/admin/routing", json={"champion": "1"})
                assert back.status_code == 200, back.text
                swaps["to_1"] = back.json()["swap_s"]
                assert (await admin.get("/v1/model")).json()["serving"]["version"] == "1"
                await asyncio.sleep(1.5)
            stop.set()
            await traffic

        asyncio.run(operate())
        statuses = [status for _, status, _ in answers]
        assert len(statuses) > 100 and set(statuses) == {200}, set(statuses)
        served = []
        for _, _, body in answers:
            versions = {p["model_version"] for p in body["predictions"]}
            assert len(versions) == 1, f"one response mixed versions: {versions}"
            assert versions == {body["model"]["version"]}
            served.append(versions.pop())
        # 1, then 2, then 1 again: each switch once, in order (responses sorted by arrival)
        changes = [v for i, v in enumerate(served) if i == 0 or v != served[i - 1]]
        assert changes == ["1", "2", "1"], changes
        print(f"swap times: {swaps}; {len(answers)} requests, 0 failed")
        assert max(swaps.values()) < 10


def test_champion_challenger_split_and_shadow(two_versions, churn, tmp_path):
    with serving(tmp_path / "serve.log", two_versions) as (base, _):
        split = put_routing(base, champion="1", challenger="2", mode="split", share=0.5)
        assert split.status_code == 200, split.text
        batch = rows(churn, 200, prefix="K")
        first = httpx.post(f"{base}/v1/predict_batch", json={"instances": batch}, timeout=60)
        again = httpx.post(f"{base}/v1/predict_batch", json={"instances": batch}, timeout=60)
        arms = [p["arm"] for p in first.json()["predictions"]]
        assert arms == [p["arm"] for p in again.json()["predictions"]]  # sticky by key
        expected = ["challenger" if bucket(r["customer_id"]) < 0.5 else "champion" for r in batch]
        assert arms == expected and {"champion", "challenger"} == set(arms)
        for prediction in first.json()["predictions"]:
            assert (
                prediction["model_version"]
                == {"champion": "1", "challenger": "2"}[prediction["arm"]]
            )
        metrics = httpx.get(f"{base}/metrics", timeout=30).text
        for arm, version in (("champion", "1"), ("challenger", "2")):
            answered = arms.count(arm) * 2  # both requests
            labels = {"arm": arm, "model_version": version}
            assert metric_total(metrics, "scoring_predictions_total", **labels) == answered
            assert metric_total(metrics, "scoring_score_count", **labels) > 0
            assert metric_total(metrics, "scoring_confidence_count", **labels) == answered

        shadow = put_routing(base, champion="1", challenger="2", mode="shadow")
        assert shadow.status_code == 200
        info = httpx.get(f"{base}/v1/model", timeout=30).json()["routing"]
        assert info["mode"] == "shadow" and info["challenger"]["version"] == "2"
        answered = httpx.post(f"{base}/v1/predict_batch", json={"instances": batch}, timeout=60)
        assert {p["arm"] for p in answered.json()["predictions"]} == {"champion"}
        metrics = httpx.get(f"{base}/metrics", timeout=30).text
        compared = metric_total(metrics, "scoring_shadow_rows_total")
        agreed = metric_total(metrics, "scoring_shadow_rows_total", agree="true")
        assert compared > 0
        rate = metric_total(
            metrics, "scoring_shadow_agreement_rate", champion_version="1", challenger_version="2"
        )
        assert rate == pytest.approx(agreed / compared)


def test_a_bento_packs_the_newest_versions_for_rollback(two_versions):
    tag = build_bento(two_versions)
    listed = run_python(
        "-c",
        "import bentoml, sys; "
        "print(' '.join(str(m.tag) for m in bentoml.bentos.get(sys.argv[1]).info.all_models))",
        tag,
        env=two_versions,
        timeout_s=300,
    )
    assert listed.returncode == 0, listed.stderr[-3000:]
    models = listed.stdout.split()
    for name in ("churn-xgboost", "churn-preprocessor"):
        versions = {t.split(":")[1].split("-")[0] for t in models if t.startswith(f"{name}:")}
        assert versions == {"v1", "v2"}, models
