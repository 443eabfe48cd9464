"""The page at /ui in a real browser (Debian's Chromium, driven by Playwright) against a real
`bentoml serve`: it scores as the API does, shows a 400 beside its field, scores a file as a
task, and works for another use case unchanged. Each test saves a screenshot (its tmp_path, and
SCORING_TEST_SCREENSHOTS when set) and fails on any browser console error."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .harness import IN_CI, PROJECT, rows, serving

pytestmark = pytest.mark.e2e
CHROMIUM = shutil.which("chromium")  # .ci/run installs it
# Debian's Chromium, not Playwright's download (unreachable here): headless, nothing phoned home
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOP_K = 8  # the page's default number of features in the explanation
WAIT_MS = 60_000
FILE_ROWS = 2000
INVALID_AT = (7, 1500)  # rows of the file given an out-of-range age
BAD_STATUS = "the server responded with a status of 400"


def csv_cell(value: object) -> object:
    """A value as a spreadsheet writes it: empty when missing, true/false."""
    if value is None:
        return ""
    return str(value).lower() if isinstance(value, bool) else value


def readme_example() -> dict:
    """The row of the README's first request."""
    readme = (PROJECT / "README.md").read_text()
    body = re.search(r"-d '(\{.*?\})'", readme, flags=re.DOTALL)
    assert body, "no example request in README.md"
    return dict(json.loads(body[1])["instance"])


@pytest.fixture(scope="module")
def browser() -> Iterator:
    if CHROMIUM is None:
        message = "chromium is not installed (apt-get install chromium)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def churn_server(demo_models, tmp_path_factory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("ui-churn")
    env = {
        "SCORING_TASK_DATABASE_URL": f"sqlite:///{folder / 'tasks.db'}",
        "SCORING_EXPLAIN_BUDGET_MS": "5000",  # a busy CI machine must not drop the chart
    }
    with serving(folder / "serve.log", env) as (base, _):
        yield base


@pytest.fixture(scope="module")
def breast_cancer_server(demo_models, tmp_path_factory) -> Iterator[str]:
    """breast_cancer trained, promoted and imported into the session's store, and served."""
    from configuration import get_settings
    from training import jobs

    jobs.demo(get_settings(), "breast_cancer")
    folder = tmp_path_factory.mktemp("ui-breast-cancer")
    env = {
        "SCORING_USE_CASE": "breast_cancer",
        "SCORING_TASK_DATABASE_URL": f"sqlite:///{folder / 'tasks.db'}",
        "SCORING_EXPLAIN_BUDGET_MS": "5000",
    }
    with serving(folder / "serve.log", env) as (base, _):
        yield base


@pytest.fixture(scope="module")
def yaml_only_server(demo_models, tmp_path_factory) -> Iterator[tuple[str, dict]]:
    """A multiclass use case added as a YAML file and a CSV only, without examples, trained
    and served; (its base URL, a row of its data)."""
    from sklearn.datasets import load_iris

    from configuration import get_settings
    from training import jobs

    folder = tmp_path_factory.mktemp("ui-flowers")
    frame = load_iris(as_frame=True).frame
    columns = [re.sub(r"\W+", "_", c.replace(" (cm)", "")) for c in frame.columns[:4]]
    frame.columns = [*columns, "species"]
    frame["species"] = load_iris().target_names[frame["species"]]
    frame.to_csv(folder / "flowers.csv", index=False)
    spec = {
        "name": "flowers",
        "description": "Iris species from flower measurements.",
        "task": "multiclass",
        "target": {"name": "species", "classes": ["setosa", "versicolor", "virginica"]},
        "data": {"source": "flowers.csv"},
        "features": [
            {"name": c, "type": "numeric", "min": 0, "max": 20, "description": f"{c} in cm."}
            for c in columns
        ],
    }
    (folder / "flowers.yaml").write_text(json.dumps(spec))  # JSON is YAML
    jobs.demo(get_settings().model_copy(update={"use_case_dir": folder}), "flowers")
    env = {
        "SCORING_USE_CASE_DIR": str(folder),
        "SCORING_USE_CASE": "flowers",
        "SCORING_TASK_DATABASE_URL": f"sqlite:///{folder / 'tasks.db'}",
        "SCORING_EXPLAIN_BUDGET_MS": "5000",
    }
    with serving(folder / "serve.log", env) as (base, _):
        yield base, {c: float(frame.at[100, c]) for c in columns}


