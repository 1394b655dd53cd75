"""deploy/k8s: every overlay renders with `kubectl kustomize`, validates offline against the
Kubernetes schemas (kubernetes-validate) and KEDA's ScaledObject schema, and agrees with the code:
settings that exist, probes on real routes, KEDA watching the queue the workers read.
"""
import subprocess
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

import run_keras_server
import settings
from conftest import ROOT

OVERLAYS = ["cpu", "gpu"]
KUBERNETES_VERSION = "1.33.0"


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request):
    """The overlay's manifests, by kind and name."""
    output = subprocess.run(["kubectl", "kustomize", str(ROOT / "deploy/k8s/overlays" /
                                                         request.param)],
                            capture_output=True, text=True, check=True).stdout
    manifests = [doc for doc in yaml.safe_load_all(output) if doc]
    by_kind = {}
    for manifest in manifests:
        by_kind.setdefault(manifest["kind"], {})[manifest["metadata"]["name"]] = manifest
    return {"overlay": request.param, "all": manifests, **by_kind}


def scaled_object_schema():
    crd = next(doc for doc in yaml.safe_load_all((ROOT / "tests/data/keda-scaledobject-crd.yaml")
                                                 .read_text()) if doc)
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1")["schema"][
        "openAPIV3Schema"]


def test_manifests_validate_against_their_schemas(rendered):
    for manifest in rendered["all"]:
        if manifest["kind"] == "ScaledObject":
            jsonschema.validate(manifest, scaled_object_schema())
        else:
            kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)
    assert {"Deployment", "Service", "StatefulSet", "Ingress", "PodDisruptionBudget",
            "ConfigMap", "ScaledObject"} <= set(rendered)


def test_a_bad_manifest_is_caught():
    """The validators do reject what is wrong (a typo and a missing field)."""
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "Service", "metadata": {
            "name": "x"}, "spec": {"portz": []}}, KUBERNETES_VERSION, strict=True)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
                             "metadata": {"name": "x"}, "spec": {"triggers": []}},
                            scaled_object_schema())


def containers(rendered):
    for kind in ("Deployment", "StatefulSet"):
        for workload in rendered.get(kind, {}).values():
            yield from workload["spec"]["template"]["spec"]["containers"]


def settings_given(rendered, container):
    """The variables a container gets: its own env and its ConfigMaps'."""
    names = {item["name"]: item.get("value") for item in container.get("env", [])}
    for source in container.get("envFrom", []):
        names.update(rendered["ConfigMap"][source["configMapRef"]["name"]]["data"])
    return names


def test_every_variable_is_a_setting_and_every_probe_a_route(rendered):
    known = {name for name in vars(settings) if name.isupper()}
    routes = {rule.rule for rule in run_keras_server.app.url_map.iter_rules()}
    for container in containers(rendered):
        if container["name"] == "redis":
            continue
        unknown = set(settings_given(rendered, container)) - known
        assert not unknown, f"{container['name']} sets variables settings.py lacks: {unknown}"
        for probe in ("livenessProbe", "readinessProbe"):
            if "httpGet" in container.get(probe, {}):
                assert container[probe]["httpGet"]["path"] in routes


def test_keda_scales_the_workers_on_their_queue(rendered):
    scaled = rendered["ScaledObject"]["model"]
    assert scaled["spec"]["scaleTargetRef"]["name"] in rendered["Deployment"]
    model = rendered["Deployment"][scaled["spec"]["scaleTargetRef"]["name"]]
    worker = settings_given(rendered, model["spec"]["template"]["spec"]["containers"][0])
    trigger = scaled["spec"]["triggers"][0]
    assert trigger["type"] == "redis"
    assert trigger["metadata"]["listName"] == worker["IMAGE_QUEUE"]
    assert trigger["metadata"]["listLength"] == worker["BATCH_SIZE"]
    # The address KEDA dials, from its own namespace, is the Service the workers' REDIS_URL names.
    redis_url = urlsplit(worker["REDIS_URL"])
    host, port = trigger["metadata"]["address"].rsplit(":", 1)
    service = rendered["Service"][redis_url.hostname]
    assert host == f"{redis_url.hostname}.{service['metadata']['namespace']}.svc.cluster.local"
    assert int(port) == (redis_url.port or 6379) == service["spec"]["ports"][0]["port"]
    assert scaled["metadata"]["namespace"] == model["metadata"]["namespace"]
    assert scaled["spec"]["minReplicaCount"] >= 1


def test_grace_periods_and_front_door_outlast_a_request(rendered):
    shared = rendered["ConfigMap"]["keras-server-settings"]["data"]
    timeout_s = float(shared["REQUEST_TIMEOUT_S"])
    for name in ("web", "model"):
        spec = rendered["Deployment"][name]["spec"]["template"]["spec"]
        assert spec["terminationGracePeriodSeconds"] > timeout_s
        assert spec["containers"][0]["resources"]["requests"]
    annotations = rendered["Ingress"]["keras-server"]["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    assert annotations[prefix + "proxy-body-size"] == shared["MAX_UPLOAD_BYTES"]
    assert float(annotations[prefix + "proxy-read-timeout"]) > timeout_s
    assert {"web", "model"} <= set(rendered["PodDisruptionBudget"])


def test_gpu_overlay_gives_each_worker_a_gpu(rendered):
    model = rendered["Deployment"]["model"]["spec"]["template"]["spec"]["containers"][0]
    gpus = model["resources"].get("limits", {}).get("nvidia.com/gpu")
    assert gpus == (1 if rendered["overlay"] == "gpu" else None)
    images = {container["image"] for container in containers(rendered)
              if container["name"] != "redis"}
    assert len(images) == 1  # one image for both tiers
