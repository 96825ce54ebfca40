"""Cluster definitions in cluster/: schema and structure checks, and security defaults over every file."""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
CLUSTER_FILES = sorted(p for p in CLUSTER.rglob("*") if p.is_file())
YAML_FILES = [p for p in CLUSTER_FILES if p.suffix in (".yaml", ".yml")]
RAY_VERSION = "2.60.0"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kube_docs(kind: str) -> list[dict]:
    return [d for p in YAML_FILES for d in _docs(p) if isinstance(d, dict) and d.get("kind") == kind]


def _cluster_specs() -> list[tuple[str, dict]]:
    """(name, RayCluster spec) of every RayCluster, and of the cluster inside every RayJob."""
    specs = [(d["metadata"]["name"], d["spec"]) for d in _kube_docs("RayCluster")]
    specs += [(d["metadata"]["name"], d["spec"]["rayClusterSpec"]) for d in _kube_docs("RayJob")]
    return specs


def _pod_templates(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec.get("workerGroupSpecs", [])]


def test_cluster_folder_has_the_expected_files():
    names = {p.name for p in CLUSTER_FILES}
    assert {"aws-gpu.yaml", "kuberay-raycluster.yaml", "kuberay-rayjob.yaml", "Dockerfile"} <= names


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.name)
def test_every_yaml_parses(path):
    docs = _docs(path)
    assert docs and all(isinstance(d, dict) for d in docs)


# ---------------------------------------------------------------------------------------------
# Ray cluster launcher (AWS)
# ---------------------------------------------------------------------------------------------


def test_aws_launcher_config_matches_rays_schema():
    jsonschema = pytest.importorskip("jsonschema")
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    schema = json.loads((Path(os.path.dirname(ray.__file__)) / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(copy.deepcopy(config)))  # Ray's own checks after filling defaults


def test_aws_launcher_config_has_gpu_node_types():
    config = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    families = {t["node_config"]["InstanceType"].split(".")[0] for n, t in types.items() if n != config["head_node_type"]}
    assert {"g5", "p4d", "p5"} <= families
    assert RAY_VERSION in config["docker"]["image"] and "gpu" in config["docker"]["image"]
    assert any("pip install" in c and "flm_dist" in c for c in config["setup_commands"])
    for node in types.values():
        assert node["node_config"]["MetadataOptions"]["HttpTokens"] == "required"  # IMDSv2 only


# ---------------------------------------------------------------------------------------------
# KubeRay manifests
# ---------------------------------------------------------------------------------------------


def test_kuberay_manifests_exist_with_api_version():
    assert _kube_docs("RayCluster") and _kube_docs("RayJob")
    for doc in _kube_docs("RayCluster") + _kube_docs("RayJob"):
        assert doc["apiVersion"] == "ray.io/v1"
        assert doc["metadata"]["name"]


@pytest.mark.parametrize("name, spec", _cluster_specs(), ids=lambda v: v if isinstance(v, str) else "")
def test_kuberay_cluster_structure(name, spec):
    assert spec["rayVersion"] == RAY_VERSION
    head = spec["headGroupSpec"]
    assert isinstance(head.get("rayStartParams", {}), dict)
    groups = spec["workerGroupSpecs"]
    assert groups and all(g["groupName"] for g in groups)
    gpu_groups = 0
    for group in groups:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for template in _pod_templates(spec):
        containers = template["spec"]["containers"]
        assert containers and all(c["name"] and c["image"] for c in containers)
        for container in containers:
            assert RAY_VERSION in container["image"] or "flm-dist" in container["image"]
            limits = container.get("resources", {}).get("limits", {})
            assert "cpu" in limits and "memory" in limits
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            limits = container["resources"]["limits"]
            if "nvidia.com/gpu" in limits:
                gpu_groups += 1
                assert int(limits["nvidia.com/gpu"]) >= 1
                assert container["resources"]["requests"].get("nvidia.com/gpu") == limits["nvidia.com/gpu"]
    assert gpu_groups >= 1
    volumes = [v for t in _pod_templates(spec) for v in t["spec"].get("volumes", [])]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v}
    assert claims == {"flm-shared"}


def test_kuberay_rayjob_fields():
    for job in _kube_docs("RayJob"):
        spec = job["spec"]
        assert "flm run jobs/" in spec["entrypoint"]
        assert spec["shutdownAfterJobFinishes"] is True
        assert isinstance(yaml.safe_load(spec.get("runtimeEnvYAML", "{}")), dict)
        job_file = re.search(r"flm run (jobs/\S+\.yaml)", spec["entrypoint"]).group(1)
        assert (REPO / job_file).is_file()


# ---------------------------------------------------------------------------------------------
# Security defaults over every file in cluster/
# ---------------------------------------------------------------------------------------------

SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret key": re.compile(r"aws_secret_access_key\s*[:=]\s*\S+", re.IGNORECASE),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "password literal": re.compile(r"password\s*[:=]\s*['\"]?[^\s'\"{$<]+", re.IGNORECASE),
    "token literal": re.compile(r"(RAY_AUTH_TOKEN|auth_token|api[_-]?key|secret|token)\s*[:=]\s*['\"]?"
                                r"(?!\$|\{|<|valueFrom|secretKeyRef)[A-Za-z0-9+/_\-=]{12,}", re.IGNORECASE),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"),
    "Slack token": re.compile(r"\bxox[abpors]-[A-Za-z0-9-]{10,}\b"),
    "Kubernetes Secret with data": re.compile(r"kind:\s*Secret\b[\s\S]*?\n(stringData|data):"),
}
PUBLIC_DASHBOARD = re.compile(r"dashboard[-_]host[\"']?\s*[=:]\s*[\"']?0\.0\.0\.0")
PUBLIC_SERVICE = re.compile(r"\b(LoadBalancer|NodePort)\b")


def secret_findings(text: str) -> list[str]:
    return [name for name, pattern in SECRET_PATTERNS.items() if pattern.search(text)]


def exposure_findings(text: str) -> list[str]:
    found = []
    if PUBLIC_DASHBOARD.search(text):
        found.append("dashboard bound to 0.0.0.0")
    for line in text.splitlines():
        code = line.split("#", 1)[0]
        if PUBLIC_SERVICE.search(code):
            found.append(f"public service type: {code.strip()}")
    return found


def test_scanners_catch_bad_examples():
    assert "AWS access key id" in secret_findings("key: AKIAABCDEFGHIJKLMNOP")
    assert "private key" in secret_findings("-----BEGIN OPENSSH PRIVATE KEY-----\nabc")
    assert "password literal" in secret_findings("password: hunter2")
    assert "token literal" in secret_findings("RAY_AUTH_TOKEN=abcdefghijklmnop1234")
    assert "token literal" in secret_findings("  auth_token: 'c3VwZXItc2VjcmV0LXRva2Vu'")
    assert "Kubernetes Secret with data" in secret_findings("kind: Secret\nmetadata: {}\nstringData:\n  a: b")
    assert secret_findings("valueFrom: {secretKeyRef: {name: flm-ray, key: auth_token}}") == []
    assert secret_findings("RAY_AUTH_TOKEN=$(kubectl get secret flm-ray)") == []
    assert exposure_findings("ray start --head --dashboard-host=0.0.0.0")
    assert exposure_findings("rayStartParams:\n  dashboard-host: '0.0.0.0'")
    assert exposure_findings("  serviceType: LoadBalancer")
    assert exposure_findings("spec:\n  type: NodePort")
    assert not exposure_findings("serviceType: ClusterIP  # never LoadBalancer")


SCANNED = CLUSTER_FILES + sorted((REPO / "jobs").rglob("*.yaml"))


@pytest.mark.parametrize("path", SCANNED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_secrets_and_no_public_dashboard(path):
    text = path.read_text()
    assert secret_findings(text) == [], path
    assert exposure_findings(text) == [], path


def test_aws_launcher_turns_token_auth_on_and_keeps_dashboard_local():
    config = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in config[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start), key
    head_start = " ".join(config["head_start_ray_commands"])
    host = re.search(r"--dashboard-host[= ](\S+)", head_start)
    assert host is None or host.group(1) in ("127.0.0.1", "localhost")
    # The token reaches the nodes as a file synced from the launching machine, never as a value.
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    assert "RAY_AUTH_MODE=token" in " ".join(config["docker"]["run_options"])


@pytest.mark.parametrize("name, spec", _cluster_specs(), ids=lambda v: v if isinstance(v, str) else "")
def test_kuberay_token_auth_and_cluster_ip(name, spec):
    auth_by_operator = spec.get("authOptions", {}).get("mode") == "token"
    for template in _pod_templates(spec):
        for container in template["spec"]["containers"]:
            env = {e["name"]: e for e in container.get("env", [])}
            if not auth_by_operator:
                assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", (name, container["name"])
                assert "secretKeyRef" in env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}), name
            assert env.get("RAY_AUTH_MODE", {}).get("value", "token") == "token"
            assert "value" not in env.get("RAY_AUTH_TOKEN", {}), "token value in a manifest"
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        params = group.get("rayStartParams", {})
        assert params.get("dashboard-host") in (None, "127.0.0.1", "localhost")


def test_no_kubernetes_services_or_ingress_expose_ray():
    for doc in (d for p in YAML_FILES for d in _docs(p)):
        if doc.get("kind") == "Service":
            assert doc.get("spec", {}).get("type", "ClusterIP") == "ClusterIP"
        assert doc.get("kind") not in ("Ingress", "Secret"), "no Ingress / Secret objects in cluster/"


def test_dockerfile_installs_the_project_without_credentials():
    text = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", text, re.MULTILINE).group(1)
    assert base.startswith("rayproject/ray:2.60.0") and "gpu" in base or base.startswith("nvidia/cuda")
    assert re.search(r"pip install[^\n]*\s\.(\s|$)", text)
    assert re.search(r"^ENV\s[^\n]*RAY_AUTH_MODE=token", text, re.MULTILINE)
    assert not re.search(r"^(ENV|ARG)\s[^\n]*RAY_AUTH_TOKEN", text, re.MULTILINE)
    assert not re.search(r"^EXPOSE\s", text, re.MULTILINE)
    ignore = (CLUSTER / "Dockerfile.dockerignore").read_text().split()
    assert {"**/.git", "**/runs", "**/.data", "**/.ray"} <= set(ignore)