class Tab:
    """A page of its own browser context, with every console error it logged."""

    def __init__(self, browser, base: str, width: int = 1280, height: int = 900) -> None:
        self.context = browser.new_context(
            viewport={"width": width, "height": height}, accept_downloads=True
        )
        self.page = self.context.new_page()
        self.page.set_default_timeout(WAIT_MS)
        self.errors: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(f"{base}/ui")
        self.page.wait_for_selector("body[data-ready=true]")

    def fill(self, row: dict) -> None:
        for name, value in row.items():
            field = self.page.locator(f"#f-{name}")
            if value is None:
                self.page.check(f"#f-{name}-unknown")
            elif isinstance(value, bool):
                field.select_option("true" if value else "false")
            elif field.evaluate("e => e.tagName") == "SELECT":
                field.select_option(str(value))
            else:
                field.fill(str(value))

    def score(self) -> None:
        """Submit the form and wait for its answer, or its error."""
        self.page.click("#score")
        self.page.wait_for_selector("#score:enabled")

    def finish(self, tmp_path: Path, name: str, expected: tuple[str, ...] = ()) -> None:
        """Screenshot the whole page; fail on any console error not `expected`."""
        shot = tmp_path / f"{name}.png"
        self.page.screenshot(path=shot, full_page=True)
        if folder := os.environ.get("SCORING_TEST_SCREENSHOTS"):
            Path(folder).mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, Path(folder) / shot.name)
        self.context.close()
        unexpected = [e for e in self.errors if not any(x in e for x in expected)]
        assert unexpected == [], unexpected


def shown_answer(page) -> dict:
    """The label, probabilities (as shown and as held) and contribution bars on the page."""
    return page.evaluate(
        """() => ({
        label: document.getElementById('label').textContent,
        probabilities: [...document.querySelectorAll('#probabilities tbody tr')].map(r =>
            [r.dataset.class, r.cells[1].textContent, Number(r.cells[1].dataset.value)]),
        bars: [...document.querySelectorAll('#explanation .bar')].map(b => b.dataset.feature),
    })"""
    )


def assert_shows(page, answer: dict) -> None:
    shown = shown_answer(page)
    prediction = answer["prediction"]
    assert shown["label"] == prediction["label"]
    assert [c for c, _, _ in shown["probabilities"]] == list(prediction["probabilities"])
    for name, text, value in shown["probabilities"]:
        assert value == prediction["probabilities"][name]
        assert abs(float(text.rstrip("%")) - 100 * value) <= 0.005 + 1e-9, (text, value)
    assert answer["explanation_status"] == "ok"
    assert shown["bars"] == [c["feature"] for c in answer["explanation"]["contributions"]]


def predict(base: str, row: dict) -> httpx.Response:
    body = {"instance": row, "explain": True, "top_k": TOP_K}
    return httpx.post(f"{base}/v1/predict", json=body, timeout=30)


def page_cost(page) -> dict:
    """Bytes transferred for the page, its assets and its start-up API calls, and ms to
    interactive (the form built and every handler attached), from the browser's timing."""
    return page.evaluate(
        """() => {
        const nav = performance.getEntriesByType('navigation')[0];
        const all = [nav, ...performance.getEntriesByType('resource')];
        return {bytes: all.reduce((s, e) => s + e.transferSize, 0),
                requests: all.length,
                interactive_ms: performance.getEntriesByName('ui-ready')[0].startTime,
                dom_content_loaded_ms: nav.domContentLoadedEventEnd};
    }"""
    )


def test_the_form_scores_the_readme_example_as_the_api_does(churn_server, browser, tmp_path):
    tab = Tab(browser, churn_server)
    cost = page_cost(tab.page)
    print(f"/ui: {cost}")
    assert cost["bytes"] < 150_000, cost
    row = readme_example()
    tab.fill(row)
    tab.score()
    answer = predict(churn_server, row)
    assert answer.status_code == 200
    assert_shows(tab.page, answer.json())
    assert tab.page.is_visible("text=Answered by the model")
    tab.finish(tmp_path, "ui-score-one")


