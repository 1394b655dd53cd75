"""deploy/k8s: every overlay renders with `kubectl kustomize`, validates offline against the
Kubernetes schemas (kubernetes-validate) and KEDA's ScaledObject schema, and agrees with the code:
settings that exist, probes on real routes, KEDA watching the queue the workers read.
"""
import shutil
import subprocess
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from serving.wire.connection import REDIS_USERS
from serving.wire.connection import redis_server_users
from serving.wire.keys import Keys
from serving.web.app import create_app
import settings
from conftest import ROOT

OVERLAYS = ["cpu", "gpu"]
KUBERNETES_VERSION = "1.33.0"


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A copy of deploy/ with Redis' passwords generated, as `make secrets` does."""
    folder = tmp_path_factory.mktemp("checkout")
    shutil.copytree(ROOT / "deploy", folder / "deploy",
                    ignore=shutil.ignore_patterns("redis-passwords.env"))
    subprocess.run(["sh", str(folder / "deploy/make-secrets.sh")], check=True,
                   capture_output=True)
    return folder


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request, checkout):
    """The overlay's manifests, by kind and name."""
    output = subprocess.run(["kubectl", "kustomize", str(checkout / "deploy/k8s/overlays" /
                                                         request.param)],
                            capture_output=True, text=True, check=True).stdout
    manifests = [doc for doc in yaml.safe_load_all(output) if doc]
    by_kind = {}
    for manifest in manifests:
        by_kind.setdefault(manifest["kind"], {})[manifest["metadata"]["name"]] = manifest
    return {"overlay": request.param, "all": manifests, **by_kind}


def keda_schema(kind):
    """KEDA's schema of a kind (tests/data holds its CRDs)."""
    path = ROOT / f"tests/data/keda-{kind.lower()}-crd.yaml"
    crd = next(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1")["schema"][
        "openAPIV3Schema"]


def scaled_object_schema():
    return keda_schema("ScaledObject")


def test_manifests_validate_against_their_schemas(rendered):
    for manifest in rendered["all"]:
        if manifest["apiVersion"].startswith("keda.sh/"):
            jsonschema.validate(manifest, keda_schema(manifest["kind"]))
        else:
            kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)
    assert {"Deployment", "Service", "StatefulSet", "Ingress", "PodDisruptionBudget",
            "ConfigMap", "ScaledObject", "TriggerAuthentication", "Secret",
            "NetworkPolicy"} <= set(rendered)


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
    routes = {rule.rule for rule in create_app().url_map.iter_rules()}
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
    # The second trigger asks for one worker while the web tier refuses requests for want of a
    # warm one (the list it writes then: tests/end_to_end/test_serving_path.py), from zero too.
    # A rolling update stops an old worker only once a new one is ready: its supervisor's
    # /readyz, on the metrics port (tests/rollout/test_model_lifecycle.py).
    assert model["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    probe = model["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]
    assert probe["path"] == "/readyz"
    ports = model["spec"]["template"]["spec"]["containers"][0]["ports"]
    assert [p["containerPort"] for p in ports if p["name"] == probe["port"]] == [
        int(worker["WORKER_METRICS_PORT"])]
    wake = scaled["spec"]["triggers"][1]
    assert wake["type"] == "redis" and wake["authenticationRef"] == trigger["authenticationRef"]
    assert wake["metadata"] == {**trigger["metadata"], "listLength": "1",
                                "listName": Keys(worker["IMAGE_QUEUE"]).wake}


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


def test_redis_is_locked_and_every_tier_logs_in_as_its_own_user(rendered):
    secret = rendered["Secret"]["redis-passwords"]
    users = [*REDIS_USERS, "admin"]
    password_keys = {f"REDIS_{user.upper()}_PASSWORD" for user in users}
    assert set(secret["data"]) == password_keys
    assert len(set(secret["data"].values())) == len(users)  # generated, one each

    # Redis defines the users with the service's own rules, each password from the Secret.
    redis_container = rendered["StatefulSet"]["redis"]["spec"]["template"]["spec"][
        "containers"][0]
    queue = rendered["ConfigMap"]["keras-server-settings"]["data"]["IMAGE_QUEUE"]
    expected = redis_server_users(queue, {user: f"$(REDIS_{user.upper()}_PASSWORD)"
                                                   for user in users})
    args = redis_container["args"]
    assert args[args.index("--user"):] == expected
    secret_env = {item["name"]: item["valueFrom"]["secretKeyRef"]
                  for item in redis_container["env"] if "valueFrom" in item}
    assert secret_env == {key: {"name": "redis-passwords", "key": key} for key in password_keys}

    for tier in ("web", "model"):
        container = rendered["Deployment"][tier]["spec"]["template"]["spec"]["containers"][0]
        env = {item["name"]: item for item in container["env"]}
        assert env["REDIS_USERNAME"]["value"] == tier
        assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
            "name": "redis-passwords", "key": f"REDIS_{tier.upper()}_PASSWORD"}

    # KEDA logs in as `keda`, its password through the TriggerAuthentication.
    trigger = rendered["ScaledObject"]["model"]["spec"]["triggers"][0]
    assert trigger["metadata"]["username"] == "keda"
    auth = rendered["TriggerAuthentication"][trigger["authenticationRef"]["name"]]
    assert auth["spec"]["secretTargetRef"] == [
        {"parameter": "password", "name": "redis-passwords", "key": "REDIS_KEDA_PASSWORD"}]

    # Only the two tiers and KEDA's namespace reach Redis.
    policy = rendered["NetworkPolicy"]["redis"]["spec"]
    assert policy["podSelector"]["matchLabels"] == redis_container_labels(rendered)
    peers = policy["ingress"][0]["from"]
    assert peers[0]["podSelector"]["matchExpressions"] == [
        {"key": "app.kubernetes.io/name", "operator": "In", "values": ["web", "model"]}]
    assert peers[1]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "keda"}
    for tier in ("web", "model"):
        labels = rendered["Deployment"][tier]["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == tier


def redis_container_labels(rendered):
    return rendered["StatefulSet"]["redis"]["spec"]["template"]["metadata"]["labels"]
