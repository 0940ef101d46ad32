"""The Kubernetes manifests of docs/kubernetes: each validates against the Kubernetes API schemas (kubernetes-validate,
strict: an unknown or misspelt field fails), and they agree with the node: the ConfigMap's config.yaml is a valid
node configuration for listeners (workers.count 0), the containers run commands the CLI parses, the ports and probe
paths are the ones the node's web app serves, and the HorizontalPodAutoscaler scales the workers on a metric the
node's /metrics exports. No cluster, no network: `kubectl kustomize` (offline) only where kubectl is installed."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "docs" / "kubernetes"
# the Kubernetes versions whose schemas the manifests must satisfy: an older supported one and the newest shipped by
# the pinned kubernetes-validate (pyproject.toml, the test extra)
VERSIONS = ("1.30", "1.37")
NAMESPACE = "dicom-node"
EXAMPLES = {"secret.example.yaml", "prometheus-adapter-rules.yaml"}  # applied by hand, not by kustomization.yaml
CLUSTER_SCOPED = {"Namespace"}


def _files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


def _all() -> list[tuple[str, dict]]:
    return [(p.name, d) for p in _files() for d in _docs(p)]


def _one(kind: str, name: str) -> dict:
    found = [d for _, d in _all() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _pod(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]


def _container(deployment: str) -> dict:
    containers = _pod(_one("Deployment", deployment))["containers"]
    assert len(containers) == 1
    return containers[0]


def _node_config(monkeypatch, root: Path | None = None, database_url: str | None = None):
    """The ConfigMap's config.yaml as the node reads it in a pod (env overrides as the manifests set them)."""
    from dicom_node.config import parse_config

    for name in ("DICOM_NODE_STORAGE_ROOT", "DICOM_NODE_DATABASE_URL", "DICOM_NODE_WEB_USERS"):
        monkeypatch.delenv(name, raising=False)
    if root is not None:
        monkeypatch.setenv("DICOM_NODE_STORAGE_ROOT", str(root))
    if database_url is not None:
        monkeypatch.setenv("DICOM_NODE_DATABASE_URL", database_url)
    text = _one("ConfigMap", "dicom-node-config")["data"]["config.yaml"]
    return parse_config(yaml.safe_load(text), Path("/etc/dicom-node"), "docs/kubernetes/configmap.yaml")


# ---- schemas ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_validates_strictly_against_the_kubernetes_schemas(version):
    resources = _all()
    assert len(resources) >= 10
    for name, doc in resources:
        try:
            validated = kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']}: {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:  # a CRD or a wrong apiVersion: not validated, so no
            pytest.fail(f"{name}: {exc.message}")
        assert validated == version


