"""The container image (packaging/image.sh) serves, slim and as a non-root user, and the Kubernetes
manifest that deploys it. Image tests run with docker or podman; CI=true makes a missing tool fail.
SCORING_TEST_IMAGE=<tag> tests an image built elsewhere instead of building one."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from .harness import IN_CI, PROJECT, build_bento, free_port

IMAGE_SCRIPT = PROJECT / "packaging" / "image.sh"
MANIFEST = PROJECT / "deploy" / "kubernetes.yaml"
IMAGE_BUDGET_MB = 650
SERVICE_UID = 1034  # BentoML's `bentoml` user, which packaging/Dockerfile.j2 runs as
CONTAINER_PORT = 3000
READY_TIMEOUT_S = 120
# as deploy/kubernetes.yaml runs the pod: read-only root, /tmp writable, BENTOML_HOME under it;
# the task queue, which the pod keeps in PostgreSQL, in SQLite under /tmp
HARDENED = [
    "--read-only",
    "--tmpfs",
    "/tmp",
    "--env",
    "BENTOML_HOME=/tmp/bentoml",
    "--env",
    "SCORING_TASK_DATABASE_URL=sqlite:////tmp/tasks.db",
]
SERVING_MODULES = ("numpy", "scipy", "pandas", "sklearn", "skops.io", "xgboost", "bentoml")


# ---- fast: no container ------------------------------------------------------------------------


def manifest() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(MANIFEST.read_text())}


def test_deploy_manifest_probes_resources_and_restart_policy():
    from configuration import Settings

    docs = manifest()
    assert set(docs) == {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Always"  # the only way back after a worker dies
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == SERVICE_UID
    (container,) = pod["containers"]
    assert container["ports"] == [{"name": "http", "containerPort": CONTAINER_PORT}]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/tmp"}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["BENTOML_HOME"].startswith("/tmp/")
    assert "SCORING_TASK_DATABASE_URL" in env  # its default is a file on the read-only root
    unknown = {
        name
        for name in env
        if name.startswith("SCORING_") and name[8:].lower() not in Settings.model_fields
    }
    assert not unknown, f"not settings: {unknown}"
    service_port = docs["Service"]["spec"]["ports"][0]
    assert service_port["targetPort"] == "http"


def test_github_workflow_tests_builds_containerizes_and_smoke_tests():
    workflow = yaml.safe_load((PROJECT / ".github/workflows/ci.yml").read_text())
    steps = {step.get("name"): step for step in workflow["jobs"]["build"]["steps"]}
    assert {"Tests", "bentoml build", "bentoml containerize", "Smoke test of the image"} <= set(
        steps
    )
    assert "packaging/image.sh build" in steps["bentoml containerize"]["run"]
    assert "SCORING_TEST_IMAGE" in steps["Smoke test of the image"]["env"]


def test_dockerfile_template_pins_the_uv_of_ci_setup():
    setup = re.search(r'UV_VERSION="([^"]+)"', (PROJECT / ".ci" / "setup").read_text())
    template = re.search(
        r'uv_version = "([^"]+)"', (PROJECT / "packaging/Dockerfile.j2").read_text()
    )
    assert setup and template and setup[1] == template[1]


# ---- the image -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tools() -> dict[str, str]:
    """IMAGE_BACKEND, CONTAINER_CLI (podman: CONTAINERS_CONF) as packaging/image.sh sees them."""
    result = subprocess.run(
        ["bash", str(IMAGE_SCRIPT), "env"], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        reason = result.stderr.strip().removeprefix("image: ")
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(f"{reason}; CI requires one")
    words = shlex.split(result.stdout)
    return dict(w.split("=", 1) for w in words if "=" in w)


def cli(tools: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        [tools["CONTAINER_CLI"], *args],
        env={**os.environ, **tools},
        capture_output=True,
        text=True,
        check=check,
    )


@pytest.fixture(scope="module")
def image(request, tools) -> Iterator[str]:
    """The image of a Bento built from this project (or SCORING_TEST_IMAGE); removed afterwards."""
    prebuilt = os.environ.get("SCORING_TEST_IMAGE")
    if prebuilt:
        yield prebuilt
        return
    request.getfixturevalue("demo_models")
    bento = build_bento()
    tag = f"localhost/scoring-test:{bento.split(':')[1]}"
    started = time.monotonic()
    result = subprocess.run(
        ["bash", str(IMAGE_SCRIPT), "build", bento],
        env={**os.environ, **tools, "IMAGE_TAG": tag, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    print(f"image {tag} built in {time.monotonic() - started:.1f} s")
    yield tag
    cli(tools, "rmi", tag, check=False)


def run_container(tools: dict[str, str], image: str, *options: str) -> tuple[str, str]:
    """Start the image detached with its port on 127.0.0.1; (container name, base URL)."""
    port = free_port()
    name = f"scoring-test-{port}"
    cli(
        tools,
        "run",
        "-d",
        "--name",
        name,
        "-p",
        f"127.0.0.1:{port}:{CONTAINER_PORT}",
        *options,
        image,
    )
    return name, f"http://127.0.0.1:{port}"


def inspect(tools: dict[str, str], name: str, field: str) -> str:
    return cli(tools, "inspect", "--format", "{{" + field + "}}", name).stdout.strip()


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {READY_TIMEOUT_S} s for {what}")
        time.sleep(0.2)


def wait_ready(tools: dict[str, str], name: str, base: str) -> float:
    """Seconds until /readyz answers 200; fails with the logs if the container stops first."""
    started = time.monotonic()
    while time.monotonic() - started < READY_TIMEOUT_S:
        state = inspect(tools, name, ".State.Status")
        if state != "running":
            pytest.fail(f"container {state}: {cli(tools, 'logs', name).stderr[-3000:]}")
        try:
            if httpx.get(f"{base}/readyz", timeout=1.0).status_code == 200:
                return time.monotonic() - started
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    pytest.fail(f"{base}/readyz not ready within {READY_TIMEOUT_S} s")


@pytest.fixture(scope="module")
def container(tools, image) -> Iterator[tuple[str, str]]:
    """The image running as deploy/kubernetes.yaml runs it; (name, base URL)."""
    name, base = run_container(tools, image, *HARDENED)
    try:
        print(f"container start to /readyz: {wait_ready(tools, name, base):.1f} s")
        yield name, base
    finally:
        cli(tools, "rm", "-f", name, check=False)


@pytest.mark.e2e
@pytest.mark.image
def test_image_serves_predictions(container, churn):
    _, base = container
    row, other = dict(churn.examples[0]), dict(churn.examples[1])
    single = httpx.post(f"{base}/v1/predict", json={"instance": row}, timeout=30)
    assert single.status_code == 200, single.text
    body = single.json()
    assert body["prediction"]["label"] in churn.target.classes
    assert set(body["prediction"]["probabilities"]) == set(churn.target.classes)
    assert body["model"]["name"] == "churn-xgboost"
    assert body["contract_version"] == churn.contract_version

    batch = httpx.post(
        f"{base}/v1/predict_batch",
        json={"instances": [row, other, {**row, "age": 999}]},
        timeout=30,
    )
    assert batch.status_code == 200, batch.text
    predictions = batch.json()["predictions"]
    assert predictions[0]["probabilities"] == pytest.approx(body["prediction"]["probabilities"])
    assert predictions[1]["label"] in churn.target.classes
    assert [e["index"] for e in batch.json()["errors"]] == [2]

    bad = httpx.post(f"{base}/v1/predict", json={"instance": {**row, "age": "x"}}, timeout=30)
    assert bad.status_code == 400
    assert bad.json()["error"]["code"] == "invalid_input"
    assert "Traceback" not in bad.text

    metrics = httpx.get(f"{base}/metrics", timeout=30)
    assert metrics.status_code == 200
    served = [
        sample.value
        for family in text_string_to_metric_families(metrics.text)
        for sample in family.samples
        if sample.name == "bentoml_service_request_total"
        and sample.labels.get("endpoint") == "/v1/predict"
        and sample.labels.get("http_response_code") == "200"
    ]
    assert sum(served) >= 1


@pytest.mark.e2e
@pytest.mark.image
def test_image_runs_as_non_root_without_build_tools(tools, container):
    name, _ = container
    statuses = cli(tools, "exec", name, "sh", "-c", "cat /proc/[0-9]*/status").stdout
    uids = {int(line.split()[1]) for line in statuses.splitlines() if line.startswith("Uid:")}
    assert uids == {SERVICE_UID}  # every process, PID 1 included
    found = cli(tools, "exec", name, "sh", "-c", "command -v gcc cc g++ make git", check=False)
    assert found.stdout.strip() == ""
    probe = (
        "import importlib, importlib.metadata as m, json, sys\n"
        f"for module in {SERVING_MODULES!r}: importlib.import_module(module)\n"
        "def version(name):\n"
        "    try: return m.version(name)\n"
        "    except m.PackageNotFoundError: return None\n"
        "print(json.dumps({n: version(n) for n in sys.argv[1:]}))\n"
    )
    packages = ("xgboost-cpu", "xgboost", "nvidia-nccl-cu12", "mlflow")
    versions = json.loads(cli(tools, "exec", name, "python", "-c", probe, *packages).stdout)
    assert versions["xgboost-cpu"] is not None
    assert versions["xgboost"] is versions["nvidia-nccl-cu12"] is versions["mlflow"] is None


@pytest.mark.e2e
@pytest.mark.image
def test_image_size_within_budget(tools, image):
    size = int(cli(tools, "image", "inspect", "--format", "{{.Size}}", image).stdout)
    print(f"image {image}: {size / 1e6:.0f} MB")
    assert size <= IMAGE_BUDGET_MB * 1_000_000


@pytest.mark.e2e
@pytest.mark.image
def test_a_dead_worker_stops_the_server_and_the_restart_policy_restores_it(tools, image, churn):
    """BentoML respawns no worker in a container: the server exits, and only the restart policy
    (docker/podman --restart, Kubernetes restartPolicy) brings the service back."""
    name, base = run_container(tools, image, "--restart", "on-failure")
    try:
        wait_ready(tools, name, base)
        kill_model_worker = (  # no ps in a slim image; skip this shell, whose cmdline matches too
            'for p in /proc/[0-9]*; do [ "${p#/proc/}" = $$ ] && continue;'
            ' tr "\\0" " " < "$p/cmdline" | grep -q -- "--service-name xgboost"'
            ' && kill -9 "${p#/proc/}"; done; true'
        )
        cli(tools, "exec", name, "sh", "-c", kill_model_worker)
        wait_until(
            lambda: inspect(tools, name, ".RestartCount") != "0",
            "the server to exit after its model worker died",
        )
        wait_until(lambda: inspect(tools, name, ".State.Status") == "running", "the restart")
        wait_ready(tools, name, base)
        assert inspect(tools, name, ".RestartCount") == "1"
        row = dict(churn.examples[0])
        response = httpx.post(f"{base}/v1/predict", json={"instance": row}, timeout=30)
        assert response.status_code == 200, response.text
    finally:
        cli(tools, "rm", "-f", name, check=False)
