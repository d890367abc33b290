"""deploy/kubernetes: every overlay renders with `kubectl kustomize`, validates against the
Kubernetes schemas offline (kubernetes-validate, strict), and says what matters: probes,
a grace period longer than the drain, GPUs where promised, a non-root read-only pod, the
model cache and API keys wired to what the image reads, and an autoscaler that targets a
real Deployment on metrics a live server really exports."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import kubernetes_validate
import pytest
import yaml  # type: ignore[import-untyped,unused-ignore]
from prometheus_client.parser import text_string_to_metric_families

from fake_openai_server.settings import DEFAULT_PORTS, Settings
from fake_openai_server.workers import STOP_TIMEOUT
from tests.container import composefiles
from tests.support.fake_app import fake_app_process

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
OVERLAYS = sorted(p.parent.name for p in (KUBE / "overlays").glob("*/kustomization.yaml"))
GPU_OVERLAYS = [name for name in OVERLAYS if name.startswith("gpu")]
# The oldest Kubernetes release still common on premises, and the newest schemas shipped.
K8S_VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]
SETTINGS = {name.upper() for name in Settings.model_fields}
HF_ENV = {"HF_HOME", "HF_HUB_OFFLINE", "HF_TOKEN", "HF_ENDPOINT"}
CRD_KINDS = {"ScaledObject", "ServiceMonitor"}

Doc = dict[str, Any]


def render(overlay: str) -> list[Doc]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        if os.environ.get("CI") == "true":
            pytest.fail("kubectl is missing in CI")
        pytest.skip("kubectl (with kustomize) is not installed")
    result = subprocess.run(
        [kubectl, "kustomize", str(KUBE / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Doc]]:
    return {overlay: render(overlay) for overlay in OVERLAYS}


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [doc for doc in docs if doc["kind"] == kind]


def named(docs: list[Doc], kind: str, name: str) -> Doc:
    (doc,) = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    return doc


def env_of(container: Doc) -> dict[str, str]:
    return {item["name"]: item.get("value", "") for item in container.get("env", [])}


def selects(selector: Doc, labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels and In/NotIn/Exists expressions) against labels."""
    if not selector:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator = expression["key"], expression["operator"]
        values = expression.get("values", [])
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
    return True


def servers(docs: list[Doc]) -> Iterator[tuple[Doc, Doc]]:
    """(Deployment, its server container)."""
    for deployment in of_kind(docs, "Deployment"):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            yield deployment, container


def test_overlays_exist() -> None:
    assert {"cpu", "gpu", "gpu-autoscaled"} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_everything_lands_in_the_namespace(rendered: dict[str, list[Doc]], overlay: str) -> None:
    (namespace,) = of_kind(rendered[overlay], "Namespace")
    for doc in rendered[overlay]:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == namespace["metadata"]["name"], doc["kind"]


# --- schemas -------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_built_in_kinds_validate_strictly_against_kubernetes(
    rendered: dict[str, list[Doc]], version: str
) -> None:
    for overlay, docs in rendered.items():
        for doc in docs:
            if doc["kind"] in CRD_KINDS:
                continue
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                pytest.fail(f"{overlay}: {doc['kind']} {doc['metadata']['name']}: {error}")


def test_the_validator_rejects_a_misspelt_field(rendered: dict[str, list[Doc]]) -> None:
    """The strict check above would catch a typo (so passing it means something)."""
    deployment = dict(of_kind(rendered["gpu"], "Deployment")[0])
    deployment["spec"] = {**deployment["spec"], "replica": 2}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


