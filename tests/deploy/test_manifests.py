"""deploy/: the Containerfile, the plain Kubernetes manifests and the KServe objects, checked offline.

- Kubernetes objects are validated against Kubernetes' OpenAPI schemas (kubernetes-validate bundles
  them), as files and, where kubectl is installed, as kustomize renders them.
- KServe objects are validated against KServe's API types as its Python SDK generates them from
  KServe's OpenAPI specification (every field known, every value of its type), and the pod parts
  they embed (containers) against Kubernetes' schemas.
- The image reference, ports, probes, metric names and commands are checked against the code.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from importlib.metadata import version
from pathlib import Path
from typing import Any

import kubernetes.client.models as k8s_models
import kubernetes_validate
import kserve.models as kserve_models
import pytest
import yaml

from server.apis import oip
from server.config import load_config
from server.metrics.recording import Metrics
from server.torchserve_cli import cli as torchserve_cli

ROOT = Path(__file__).parents[2]
DEPLOY = ROOT / "deploy"
BASE = DEPLOY / "kubernetes" / "base"
KSERVE = DEPLOY / "kserve"
# The Kubernetes release whose schemas the manifests must satisfy: the oldest one still supported
# upstream when this was written (1.31 introduced nothing these manifests use).
K8S_VERSION = "1.31"
IMAGE = f"localhost/marserve:{version('marserve')}"


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def plain_objects() -> list[tuple[str, dict[str, Any]]]:
    files = [*BASE.glob("*.yaml"), DEPLOY / "kubernetes" / "prometheus-adapter-rules.yaml"]
    return [(f"{p.relative_to(DEPLOY)}#{i}", d) for p in sorted(files) if p.name != "kustomization.yaml" for i, d in enumerate(documents(p))]


def kserve_objects() -> list[tuple[str, dict[str, Any]]]:
    return [(p.name, d) for p in sorted(KSERVE.glob("*.yaml")) for d in documents(p)]


def by_kind(kind: str, objects: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    return [d for _, d in objects if d["kind"] == kind]


# -- Kubernetes' schemas ----------------------------------------------------------------------


@pytest.mark.parametrize(("where", "obj"), plain_objects(), ids=[w for w, _ in plain_objects()])
def test_plain_manifests_match_kubernetes_schemas(where: str, obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_a_wrong_manifest_is_caught() -> None:
    # The check can fail: an unknown field and a wrongly typed one.
    deployment = by_kind("Deployment", plain_objects())[0]
    bad = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    bad = {**deployment, "spec": {**deployment["spec"], "replicas": "two"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


@pytest.mark.parametrize("target", ["base", "overlays/gpu"])
def test_kustomize_renders_valid_objects(target: str) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the kustomize rendering is not checked (the files are)")
    rendered = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY / "kubernetes" / target)], capture_output=True, text=True, check=True
    ).stdout
    objects = [d for d in yaml.safe_load_all(rendered) if d]
    assert sorted(d["kind"] for d in objects) == [
        "ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service",
    ]  # fmt: skip
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    [deployment] = [d for d in objects if d["kind"] == "Deployment"]
    [config_map] = [d for d in objects if d["kind"] == "ConfigMap"]
    # The generated ConfigMap's hashed name reached the volume, and it holds the config file.
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == config_map["metadata"]["name"]
    assert config_map["data"]["config.properties"] == (BASE / "config.properties").read_text()
    image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == (IMAGE if target == "base" else f"{IMAGE}-cuda")


# -- KServe's API types -----------------------------------------------------------------------


def _model_class(name: str) -> Any:
    return getattr(kserve_models, name, None) or getattr(k8s_models, name)


def check_type(value: Any, type_name: str, where: str) -> None:
    """``value`` (parsed YAML) against an SDK type name: str, int, bool, object, list[T], dict(str, T), or a model
    (KServe's SDK writes ``list[T]`` and ``dict(str, T)``, Kubernetes' client ``List[T]`` and ``Dict[str, T]``)."""
    if type_name.startswith("Dict[str, "):
        type_name = f"dict(str, {type_name[len('Dict[str, ') : -1]})"
    if type_name.startswith("List["):
        type_name = f"list[{type_name[5:-1]}]"
    if type_name in ("object", "datetime"):
        return
    if type_name.startswith("list["):
        assert isinstance(value, list), f"{where}: expected a list"
        for i, item in enumerate(value):
            check_type(item, type_name[5:-1], f"{where}[{i}]")
        return
    if type_name.startswith("dict("):
        assert isinstance(value, dict), f"{where}: expected a mapping"
        inner = type_name[len("dict(str, ") : -1]
        for key, item in value.items():
            assert isinstance(key, str), f"{where}: key {key!r} is not a string"
            check_type(item, inner, f"{where}.{key}")
        return
    scalars: dict[str, type | tuple[type, ...]] = {"str": str, "int": int, "bool": bool, "float": (int, float)}
    if type_name in scalars:
        assert isinstance(value, scalars[type_name]), f"{where}: expected {type_name}, got {value!r}"
        if type_name == "int":
            assert not isinstance(value, bool), f"{where}: expected int, got {value!r}"
        return
    check_model(value, _model_class(type_name), where)


def check_model(value: Any, cls: Any, where: str) -> None:
    assert isinstance(value, dict), f"{where}: expected a mapping ({cls.__name__})"
    fields = {json_name: cls.openapi_types[attr] for attr, json_name in cls.attribute_map.items()}
    for key, item in value.items():
        assert key in fields, f"{where}: {cls.__name__} has no field {key!r}"
        check_type(item, fields[key], f"{where}.{key}")


KSERVE_TYPES = {
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "V1alpha1ServingRuntime",
    ("serving.kserve.io/v1beta1", "InferenceService"): "V1beta1InferenceService",
}


@pytest.mark.parametrize(("where", "obj"), kserve_objects(), ids=[w for w, _ in kserve_objects()])
def test_kserve_objects_match_kserves_types(where: str, obj: dict[str, Any]) -> None:
    check_model(obj, _model_class(KSERVE_TYPES[(obj["apiVersion"], obj["kind"])]), where)
    # The containers they embed are Kubernetes containers: validated as a Pod's.
    if obj["kind"] == "ServingRuntime":
        containers = obj["spec"]["containers"]
    else:
        model = dict(obj["spec"]["predictor"]["model"])
        for kserve_only in ("modelFormat", "runtime", "protocolVersion", "storageUri", "storage"):
            model.pop(kserve_only, None)
        containers = [{"name": "kserve-container", "image": "set-by-the-runtime", **model}]
        assert obj["spec"]["predictor"]["model"]["modelFormat"]["name"] == "pytorch"
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"}, "spec": {"containers": containers}}
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


def test_a_wrong_kserve_object_is_caught() -> None:
    [runtime] = by_kind("ServingRuntime", kserve_objects())
    bad = {**runtime, "spec": {**runtime["spec"], "protocolVersion": ["v1"]}}
    with pytest.raises(AssertionError, match="has no field 'protocolVersion'"):
        check_model(bad, kserve_models.V1alpha1ServingRuntime, "runtime")
    bad = {**runtime, "spec": {**runtime["spec"], "supportedModelFormats": [{"name": "pytorch", "autoSelect": "yes"}]}}
    with pytest.raises(AssertionError, match="expected bool"):
        check_model(bad, kserve_models.V1alpha1ServingRuntime, "runtime")


# -- agreement with the code ------------------------------------------------------------------


def _container(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"]["containers"][0] if obj["kind"] == "Deployment" else obj["spec"]["containers"][0]


def test_the_image_is_marserves_version_everywhere() -> None:
    [deployment] = by_kind("Deployment", plain_objects())
    [runtime] = by_kind("ServingRuntime", kserve_objects())
    assert _container(deployment)["image"] == _container(runtime)["image"] == IMAGE
    kustomization = documents(BASE / "kustomization.yaml")[0]
    assert kustomization["images"] == [{"name": "localhost/marserve", "newTag": version("marserve")}]
    assert f"-t marserve:{version('marserve')} ." in (DEPLOY / "Containerfile").read_text()


def test_ports_and_probes_agree_with_the_configuration() -> None:
    config = load_config(BASE / "config.properties", env={})
    [deployment] = by_kind("Deployment", plain_objects())
    container = _container(deployment)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": config.inference_address.port, "grpc": config.grpc_inference_port, "metrics": config.metrics_address.port}
    assert ports == {"http": 8080, "grpc": 8081, "metrics": 8082}  # KServe's, so one layout everywhere
    assert config.inference_address.host == config.metrics_address.host == config.grpc_inference_address == "0.0.0.0"
    # The management APIs stay on loopback; tokens are off because replicas cannot share keys.
    assert config.management_address.host == config.grpc_management_address == "127.0.0.1"
    assert config.disable_token_authorization is True
    # The probes hit the routes that mean liveness and readiness, which need no token.
    routes = {r.pattern: r for r in oip.routes(None, None)}  # type: ignore[arg-type]
    for probe, path in (("livenessProbe", "/v2/health/live"), ("readinessProbe", "/v2/health/ready"), ("startupProbe", "/v2/health/live")):
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}
        assert routes[path].key is None
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(config.metrics_address.port)
    # The args are serve's, foreground, on the mounted configuration.
    args = container["args"]
    assert args[:3] == ["serve", "--start", "--foreground"] and args[args.index("--ts-config") + 1] == "/etc/marserve/config.properties"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["config"] == "/etc/marserve" and mounts["tmp"] == "/tmp" and mounts["logs"] == str(config.log_location)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    [service] = by_kind("Service", plain_objects())
    assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]} == {n: n for n in ports}
    # The image's configuration is the manifests' (comments aside).
    assert _settings(DEPLOY / "config.properties") == _settings(BASE / "config.properties")


def _settings(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line and not line.startswith("#")]


def test_kserve_objects_agree_with_marserve_torchserve() -> None:
    [runtime] = by_kind("ServingRuntime", kserve_objects())
    container = _container(runtime)
    # KServe's TorchServe runtime's command line, to which marserve-torchserve answers.
    assert container["args"][:4] == [
        "torchserve", "--start", "--model-store=/mnt/models/model-store", "--ts-config=/mnt/models/config/config.properties",
    ]  # fmt: skip
    context = torchserve_cli.make_context("torchserve", container["args"][1:])
    assert context.params["kserve"] is True
    defaults = {p.name: p.default for p in torchserve_cli.params}
    assert runtime["spec"]["annotations"] == {
        "prometheus.kserve.io/port": str(defaults["kserve_metrics_port"]), "prometheus.kserve.io/path": "/metrics",
    }  # fmt: skip
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": defaults["kserve_http_port"]}
    assert runtime["spec"]["protocolVersions"] == ["v1", "v2", "grpc-v2"]
    assert runtime["spec"]["supportedModelFormats"][0]["name"] == "pytorch"
    assert container["securityContext"]["runAsUser"] == 1000
    services = {d["metadata"]["name"]: d for d in by_kind("InferenceService", kserve_objects())}
    protocols = {name: s["spec"]["predictor"]["model"]["protocolVersion"] for name, s in services.items()}
    assert sorted(protocols.values()) == ["grpc-v2", "v1", "v2"]
    assert any("canaryTrafficPercent" in s["spec"]["predictor"] for s in services.values())
    for name, service in services.items():
        assert service["spec"]["predictor"]["model"]["runtime"] == runtime["metadata"]["name"] == "kserve-marserve"
        if protocols[name] == "grpc-v2":
            assert service["spec"]["predictor"]["model"]["ports"] == [
                {"name": "h2c", "containerPort": defaults["kserve_grpc_port"], "protocol": "TCP"}
            ]
    # The sample config.properties loads, and its model_snapshot names an archive per version.
    config = load_config(KSERVE / "config.properties", env={})
    assert config.model_snapshot is not None
    for versions in config.model_snapshot["models"].values():
        assert all(entry["marName"].endswith(".mar") for entry in versions.values())


def test_the_autoscaler_metric_is_marserves() -> None:
    families = {metric.name for metric in Metrics().registry.collect()}
    assert "marserve_queue_duration_seconds" in families
    [hpa] = by_kind("HorizontalPodAutoscaler", plain_objects())
    [rule] = yaml.safe_load(by_kind("ConfigMap", plain_objects())[0]["data"]["config.yaml"])["rules"]
    [metric] = hpa["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"] == "marserve_queue_duration_seconds_avg"
    assert hpa["spec"]["scaleTargetRef"]["name"] == by_kind("Deployment", plain_objects())[0]["metadata"]["name"]
    for series in re.findall(r"marserve_[a-z_]+", rule["seriesQuery"] + rule["metricsQuery"]):
        assert series.removesuffix("_sum").removesuffix("_count") in families, series
    [pdb] = by_kind("PodDisruptionBudget", plain_objects())
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["maxUnavailable"]


# -- the Containerfile --------------------------------------------------------------------------


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile-syntax file: comments dropped, continuations joined."""
    logical: list[str] = []
    pending = ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "a continuation line ends the file"
    known = {"FROM", "ARG", "ENV", "RUN", "COPY", "WORKDIR", "VOLUME", "USER", "EXPOSE", "HEALTHCHECK", "ENTRYPOINT", "CMD"}
    parsed = []
    for line in logical:
        word, _, rest = line.strip().partition(" ")
        assert word in known, f"unknown instruction: {line}"
        parsed.append((word, " ".join(rest.split())))
    return parsed