def test_strict_validation_rejects_a_misspelt_field_and_a_wrong_type():
    """The check above is not vacuous: the strict schemas refuse what a cluster would."""
    worker = _one("Deployment", "dicom-node-worker")
    worker["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/", "port": 1}}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(worker, VERSIONS[0], strict=True)
    hpa = _one("HorizontalPodAutoscaler", "dicom-node-worker")
    hpa["spec"]["minReplicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(hpa, VERSIONS[0], strict=True)


def test_kustomization_applies_every_manifest_but_the_examples_in_one_namespace():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    assert kustomization["namespace"] == NAMESPACE
    assert set(kustomization["resources"]) == {p.name for p in _files()} - EXAMPLES
    for name, doc in _all():
        if doc["kind"] in CLUSTER_SCOPED:
            assert doc["metadata"]["name"] == NAMESPACE
        elif name != "prometheus-adapter-rules.yaml":  # the adapter's, in its own namespace
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{name}: {doc['kind']} (kubectl apply -f)"
    images = {
        c["image"].rsplit(":", 1)[0] for _, d in _all() if d["kind"] == "Deployment" for c in _pod(d)["containers"]
    }
    assert images == {i["name"] for i in kustomization["images"]}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (for `kubectl kustomize`) absent")
def test_what_kustomize_renders_validates_too():
    done = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    rendered = [d for d in yaml.safe_load_all(done.stdout) if d]
    kinds = sorted(d["kind"] for d in rendered)
    assert kinds == sorted(d["kind"] for n, d in _all() if n not in EXAMPLES)
    for doc in rendered:
        kubernetes_validate.validate(doc, VERSIONS[0], strict=True)


# ---- agreement with the node -----------------------------------------------------------------------------------
def test_the_configmap_is_a_listener_configuration_the_node_accepts(monkeypatch):
    cfg = _node_config(monkeypatch)
    assert cfg.workers.count == 0  # listeners start no workers: the worker Deployment does the analysis
    assert cfg.node.host == "0.0.0.0" and cfg.web.enabled and cfg.web.host == "0.0.0.0"  # reachable on the pod IP
    assert cfg.storage.root == Path("/data") and cfg.storage.database_url is None  # the URL comes from the Secret
    assert cfg.destinations and all(d.mode == "silent" for d in cfg.destinations)
    secret_url = "postgresql+psycopg://dicomnode:pw@postgres.example.org:5432/dicomnode"
    cfg = _node_config(monkeypatch, root=Path("/elsewhere"), database_url=secret_url)
    assert cfg.storage.database_url == secret_url and cfg.storage.root == Path("/elsewhere")


def test_pods_mount_config_spool_and_secret_as_the_node_reads_them():
    from dicom_node.cli import build_parser

    config_map = _one("ConfigMap", "dicom-node-config")
    pvc = _one("PersistentVolumeClaim", "dicom-node-spool")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    secret = _one("Secret", "dicom-node-secrets")
    source = "\n".join(p.read_text(encoding="utf-8") for p in (REPO / "dicom_node").rglob("*.py"))
    for deployment, command in (("dicom-node-listener", "cmd_serve"), ("dicom-node-worker", "cmd_worker")):
        pod, container = _pod(_one("Deployment", deployment)), _container(deployment)
        args = build_parser().parse_args(container["command"][1:])
        assert container["command"][0] == "dicom-node" and args.func.__name__ == command
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
        config_dir = str(Path(args.config).parent)
        assert mounts[config_dir]["configMap"]["name"] == config_map["metadata"]["name"]
        env = {e["name"]: e for e in container["env"]}
        assert (
            mounts[env["DICOM_NODE_STORAGE_ROOT"]["value"]]["persistentVolumeClaim"]["claimName"] == "dicom-node-spool"
        )
        ref = env["DICOM_NODE_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
        for name, var in env.items():
            if name.startswith("DICOM_NODE_"):
                assert f'"{name}"' in source, f"{deployment}: the node reads no {name}"
            if "secretKeyRef" in var.get("valueFrom", {}):
                assert var["valueFrom"]["secretKeyRef"]["key"] in secret["stringData"]


def test_pods_run_as_the_restricted_pod_security_profile_wants():
    namespace = _one("Namespace", NAMESPACE)
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for deployment in ("dicom-node-listener", "dicom-node-worker"):
        pod, container = _pod(_one("Deployment", deployment)), _container(deployment)
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
        assert sc["readOnlyRootFilesystem"] is True
        assert set(container["resources"]["requests"]) == {"cpu", "memory"} and container["resources"]["limits"]
        allowed = {"configMap", "secret", "emptyDir", "persistentVolumeClaim"}
        assert all(set(v) - {"name"} <= allowed for v in pod["volumes"])


def test_ports_and_probes_are_what_the_node_serves(monkeypatch, tmp_path):
    from starlette.testclient import TestClient

    from dicom_node.factories import open_store
    from dicom_node.web.drift import DriftWatch
    from dicom_node.web.server import make_app

    monkeypatch.setattr(DriftWatch, "model_pair", lambda self: None)  # no model files hashed (torch not imported)

    cfg = _node_config(monkeypatch, root=tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'db.sqlite3'}")
    container = _container("dicom-node-listener")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"dicom": cfg.node.port, "http": cfg.web.port} == {"dicom": 11112, "http": 8480}
    probes = {k: container[k]["httpGet"] for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == probes["startupProbe"]["path"] == "/healthz"
    assert all(p["port"] == "http" for p in probes.values())
    dicom = _one("Service", "dicom-node-dicom")["spec"]
    assert dicom["type"] in ("LoadBalancer", "NodePort") and dicom["externalTrafficPolicy"] == "Local"
    assert [(p["port"], p["targetPort"]) for p in dicom["ports"]] == [(11112, "dicom")]
    web = _one("Service", "dicom-node-web")["spec"]
    assert web["type"] == "ClusterIP" and [(p["port"], p["targetPort"]) for p in web["ports"]] == [(8480, "http")]
    labels = _one("Deployment", "dicom-node-listener")["spec"]["template"]["metadata"]["labels"]
    assert dicom["selector"] == web["selector"] == labels
    annotations = _one("Deployment", "dicom-node-listener")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(cfg.web.port) and annotations["prometheus.io/path"] == "/metrics"

    # the node's own web app, as `serve` builds it from this configuration (no server, no models loaded)
    store = open_store(cfg)
    try:
        with TestClient(make_app(cfg, store, lambda: pytest.fail("no models here"))) as client:
            assert client.get(probes["livenessProbe"]["path"]).status_code == 200
            ready = client.get(probes["readinessProbe"]["path"])
            # no worker pod yet: a listener still receives (studies wait in the queue), so it stays in the Service
            assert ready.status_code == 200 and "workers" not in ready.json()["checks"], ready.json()
            metrics = client.get(annotations["prometheus.io/path"])
            assert metrics.status_code == 200
        full = cfg.model_copy(update={"storage": cfg.storage.model_copy(update={"min_free_disk_mb": 10**12})})
        with TestClient(make_app(full, store, lambda: pytest.fail("no models here"))) as client:
            ready = client.get(probes["readinessProbe"]["path"])  # a full disk: out of the Service
            assert ready.status_code == 503 and ready.json()["checks"]["disk"] != "ok", ready.json()
    finally:
        store.close()
    exported = {m.group(1): m.group(2) for m in re.finditer(r"^# TYPE (\S+) (\S+)$", metrics.text, flags=re.M)}
    hpa_metric = _hpa_metric()
    assert exported.get(hpa_metric) == "gauge", f"the node's /metrics exports no gauge {hpa_metric}"
    samples = re.findall(rf"^{hpa_metric}(\{{.*\}})? (\S+)$", metrics.text, flags=re.M)
    assert samples == [("", "0.0")]  # one series without labels: nothing queued


def _hpa_metric() -> str:
    (metric,) = _one("HorizontalPodAutoscaler", "dicom-node-worker")["spec"]["metrics"]
    assert metric["type"] == "External"
    return metric["external"]["metric"]["name"]


def test_the_autoscaler_scales_the_workers_on_the_queue_served_by_the_adapter_rule():
    hpa = _one("HorizontalPodAutoscaler", "dicom-node-worker")["spec"]
    worker = _one("Deployment", "dicom-node-worker")
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "dicom-node-worker"}
    assert "replicas" not in worker["spec"]  # the autoscaler owns the count; an apply must not reset it
    assert hpa["minReplicas"] >= 1  # studies are analysed without waiting for a pod to start
    assert worker["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert _hpa_metric() == "dicom_node_queue_depth"
    (metric,) = hpa["metrics"]
    assert metric["external"]["target"]["type"] == "AverageValue"
    # the adapter serves that name, from that series, as one value: every listener reports the whole queue
    adapter = yaml.safe_load(_one("ConfigMap", "prometheus-adapter")["data"]["config.yaml"])
    (rule,) = [r for r in adapter["externalRules"] if r["name"]["as"] == _hpa_metric()]
    assert re.match(r"^\w+", rule["seriesQuery"]).group(0) == _hpa_metric()  # type: ignore[union-attr]
    assert re.fullmatch(rule["name"]["matches"], _hpa_metric())
    assert rule["metricsQuery"].startswith("max(") and "sum(" not in rule["metricsQuery"]
    assert rule["resources"]["overrides"]["namespace"] == {"resource": "namespace"}


def test_listeners_are_several_instances_of_one_node(monkeypatch):
    """Two or more `serve` pods on one database and spool, each named by its pod's host name (node.instance_name
    unset: names must differ, and pod names do), replaced one at a time, at least one kept through a drain."""
    cfg = _node_config(monkeypatch)
    assert cfg.node.instance_name is None
    listener = _one("Deployment", "dicom-node-listener")
    assert listener["spec"]["replicas"] >= 2
    assert listener["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pdb = _one("PodDisruptionBudget", "dicom-node-listener")["spec"]
    assert pdb["minAvailable"] >= 1 and pdb["selector"]["matchLabels"] == listener["spec"]["selector"]["matchLabels"]
    assert "hostname" not in _pod(listener) and "subdomain" not in _pod(listener)  # the pod's own name