def test_an_out_of_range_value_is_shown_beside_its_field(churn_server, browser, tmp_path):
    tab = Tab(browser, churn_server)
    tab.page.click("[data-preset='0']")
    tab.score()
    before = shown_answer(tab.page)
    assert before["label"] and before["bars"]
    tab.page.fill("#f-age", "12")
    tab.score()
    refused = predict(churn_server, {**readme_example(), "age": 12})
    assert refused.status_code == 400
    [detail] = refused.json()["error"]["details"]
    assert detail["loc"][-1] == "age"
    assert tab.page.text_content("#f-age-error") == detail["msg"]
    assert tab.page.get_attribute("#f-age", "aria-invalid") == "true"
    others = tab.page.eval_on_selector_all(
        ".field-error:not(#f-age-error)", "nodes => nodes.map(n => n.textContent).join('')"
    )
    assert others == ""
    assert shown_answer(tab.page) == before  # the last answer stays as it was
    tab.finish(tmp_path, "ui-out-of-range", expected=(BAD_STATUS,))


def test_a_csv_file_is_scored_as_a_task(churn_server, browser, churn, tmp_path):
    table = rows(churn, FILE_ROWS, prefix="U")
    for index in INVALID_AT:
        table[index] = {**table[index], "age": 5}
    columns = sorted({name for row in table for name in row})
    upload = tmp_path / "customers.csv"
    with upload.open("w", newline="") as file:
        writer = csv.DictWriter(file, columns)
        writer.writeheader()
        for row in table:
            writer.writerow({name: csv_cell(value) for name, value in row.items()})
    tab = Tab(browser, churn_server)
    tab.page.set_input_files("#csv", upload)
    tab.page.click("#upload")
    tab.page.wait_for_selector("#progress[data-task]")  # set once the results are shown
    assert tab.page.eval_on_selector("#progress", "bar => bar.value") == 100
    summary = tab.page.text_content("#results-summary")
    assert summary.startswith(f"2,000 rows: 1,998 scored, {len(INVALID_AT)} invalid"), summary
    invalid = tab.page.eval_on_selector_all("#invalid li", "items => items.map(i => i.dataset.row)")
    assert invalid == [str(i) for i in INVALID_AT]
    assert tab.page.locator("#results-table tbody tr").count() == 50
    assert "of 2,000" in tab.page.text_content("#page-info")

    task_id = tab.page.get_attribute("#progress", "data-task")
    result = httpx.get(f"{churn_server}/v1/tasks/{task_id}/result", timeout=30).json()
    with tab.page.expect_download() as download:
        tab.page.click("#download")
    lines = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text())))
    assert len(lines) == FILE_ROWS
    errors = {e["index"]: e["message"] for e in result["errors"]}
    for index, (line, prediction) in enumerate(zip(lines, result["predictions"], strict=True)):
        assert int(line["row"]) == index
        if prediction is None:
            assert line["error"] == errors[index] and line["label"] == ""
            continue
        assert line["key"] == prediction["key"] and line["label"] == prediction["label"]
        assert line["source"] == prediction["source"] and line["arm"] == prediction["arm"]
        assert float(line["score"]) == prediction["score"]
        for name, probability in prediction["probabilities"].items():
            assert float(line[f"probability_{name}"]) == probability

    tab.page.click("#refresh")  # the file's rows are recent rows: drift is measured now
    tab.page.wait_for_selector("#drift .bar")
    drift = httpx.get(f"{churn_server}/v1/drift", timeout=30).json()
    bars = tab.page.eval_on_selector_all("#drift .bar", "bars => bars.map(b => b.dataset.feature)")
    assert bars == [*drift["features"], "score"]
    tab.finish(tmp_path, "ui-score-a-file")