def test_containerfile() -> None:
    steps = instructions(DEPLOY / "Containerfile")
    stages: list[list[tuple[str, str]]] = []
    for word, rest in steps:
        if word == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((word, rest))
    # Multi-stage, both from the slim Python base.
    assert len(stages) == 2
    base = dict(s for s in steps[: steps.index(stages[0][0])] if s[0] == "ARG")["ARG"]
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.1[1-9]-slim(-\w+)?", base), base
    assert stages[0][0] == ("FROM", "${PYTHON_IMAGE} AS build") and stages[1][0] == ("FROM", "${PYTHON_IMAGE}")
    final = stages[1]
    text = " ".join(rest for _, rest in final)
    # No compilers in the final image, nor build dependencies.
    for tool in ("gcc", "g++", "clang", "build-essential", "make ", "-dev "):
        assert tool not in text, tool
    assert "--no-install-recommends tini" in text and "rm -rf /var/lib/apt/lists/*" in text
    # CPU wheels by default, CUDA by a build argument.
    assert ("ARG", "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu") in stages[0]
    assert "ln -s marserve-torchserve /opt/marserve/bin/torchserve" in " ".join(rest for _, rest in stages[0])
    # Non-root, UID 1000, tini as pid 1, the server in the foreground.
    assert [rest for word, rest in final if word == "USER"] == ["1000:1000"]
    assert "--uid 1000" in text
    assert [rest for word, rest in final if word == "ENTRYPOINT"] == ['["tini", "--"]']
    [cmd] = [rest for word, rest in final if word == "CMD"]
    assert cmd.startswith('["serve", "--start", "--foreground"') and "/home/model-server/config.properties" in cmd
    [healthcheck] = [rest for word, rest in final if word == "HEALTHCHECK"]
    assert "http://127.0.0.1:8080/v2/health/live" in healthcheck
    assert [rest for word, rest in final if word == "EXPOSE"] == ["8080 8081 8082"]
    # A read-only root: /tmp and logs/ are volumes, and nothing else is written.
    [volume] = [rest for word, rest in final if word == "VOLUME"]
    assert volume == '["/tmp", "/home/model-server/logs"]'
    assert "PYTHONDONTWRITEBYTECODE=1" in text
    # Every file it copies from the build context exists.
    for word, rest in steps:
        if word == "COPY" and "--from=" not in rest:
            sources = [s for s in rest.split()[:-1] if not s.startswith("--")]
            for source in sources:
                assert (ROOT / source).exists(), source


def test_the_pip_package_does_not_install_torchserve() -> None:
    scripts = (ROOT / "pyproject.toml").read_text().split("[project.scripts]")[1].split("\n[")[0]
    assert 'marserve-torchserve = "server.torchserve_cli:main"' in scripts
    assert not re.search(r"^torchserve\s*=", scripts, re.MULTILINE)