# The CRDs are not in the built-in schemas; these check the fields the manifests use,
# with the names and types of KEDA's and the Prometheus operator's documentation.
_TRIGGER = {
    "type": "object",
    "required": ["type", "metadata"],
    "additionalProperties": False,
    "properties": {
        "type": {"const": "prometheus"},
        "name": {"type": "string"},
        "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
        "useCachedMetrics": {"type": "boolean"},
        "authenticationRef": {"type": "object"},
        "metadata": {
            "type": "object",
            "required": ["serverAddress", "query", "threshold"],
            "additionalProperties": False,
            "properties": {
                key: {"type": "string"}
                for key in (
                    "serverAddress",
                    "query",
                    "threshold",
                    "activationThreshold",
                    "namespace",
                    "customHeaders",
                    "ignoreNullValues",
                    "queryParameters",
                    "unsafeSsl",
                    "timeout",
                )
            },
        },
    },
}
SCALED_OBJECT = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {
                        "name": {"type": "string"},
                        "kind": {"type": "string"},
                        "apiVersion": {"type": "string"},
                        "envSourceContainerName": {"type": "string"},
                    },
                },
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "initialCooldownPeriod": {"type": "integer", "minimum": 0},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "idleReplicaCount": {"type": "integer", "minimum": 0},
                "fallback": {"type": "object"},
                "advanced": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "name": {"type": "string"},
                                "behavior": {"type": "object"},
                            },
                        },
                        "scalingModifiers": {"type": "object"},
                    },
                },
                "triggers": {"type": "array", "minItems": 1, "items": _TRIGGER},
            },
        },
    },
}
SERVICE_MONITOR = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": {"type": "object"},
                "namespaceSelector": {"type": "object"},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["port"],
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "scheme": {"enum": ["http", "https"]},
                        },
                    },
                },
            },
        },
    },
}


