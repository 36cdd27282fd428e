"""The KubeRay RayJob for bulk tokenization: valid YAML, only fields of the ray.io/v1 RayJob API
(KubeRay's API reference), pod templates valid against the Kubernetes schemas, and an entrypoint
our own command line accepts."""

import importlib.util
import shlex

import pytest
import yaml

from service.__main__ import build_parser
from tests.conftest import ROOT

MANIFEST = ROOT / "deploy" / "kuberay" / "tokenize-dataset-rayjob.yaml"
K8S = "1.37.0"
# The ray.io/v1 fields this manifest may use (KubeRay API reference: RayJobSpec, RayClusterSpec,
# HeadGroupSpec, WorkerGroupSpec).
RAYJOB_SPEC = {"entrypoint", "submissionMode", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished",
               "activeDeadlineSeconds", "runtimeEnvYAML", "rayClusterSpec", "clusterSelector", "suspend",
               "entrypointNumCpus", "entrypointNumGpus", "submitterPodTemplate", "backoffLimit"}
CLUSTER_SPEC = {"rayVersion", "headGroupSpec", "workerGroupSpecs", "enableInTreeAutoscaling", "autoscalerOptions"}
HEAD_SPEC = {"rayStartParams", "template", "serviceType", "enableIngress"}
WORKER_SPEC = {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template",
               "numOfHosts", "suspend", "scaleStrategy"}


def _job() -> dict:
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    assert len(docs) == 1
    return docs[0]


def test_rayjob_uses_only_rayjob_fields():
    job = _job()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    assert set(spec) <= RAYJOB_SPEC and spec["submissionMode"] in ("K8sJobMode", "HTTPMode")
    cluster = spec["rayClusterSpec"]
    assert set(cluster) <= CLUSTER_SPEC
    assert set(cluster["headGroupSpec"]) <= HEAD_SPEC
    for group in cluster["workerGroupSpecs"]:
        assert set(group) <= WORKER_SPEC
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for params in [cluster["headGroupSpec"]["rayStartParams"]] + [g["rayStartParams"] for g in cluster["workerGroupSpecs"]]:
        assert all(isinstance(v, str) for v in params.values())  # map[string]string in the CRD


@pytest.mark.skipif(importlib.util.find_spec("kubernetes_validate") is None, reason="kubernetes-validate missing")
def test_pod_templates_are_valid_kubernetes():
    import kubernetes_validate

    cluster = _job()["spec"]["rayClusterSpec"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for i, template in enumerate(templates):
        doc = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"t{i}"}, "template": template}
        kubernetes_validate.validate(doc, K8S, strict=True)
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_entrypoint_is_our_command():
    argv = shlex.split(_job()["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "service"]
    args = build_parser().parse_args(argv[3:])
    assert args.command == "tokenize-dataset" and args.engine == "ray" and args.embeddings
