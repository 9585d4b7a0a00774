"""deploy/k8s, rendered by kustomize (``kubectl kustomize``) and checked: against the Kubernetes
API schemas (kubernetes-validate, strict), and for what the schemas cannot say: every container
locked down, probes on the right endpoints, a grace period that covers the drain, the keys
mounted and failing closed, and the network policy's reach."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.api.auth import read_keys_file
from service.config import Settings
from tests.deploy.tools import K8S, OVERLAYS, ROOT, tool

KUBERNETES_VERSION = "1.31.0"
# prometheus-operator's kinds: kubernetes-validate has only the built-in API's schemas, so it
# cannot check them. Their content is checked below instead: the PrometheusRule's spec is
# deploy/prometheus/alerts.yml (promtool checks and tests that file), and the ServiceMonitor's
# port and secret must exist in the same rendering.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
POD_KINDS = {"Deployment", "StatefulSet"}


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One overlay as kustomize builds it, in a file."""
    kubectl = tool("kubectl", install="kubectl (it has kustomize built in) is on the image")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S / request.param)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    out = tmp_path_factory.mktemp(request.param.replace("/", "-")) / "rendered.yaml"
    out.write_text(result.stdout, encoding="utf-8")
    return out


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


def _by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def _one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    # A generated Secret's name carries a hash of its content: gradsvc-keys-<hash>.
    (found,) = [
        d
        for d in _by_kind(docs, kind)
        if d["metadata"]["name"] == name
        or (kind == "Secret" and d["metadata"]["name"].rpartition("-")[0] == name)
    ]
    return found


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def test_kubernetes_validate_strict(rendered: Path, tmp_path: Path) -> None:
    docs = _docs(rendered)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"} <= kinds
    assert {"NetworkPolicy", "Secret", "ConfigMap", "Ingress"} <= kinds
    builtin = tmp_path / "builtin.yaml"
    builtin.write_text(
        yaml.safe_dump_all([d for d in docs if d["kind"] not in CRD_KINDS]), encoding="utf-8"
    )
    exe = tool("kubernetes-validate", install="pip install kubernetes-validate (dev extra)")
    result = subprocess.run(
        [exe, "--kubernetes-version", KUBERNETES_VERSION, "--strict", "--quiet", str(builtin)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARN" not in result.stdout + result.stderr, result.stdout + result.stderr


def test_every_container_is_locked_down(rendered: Path) -> None:
    pods = [d for d in _docs(rendered) if d["kind"] in POD_KINDS]
    assert pods
    for doc in pods:
        spec = doc["spec"]["template"]["spec"]
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        assert spec.get("automountServiceAccountToken") is False, where
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        for container in _containers(doc):
            at = f"{where} container {container['name']}"
            ctx = container.get("securityContext") or {}
            assert ctx.get("runAsNonRoot") is True, at
            assert ctx.get("runAsUser", 0) > 10000, f"{at}: a high uid, shared with no host user"
            assert ctx.get("allowPrivilegeEscalation") is False, at
            assert ctx.get("privileged", False) is False, at
            assert ctx.get("readOnlyRootFilesystem") is True, at
            assert ctx.get("capabilities") == {"drop": ["ALL"]}, at
            assert ctx.get("seccompProfile") == {"type": "RuntimeDefault"}, at
            image = container["image"]
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), at
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][kind]), f"{at} {kind}"
            # The root filesystem is read-only: /tmp must be a volume.
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            assert "/tmp" in mounts, at