def test_the_page_works_unchanged_for_breast_cancer(breast_cancer_server, browser, tmp_path):
    tab = Tab(browser, breast_cancer_server, width=390, height=844)  # a phone
    assert tab.page.text_content("#title") == "Scoring: breast_cancer"
    example = json.loads(tab.page.evaluate("() => fetch('/ui/examples.json').then(r => r.text())"))
    tab.page.click("[data-preset='0']")
    tab.score()
    answer = predict(breast_cancer_server, example["examples"][0])
    assert answer.status_code == 200
    assert_shows(tab.page, answer.json())
    assert tab.page.locator("#metrics").is_visible()
    width = tab.page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the page scrolls sideways on a phone: {width} px"
    tab.finish(tmp_path, "ui-breast-cancer-phone")


def test_a_use_case_added_as_yaml_only_multiclass_without_examples(
    yaml_only_server, browser, tmp_path
):
    base, row = yaml_only_server
    tab = Tab(browser, base)
    assert tab.page.is_hidden("#presets")  # no examples: no presets
    tab.fill(row)
    tab.score()
    answer = predict(base, row)
    assert answer.status_code == 200
    assert len(answer.json()["prediction"]["probabilities"]) == 3
    assert_shows(tab.page, answer.json())
    tab.finish(tmp_path, "ui-yaml-only-multiclass")


def test_scored_in_the_browser_with_the_onnx_graph_as_the_server_scores(
    churn_server, churn, browser, tmp_path
):
    """ "Score in this browser": /v1/model.onnx run by onnxruntime-web in Chromium answers the
    README's example and 100 rows (examples, random rows with missing values and every
    category) with the server's probabilities within 1e-5."""
    from api.ui import VENDOR_DIR, VENDOR_FILES
    from training.onnx_export import parity_rows

    if missing := [name for name in VENDOR_FILES if not (VENDOR_DIR / name).is_file()]:
        message = f"onnxruntime-web not fetched (bash .ci/onnxruntime-web needs npm): {missing}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)

    graph = httpx.get(f"{churn_server}/v1/model.onnx", timeout=30)
    assert graph.status_code == 200
    assert hashlib.sha256(graph.content).hexdigest() == graph.headers["x-model-sha256"]
    tab = Tab(browser, churn_server)
    row = readme_example()
    tab.fill(row)
    tab.page.click("#score-local")
    tab.page.wait_for_selector("#local-answer")  # visible once the browser answered
    shown = tab.page.eval_on_selector_all(
        "#local-probabilities tbody tr",
        "rows => rows.map(r => [r.dataset.class, Number(r.cells[1].dataset.value)])",
    )
    answer = predict(churn_server, row).json()["prediction"]
    assert [c for c, _ in shown] == list(answer["probabilities"])
    readme_diff = max(abs(p - answer["probabilities"][c]) for c, p in shown)
    assert tab.page.text_content("#local-label") == answer["label"]
    assert graph.headers["x-model-sha256"][:12] in tab.page.text_content("#local-model")

    # 100 rows the model answers itself (a low-confidence answer falls back to the use case's
    # rule, without probabilities): examples, then random rows with missing values
    candidates = parity_rows(churn, 400, seed=7)
    served = httpx.post(
        f"{churn_server}/v1/predict_batch", json={"instances": candidates}, timeout=60
    )
    assert served.status_code == 200
    answered = [
        (row, prediction)
        for row, prediction in zip(candidates, served.json()["predictions"], strict=True)
        if prediction["source"] == "model"
    ][:100]
    assert len(answered) == 100
    rows = [row for row, _ in answered]
    local = tab.page.evaluate("rows => browserScores(rows)", rows)
    assert local["model"]["sha256"] == graph.headers["x-model-sha256"]
    diffs = [
        abs(p - prediction["probabilities"][c])
        for mine, (_, prediction) in zip(local["probabilities"], answered, strict=True)
        for c, p in mine.items()
    ]
    assert len(diffs) == 100 * len(churn.target.classes)
    print(f"in-browser max |dp|: README example {readme_diff:.3g}, 100 rows {max(diffs):.3g}")
    assert readme_diff < 1e-5 and max(diffs) < 1e-5
    tab.finish(tmp_path, "ui-score-in-browser")
