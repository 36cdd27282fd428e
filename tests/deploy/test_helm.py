"""The Helm chart renders, lints and validates strictly against Kubernetes schemas."""

import importlib.util

import pytest
import yaml

from tests.conftest import ROOT

CHART = ROOT / "deploy" / "helm" / "atoken"
pytestmark = pytest.mark.skipif(importlib.util.find_spec("helm_python") is None or
                                importlib.util.find_spec("kubernetes_validate") is None,
                                reason="helm-python-sdk / kubernetes-validate not installed")
K8S = "1.37.0"
CRD_KINDS = {"ServiceMonitor"}  # not in the core schemas; checked by shape below

VALUE_SETS = {
    "defaults": {},
    "gpu-pvc-autoscaling": {
        "image": {"tag": "cuda"}, "gpu": {"enabled": True, "count": 1},
        "nodeSelector": {"nvidia.com/gpu.present": "true"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "checkpoint": {"source": "pvc", "file": "atoken-soc.pt", "config": "atoken-soc.yaml",
                       "gsFile": "3d_decode_gs.pt", "gsConfig": "3d_decode_gs.yaml",
                       "pvc": {"claimName": "atoken-weights"}},
        "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 8},
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "apiKeys": {"keys": ["0123456789abcdef0123"]},
        "jobs": {"volume": "pvc", "pvc": {"claimName": "atoken-jobs"}, "ttlSeconds": 3600},
        "service": {"sessionAffinity": "ClientIP"},
    },
    "triton-grpc-init": {
        "triton": {"enabled": True, "protocol": "grpc", "replicaCount": 3},
        "checkpoint": {"source": "init", "file": "model.safetensors",
                       "init": {"command": ["sh", "-c", "cp /seed/model.safetensors /models/"]}},
        "apiKeys": {"existingSecret": "team-keys"},
        "podDisruptionBudget": {"enabled": False},
    },
}


def render(values):
    import helm_python as helm

    chart = helm.Chart.load(str(CHART))
    try:
        out = chart.render(values, name="rel", namespace="ml")
    finally:
        chart.close()
    docs = []
    for path, text in out.items():
        if path.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


@pytest.mark.parametrize("name", VALUE_SETS)
def test_renders_lints_and_validates(name):
    import helm_python as helm
    import kubernetes_validate

    values = VALUE_SETS[name]
    report = helm.lint(str(CHART), values, strict=True)
    assert not report["errors"], report
    assert not [m for m in report["messages"] if m["severity"] >= 2], report["messages"]
    docs = render(values)
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            assert doc["spec"]["endpoints"][0]["path"] == "/metrics"
            continue
        kubernetes_validate.validate(doc, K8S, strict=True)
    kinds = [d["kind"] for d in docs]
    assert kinds.count("Deployment") == (2 if name.startswith("triton") else 1)


def _deployment(docs, suffix=""):
    return next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == f"rel-atoken{suffix}")


def test_probes_security_and_drain_time():
    docs = render({})
    pod = _deployment(docs)["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"] and sc["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"]
    assert pod["terminationGracePeriodSeconds"] > 120  # longer than ATOKEN_REQUEST_TIMEOUT_S
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget"}


def test_gpu_checkpoint_hpa_and_secret_wiring():
    docs = render(VALUE_SETS["gpu-pvc-autoscaling"])
    pod = _deployment(docs)["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == "atoken-weights"
    cm = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    assert cm["ATOKEN_CHECKPOINT"] == "/models/atoken-soc.pt" and cm["ATOKEN_CONFIG"] == "/models/atoken-soc.yaml"
    hpa = next(d for d in docs if d["kind"] == "HorizontalPodAutoscaler")
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Pods"]["pods"]["metric"]["name"] == "atoken_queue_drain_seconds"
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    assert "replicas" not in _deployment(docs)["spec"]
    secret = next(d for d in docs if d["kind"] == "Secret")
    assert "0123456789abcdef0123" in secret["stringData"]["keys"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["ATOKEN_API_KEY_FILE"] == "/etc/atoken/keys/keys" and env["ATOKEN_DEVICE"] == "cuda"


def test_jobs_storage_wiring():
    default = _deployment(render({}))["spec"]["template"]["spec"]
    pvc_docs = render(VALUE_SETS["gpu-pvc-autoscaling"])
    on_pvc = _deployment(pvc_docs)["spec"]["template"]["spec"]
    for pod in (default, on_pvc):
        c = pod["containers"][0]
        env = {e["name"]: e.get("value") for e in c["env"]}
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        assert env["ATOKEN_JOBS_DIR"] == mounts["jobs"] == "/var/lib/atoken/jobs"
        assert int(env["ATOKEN_JOBS_MAX_BYTES"]) == 2 * 2**30
    assert {v["name"]: v for v in default["volumes"]}["jobs"]["emptyDir"]["sizeLimit"] == "4Gi"
    assert {v["name"]: v for v in on_pvc["volumes"]}["jobs"]["persistentVolumeClaim"]["claimName"] == "atoken-jobs"
    assert {e["name"]: e.get("value") for e in on_pvc["containers"][0]["env"]}["ATOKEN_JOB_TTL_S"] == "3600"
    service = next(d for d in pvc_docs if d["kind"] == "Service" and not d["metadata"]["name"].endswith("triton"))
    assert service["spec"]["sessionAffinity"] == "ClientIP"


def test_triton_beside_the_front_end():
    docs = render(VALUE_SETS["triton-grpc-init"])
    cm = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    assert cm["ATOKEN_WORKER"] == "triton" and cm["ATOKEN_TRITON_URL"] == "rel-atoken-triton:8001"
    # the front ends keep batches on the wire for every Triton pod behind the Service
    assert cm["ATOKEN_TRITON_REPLICAS"] == "3" and _deployment(docs, "-triton")["spec"]["replicas"] == 3
    triton = _deployment(docs, "-triton")["spec"]["template"]["spec"]["containers"][0]
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert not any(d["kind"] == "Secret" for d in docs)  # existingSecret is referenced, not created
    pod = _deployment(docs)["spec"]["template"]["spec"]
    assert pod["initContainers"][0]["command"][0] == "sh"


@pytest.mark.parametrize("bad", [
    {"replicaCount": -1},
    {"checkpoint": {"source": "s3"}},
    {"checkpoint": {"source": "pvc", "file": "m.pt"}},  # no claim name
    {"triton": {"protocol": "websocket"}},
    {"config": {"PORT": "8000"}},  # settings must be ATOKEN_*
    {"apiKeys": {"keys": ["short"]}},
    {"jobs": {"volume": "pvc"}},  # no claim name
    {"jobs": {"volume": "hostPath"}},
    {"unknownKey": True},
])
def test_bad_values_fail(bad):
    import helm_python as helm

    report = helm.lint(str(CHART), bad, strict=True)
    assert report["errors"] or any(m["severity"] >= 3 for m in report["messages"]), (bad, report)
    chart = helm.Chart.load(str(CHART))
    try:
        for good in VALUE_SETS.values():
            chart.validate_schema(chart.merge_values(good))
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema(chart.merge_values(bad))
    finally:
        chart.close()
