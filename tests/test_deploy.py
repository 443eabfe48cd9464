"""deploy/: the Kubernetes manifest against the Kubernetes schemas (bundled by
kubernetes-validate, no network), the scale-out templates, and the guard against two servers
sharing one BENTOML_HOME's metrics folder."""

from __future__ import annotations

import logging
import string
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from .harness import PROJECT

DEPLOY = PROJECT / "deploy"
KUBERNETES_VERSION = "1.32.0"  # preStop `sleep` needs >= 1.30


def manifest() -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text())}


@pytest.mark.parametrize(
    "kind", ["Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"]
)
def test_the_manifest_is_valid_kubernetes(kind):
    kubernetes_validate.validate(manifest()[kind], KUBERNETES_VERSION, strict=True)


def test_the_manifest_runs_several_replicas_on_a_shared_database():
    docs = manifest()
    deployment = docs["Deployment"]
    assert deployment["spec"]["replicas"] >= 2
    assert docs["HorizontalPodAutoscaler"]["spec"]["minReplicas"] >= 2
    assert docs["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert docs["PodDisruptionBudget"]["spec"]["minAvailable"] >= 1
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert "secretKeyRef" in env["SCORING_TASK_DATABASE_URL"]["valueFrom"]


def test_the_scale_out_templates_have_their_placeholders():
    haproxy = string.Template((DEPLOY / "haproxy.cfg").read_text())
    assert set(haproxy.get_identifiers()) == {"listen", "servers"}
    assert "option httpchk GET /readyz" in haproxy.template
    prometheus = string.Template((DEPLOY / "prometheus.yml").read_text())
    assert set(prometheus.get_identifiers()) == {"scrape_interval", "static_configs"}


def test_a_second_server_on_one_bentoml_home_is_reported(tmp_path: Path, caplog):
    from runners.lifecycle import _METRICS_LOCK, claim_metrics_folder

    folder = str(tmp_path / "prometheus_multiproc_dir")
    assert claim_metrics_folder(folder)
    try:
        with caplog.at_level(logging.ERROR):
            assert not claim_metrics_folder(folder)  # another open file: the lock is taken
        assert "uses this BENTOML_HOME" in caplog.text
    finally:
        _METRICS_LOCK.pop().close()
