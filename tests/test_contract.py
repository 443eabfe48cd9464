"""The committed contract: every route's schemas per use case and version, and an OpenAPI
document that declares the error shape and statuses that are really sent."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from api.contract import API_PREFIX
from api.openapi import publish
from configuration import get_settings, load_use_case
from contracts import current, differences, path_for, snapshot_of

from .harness import run_python

USE_CASES = sorted(p.stem for p in get_settings().use_case_dir.glob("*.yaml"))


@pytest.mark.process  # contracts.current: a fresh interpreter per use case
@pytest.mark.parametrize("name", USE_CASES)
def test_the_code_matches_the_committed_contract(name):
    use_case = load_use_case(get_settings().use_case_path(name))
    path = path_for(name, use_case.contract_version)
    assert path.is_file(), f"no committed contract for {name} v{use_case.contract_version}"
    changed = differences(json.loads(path.read_text()), current(name))
    assert not changed, (
        f"the {name} contract changed without a version bump: {changed[:10]}; bump "
        "contract_version in its YAML and run `python -m contracts --write`"
    )


@pytest.mark.process
def test_a_changed_contract_without_a_version_bump_fails_the_check(tmp_path):
    """Add a feature to churn, keep contract_version: the check names the change and fails,
    and --write refuses to overwrite the recorded version."""
    raw = yaml.safe_load((get_settings().use_case_dir / "churn.yaml").read_text())
    raw["features"].append(
        {"name": "referrals", "type": "numeric", "min": 0, "max": 50, "description": "Referrals."}
    )
    (tmp_path / "churn.yaml").write_text(yaml.safe_dump(raw))
    version = raw["contract_version"]
    changed = differences(
        json.loads(path_for("churn", version).read_text()), current("churn", tmp_path)
    )
    assert "/schemas/ChurnRow/properties/referrals: added" in changed
    for args in ([], ["--write"]):
        result = contracts_command(tmp_path, *args)
        assert result.returncode == 1, result.stdout + result.stderr
        assert "Bump contract_version in churn.yaml" in result.stderr
    assert json.loads(path_for("churn", version).read_text())["contract_version"] == version


def contracts_command(use_case_dir, *args: str, contracts_dir=None):
    """`python -m contracts ARGS` on the use cases in `use_case_dir` (and, if given, with the
    recorded contracts read from and written to `contracts_dir`)."""
    redirect = (
        f"contracts.CONTRACTS_DIR = pathlib.Path({str(contracts_dir)!r}); " if contracts_dir else ""
    )
    script = (
        f"import contracts, pathlib, sys; {redirect}"
        f"sys.argv = ['contracts', *{list(args)!r}]; "
        "from contracts.__main__ import main; sys.exit(main())"
    )
    return run_python(
        "-c",
        script,
        env={"SCORING_USE_CASE_DIR": str(use_case_dir)},
        unset=[k for k in os.environ if k.startswith("SCORING_")],
        timeout_s=300,
    )


@pytest.mark.process
def test_a_version_bump_is_recorded_as_a_new_file(tmp_path):
    raw = yaml.safe_load((get_settings().use_case_dir / "churn.yaml").read_text())
    raw["contract_version"] += 1
    bumped = raw["contract_version"]
    (tmp_path / "churn.yaml").write_text(yaml.safe_dump(raw))
    result = contracts_command(tmp_path, "--write", contracts_dir=tmp_path / "c")
    assert result.returncode == 0, result.stderr
    recorded = json.loads((tmp_path / "c" / "churn" / f"v{bumped}.json").read_text())
    assert recorded["contract_version"] == bumped


class TestServedOpenAPI:
    def test_the_served_document_is_the_committed_contract(self, api_client, churn):
        spec = api_client.get("/docs.json").json()
        served = snapshot_of(spec, API_PREFIX, churn.name, churn.contract_version)
        recorded = json.loads(path_for("churn", churn.contract_version).read_text())
        assert not differences(recorded, served)

    @pytest.mark.parametrize(
        ("path", "method", "statuses"),
        [
            ("/v1/predict", "post", {"400", "413", "415", "429", "500", "504"}),
            ("/v1/predict_batch", "post", {"400", "413", "415", "429", "500", "504"}),
            ("/v1/explain", "post", {"400", "413", "415", "429", "500", "503", "504"}),
            ("/v1/tasks", "post", {"400", "403", "409", "413", "415", "429", "500", "504"}),
            ("/v1/tasks/{task_id}/result", "get", {"404", "409", "429", "500"}),
            ("/v1/tasks/{task_id}/events", "get", {"404", "429", "500"}),
        ],
    )
    def test_errors_are_declared_with_the_one_shape(self, api_client, path, method, statuses):
        spec = api_client.get("/docs.json").json()
        responses = spec["paths"][path][method]["responses"]
        assert {s for s in responses if int(s) >= 400} == statuses
        for status in statuses:
            schema = responses[status]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorResponse"}
        error = spec["components"]["schemas"]["ErrorResponse"]
        assert set(error["properties"]) == {"error", "contract_version"}
        body = spec["components"]["schemas"]["ErrorBody"]
        assert set(body["properties"]) == {"code", "message", "details"}

    def test_publish_drops_bentomls_own_error_schemas(self):
        spec = {
            "paths": {
                "/v1/x": {
                    "post": {
                        "responses": {
                            "200": {"description": "ok"},
                            "400": {"$ref": "#/components/schemas/InvalidArgument"},
                            "422": {"$ref": "#/components/schemas/HTTPValidationError"},
                        }
                    }
                }
            },
            "components": {"schemas": {"HTTPValidationError": {}}},
        }
        publish(spec, {"/v1/x": {"post": (400, 413)}}, {})
        assert sorted(spec["paths"]["/v1/x"]["post"]["responses"]) == ["200", "400", "413", "500"]
        assert "HTTPValidationError" not in spec["components"]["schemas"]