def test_scaled_objects_and_service_monitors_match_their_crds(
    rendered: dict[str, list[Doc]],
) -> None:
    seen = set()
    for overlay, docs in rendered.items():
        for doc in of_kind(docs, "ScaledObject"):
            jsonschema.validate(doc, SCALED_OBJECT)
            # The HPA behaviour is handed to Kubernetes as is: check it with its schema.
            behavior = doc["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
            hpa = {
                "apiVersion": "autoscaling/v2",
                "kind": "HorizontalPodAutoscaler",
                "metadata": {"name": "keda-hpa"},
                "spec": {
                    "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "x"},
                    "maxReplicas": doc["spec"]["maxReplicaCount"],
                    "behavior": behavior,
                },
            }
            kubernetes_validate.validate(hpa, K8S_VERSIONS[-1], strict=True)
            seen.add(("ScaledObject", overlay))
        for doc in of_kind(docs, "ServiceMonitor"):
            jsonschema.validate(doc, SERVICE_MONITOR)
            seen.add(("ServiceMonitor", overlay))
    assert ("ScaledObject", "gpu-autoscaled") in seen
    assert ("ServiceMonitor", "gpu-autoscaled") in seen


# --- what matters ----------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_server_has_the_three_probes(rendered: dict[str, list[Doc]], overlay: str) -> None:
    for deployment, container in servers(rendered[overlay]):
        name = deployment["metadata"]["name"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        for probe, path in (
            ("readinessProbe", "/ready"),
            ("livenessProbe", "/health"),
            ("startupProbe", "/ready"),
        ):
            get = container[probe]["httpGet"]
            assert get["path"] == path, f"{name}: {probe}"
            assert get["port"] in ports, f"{name}: {probe} names no container port"
        startup = container["startupProbe"]
        budget = startup["periodSeconds"] * startup["failureThreshold"]
        assert budget >= 300, f"{name}: {budget}s is short for a model load from a volume"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_period_covers_the_pre_stop_wait_and_the_drain(
    rendered: dict[str, list[Doc]], overlay: str
) -> None:
    for deployment, container in servers(rendered[overlay]):
        pod = deployment["spec"]["template"]["spec"]
        drain = float(
            env_of(container).get(
                "SHUTDOWN_GRACE_SECONDS",
                Settings.model_fields["shutdown_grace_seconds"].default,
            )
        )
        command = container["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep", "the pre-stop hook waits for the endpoints to update"
        pre_stop = float(command[1])
        assert pre_stop >= 5
        # Kubernetes counts the pre-stop hook inside the grace period; after the drain
        # the engine and tokenizer processes stop (each killed after STOP_TIMEOUT).
        stop = pre_stop + drain + 2 * STOP_TIMEOUT
        assert pod["terminationGracePeriodSeconds"] > stop, deployment


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpu_overlays_request_one_gpu_and_cpu_ones_none(
    rendered: dict[str, list[Doc]], overlay: str
) -> None:
    for deployment, container in servers(rendered[overlay]):
        limits = container["resources"].get("limits", {})
        env = env_of(container)
        if overlay in GPU_OVERLAYS:
            assert limits["nvidia.com/gpu"] == 1, deployment["metadata"]["name"]
            assert env["DEVICE"] == "cuda"
        else:
            assert "nvidia.com/gpu" not in limits
            assert env["DEVICE"] == "cpu"
            # torch's threads match the cores the pod may use.
            assert int(env["CPU_THREADS"]) == int(limits["cpu"])
        assert "memory" in limits and "cpu" in container["resources"]["requests"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_as_the_image_user_read_only_and_unprivileged(
    rendered: dict[str, list[Doc]], overlay: str
) -> None:
    app_uid = next(
        int(args.split("=", 1)[1])
        for op, args in composefiles.dockerfile_instructions()
        if op == "ARG" and args.startswith("APP_UID=")
    )
    pods = [d["spec"]["template"]["spec"] for d in of_kind(rendered[overlay], "Deployment")]
    pods += [j["spec"]["template"]["spec"] for j in of_kind(rendered[overlay], "Job")]
    for pod in pods:
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True
        assert context["runAsUser"] == app_uid and context["fsGroup"] == app_uid
        assert pod.get("automountServiceAccountToken") is False
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True
            assert security["allowPrivilegeEscalation"] is False
            assert security["capabilities"]["drop"] == ["ALL"]
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert "/tmp" in mounts, "a writable /tmp for libraries that want one"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_model_cache_is_the_volume_the_job_fills(
    rendered: dict[str, list[Doc]], overlay: str
) -> None:
    docs = rendered[overlay]
    (volume,) = composefiles.dockerfile_values("VOLUME")
    image_env = dict(item.split("=", 1) for item in composefiles.dockerfile_values("ENV"))
    (claim,) = of_kind(docs, "PersistentVolumeClaim")
    claim_name = claim["metadata"]["name"]
    for deployment, container in servers(docs):
        pod = deployment["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == volume]
        source = volumes[mount["name"]]["persistentVolumeClaim"]
        assert source["claimName"] == claim_name
        assert mount["readOnly"] is True and source["readOnly"] is True
        env = env_of(container)
        assert env["HF_HOME"] == image_env["HF_HOME"]
        assert env["HF_HUB_OFFLINE"] == "1", "pods read the cache, never the Hub"
    (job,) = of_kind(docs, "Job")
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (mount,) = [
        m
        for m in container["volumeMounts"]
        if volumes[m["name"]].get("persistentVolumeClaim", {}).get("claimName") == claim_name
    ]
    assert not mount.get("readOnly")
    env = env_of(container)
    # The same files: the Job's HF_HOME is at the servers' place inside the volume.
    assert env["HF_HOME"].removeprefix(mount["mountPath"]) == image_env["HF_HOME"].removeprefix(
        volume
    )
    assert env["SERVICE_TYPE"] == "all"
    for _deployment, server in servers(docs):
        for name, value in env_of(server).items():
            if name.endswith("_MODEL") or name == "MODEL_REVISIONS":
                assert env[name] == value, f"the Job fills other models than {name}={value}"
    script = " ".join(container["command"])
    module = re.search(r"python -m (\S+)", script)
    assert module is not None
    assert (ROOT / "src" / (module[1].replace(".", "/") + ".py")).is_file()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_api_keys_come_from_a_secret_file(rendered: dict[str, list[Doc]], overlay: str) -> None:
    docs = rendered[overlay]
    secrets = {s["metadata"]["name"]: s for s in of_kind(docs, "Secret")}
    for deployment, container in servers(docs):
        path = Path(env_of(container)["API_KEYS_FILE"])
        pod = deployment["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(path.parent)]
        secret = secrets[volumes[mount["name"]]["secret"]["secretName"]]
        assert path.name in secret["data"], "the Secret has no such key"
        assert mount["readOnly"] is True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_pdbs_and_settings_match_the_deployments(
    rendered: dict[str, list[Doc]], overlay: str
) -> None:
    docs = rendered[overlay]
    for deployment, container in servers(docs):
        name = deployment["metadata"]["name"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selects(deployment["spec"]["selector"], labels)
        env = env_of(container)
        for variable in env:
            assert variable in SETTINGS | HF_ENV, f"{name}: unknown {variable}"
        settings = Settings(**{k.lower(): v for k, v in env.items() if k not in HF_ENV})
        port = DEFAULT_PORTS[settings.service_type]
        assert container["ports"] == [{"name": "http", "containerPort": port}]
        service = named(docs, "Service", name)
        assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
        (service_port,) = service["spec"]["ports"]
        assert service_port["targetPort"] == "http" and service_port["port"] == port
        pdb = named(docs, "PodDisruptionBudget", name)
        assert selects(pdb["spec"]["selector"], labels)
    assert {d["metadata"]["name"] for d in of_kind(docs, "Deployment")} == {
        "fos-embeddings",
        "fos-reranker",
    }


def test_monitoring_and_network_policy_reach_the_servers(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["gpu-autoscaled"]
    (monitor,) = of_kind(docs, "ServiceMonitor")
    services = [
        s
        for s in of_kind(docs, "Service")
        if selects(monitor["spec"]["selector"], s["metadata"]["labels"])
    ]
    assert {s["metadata"]["name"] for s in services} == {"fos-embeddings", "fos-reranker"}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["path"] == "/metrics"
        assert all(endpoint["port"] in {p["name"] for p in s["spec"]["ports"]} for s in services)
    (policy,) = of_kind(docs, "NetworkPolicy")
    pods = [d["spec"]["template"]["metadata"]["labels"] for d in of_kind(docs, "Deployment")]
    assert all(selects(policy["spec"]["podSelector"], labels) for labels in pods)
    (job,) = of_kind(docs, "Job")  # the Job may download: the policy leaves it alone
    assert not selects(policy["spec"]["podSelector"], job["spec"]["template"]["metadata"]["labels"])
    for rule in policy["spec"]["ingress"]:
        assert [p["port"] for p in rule["ports"]] == ["http"]


# --- autoscaling on metrics the server exports --------------------------------------------


@pytest.fixture(scope="module")
def exported_metrics() -> set[str]:
    """Sample names on a live server's /metrics after one embedding and one rerank."""
    with (
        fake_app_process({"service_type": "all"}, delay=0.01) as server,
        httpx.Client(base_url=server.base_url, timeout=30) as client,
    ):
        assert client.post("/v1/embeddings", json={"input": ["東京"]}).status_code == 200
        body = {"query": "q", "documents": ["a", "b"]}
        assert client.post("/v1/rerank", json=body).status_code == 200
        text = client.get("/metrics").text
    return {
        sample.name for family in text_string_to_metric_families(text) for sample in family.samples
    }


def test_autoscaler_targets_a_deployment_on_metrics_the_server_exports(
    rendered: dict[str, list[Doc]], exported_metrics: set[str]
) -> None:
    docs = rendered["gpu-autoscaled"]
    namespace = named(docs, "Deployment", "fos-embeddings")["metadata"]["namespace"]
    scaled = of_kind(docs, "ScaledObject")
    assert {s["spec"]["scaleTargetRef"]["name"] for s in scaled} == {
        "fos-embeddings",
        "fos-reranker",
    }
    for obj in scaled:
        target = named(docs, "Deployment", obj["spec"]["scaleTargetRef"]["name"])
        assert "replicas" not in target["spec"], "the HPA owns the replica count"
        assert obj["metadata"]["namespace"] == namespace
        assert obj["spec"]["minReplicaCount"] >= 1, "no scale to zero: a cold start is slow"
        for trigger in obj["spec"]["triggers"]:
            query = trigger["metadata"]["query"]
            names = set(re.findall(r"\b(fos_[a-z_]+)\b", query))
            assert names, query
            assert names <= exported_metrics, names - exported_metrics
            # The series Prometheus scrapes through the Service of the target Deployment.
            for labels in re.findall(r"\{([^}]*)\}", query):
                pairs = dict(re.findall(r'(\w+)="([^"]*)"', labels))
                assert pairs["namespace"] == namespace
                service = named(docs, "Service", pairs["service"])
                assert service["spec"]["selector"] == target["spec"]["selector"]["matchLabels"]
            assert float(trigger["metadata"]["threshold"]) > 0