def test_api_probes_grace_and_drain(rendered: Path) -> None:
    docs = _docs(rendered)
    deployment = _one(docs, "Deployment", "gradsvc")
    assert deployment["spec"]["replicas"] >= 2
    spec = deployment["spec"]["template"]["spec"]
    (api,) = spec["containers"]
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert api["startupProbe"]["httpGet"]["path"] == "/healthz"
    ports = {p["name"]: p["containerPort"] for p in api["ports"]}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert api[probe]["httpGet"]["port"] in ports
    # The stop: preStop's sleep, then SIGTERM and the drain, then the workers' exit. The
    # drain is `drain_seconds` where the setting exists, else uvicorn's 30 s graceful timeout.
    sleep = api["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = float(getattr(Settings(), "drain_seconds", 30))
    assert spec["terminationGracePeriodSeconds"] >= sleep + drain + 5, (sleep, drain)
    hpa = _one(docs, "HorizontalPodAutoscaler", "gradsvc")
    assert hpa["spec"]["minReplicas"] >= 2
    assert _one(docs, "PodDisruptionBudget", "gradsvc")["spec"]["maxUnavailable"] == 1


def test_api_command_and_settings_are_valid(rendered: Path) -> None:
    """The container's command parses as ``gradsvc serve``, and the ConfigMap's GRADSVC_*
    variables are settings that validate together (a typo would be ignored silently)."""
    from tests.test_deploy import _check_settings, _serve_args

    docs = _docs(rendered)
    (api,) = _one(docs, "Deployment", "gradsvc")["spec"]["template"]["spec"]["containers"]
    args = _serve_args(api["command"] + api.get("args", []), "k8s gradsvc")
    config = _one(docs, "ConfigMap", "gradsvc-config")["data"]
    env = {**config, "GRADSVC_STORE": config.get("GRADSVC_STORE", "redis://external:6379/0")}
    settings = _check_settings(args, env, "k8s gradsvc-config")
    assert settings.keyed, "keys on 0.0.0.0"
    assert settings.store.startswith("redis"), settings.store
    mounts = {m["name"]: m["mountPath"] for m in api["volumeMounts"]}
    for name in ("GRADSVC_API_KEYS_FILE", "GRADSVC_ADMIN_KEYS_FILE"):
        assert Path(config[name]).parent.as_posix() == mounts["keys"], name


def test_keys_are_a_mounted_secret_that_fails_closed(rendered: Path, tmp_path: Path) -> None:
    """The shipped secret holds comments only: gradsvc refuses to start on it (keys fail
    closed), so an apply that forgot the real keys serves nobody."""
    docs = _docs(rendered)
    deployment = _one(docs, "Deployment", "gradsvc")
    (volume,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if "secret" in v]
    secret = _one(docs, "Secret", volume["secret"]["secretName"])
    assert secret["metadata"]["name"] == volume["secret"]["secretName"]
    assert set(secret["data"]) == {"api-keys.sha256", "admin-keys.sha256"}
    for name, data in secret["data"].items():
        path = tmp_path / name
        path.write_bytes(base64.b64decode(data))
        assert read_keys_file(path) == [], f"{name} ships a key"


def test_network_policy_reach(rendered: Path) -> None:
    docs = _docs(rendered)
    api = _one(docs, "NetworkPolicy", "gradsvc")
    assert set(api["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    sources = [peer for rule in api["spec"]["ingress"] for peer in rule["from"]]
    namespaces = {
        p["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for p in sources
    }
    assert namespaces == {"ingress-nginx", "monitoring"}, namespaces
    redis = [d for d in _by_kind(docs, "StatefulSet") if "redis" in d["metadata"]["name"]]
    for statefulset in redis:
        (container,) = statefulset["spec"]["template"]["spec"]["containers"]
        command = container["command"]
        assert command[command.index("--appendonly") + 1] == "yes", command
        assert statefulset["spec"]["volumeClaimTemplates"], "Redis's AOF needs a volume"
        policy = _one(docs, "NetworkPolicy", "gradsvc-redis")
        assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
        assert "egress" not in policy["spec"], "Redis reaches nothing"
        (rule,) = policy["spec"]["ingress"]
        (peer,) = rule["from"]
        assert peer == {"podSelector": api["spec"]["podSelector"]}, "only gradsvc reaches Redis"


def test_monitoring_resources_match(rendered: Path) -> None:
    docs = _docs(rendered)
    rule = _one(docs, "PrometheusRule", "gradsvc")
    alerts = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text(encoding="utf-8"))
    assert rule["spec"] == alerts, "the PrometheusRule's spec is deploy/prometheus/alerts.yml"
    monitor = _one(docs, "ServiceMonitor", "gradsvc")
    service = _one(docs, "Service", "gradsvc")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    credentials = endpoint["authorization"]["credentials"]
    secret = _one(docs, "Secret", credentials["name"])
    assert secret["metadata"]["name"] == credentials["name"], "the scrape secret is rendered"
    assert credentials["key"] in secret["data"]


def test_gpu_overlay_requests_a_gpu_and_the_cuda_image(rendered: Path) -> None:
    on_gpu = "gpu" in rendered.parent.name
    docs = _docs(rendered)
    deployment = _one(docs, "Deployment", "gradsvc")
    (api,) = deployment["spec"]["template"]["spec"]["containers"]
    config = _one(docs, "ConfigMap", "gradsvc-config")["data"]
    gpus = api["resources"]["limits"].get("nvidia.com/gpu")
    if on_gpu:
        assert config["GRADSVC_DEVICES"] == "cuda:0", "fail without a GPU, never fall back"
        assert gpus == 1 and api["resources"]["requests"]["nvidia.com/gpu"] == 1
        assert api["image"].endswith("-cuda"), api["image"]
        spec = deployment["spec"]["template"]["spec"]
        assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
        assert spec["nodeSelector"]
    else:
        assert config["GRADSVC_DEVICES"] == "cpu" and gpus is None
