"""docker-compose.yml and its nginx config, checked against the project (Docker cannot run here):
the services run the real entry points, speak settings.py's variable names, can be scaled, and
nginx sends requests to the `web` service.
"""
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from serving.wire.connection import REDIS_USERS
from serving.wire.connection import redis_server_users
import settings
from conftest import ROOT

SETTING_NAMES = {name for name in vars(settings) if name.isupper()}
NGINX_TEMPLATE = ROOT / "deploy" / "nginx.compose.conf.template"


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def gpu_override():
    return yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text())


def environment(service):
    env = service.get("environment", {})
    return env if isinstance(env, dict) else dict(item.split("=", 1) for item in env)


def test_the_four_services_exist(compose):
    assert {"redis", "model", "web", "nginx"} <= set(compose["services"])


@pytest.mark.parametrize("role", ["model", "web"])
def test_model_and_web_run_the_real_entry_point(compose, role):
    command = compose["services"][role]["command"]

    assert command[:2] == ["python", "run_keras_server.py"] and command[2:] == [role]
    # The entry point's own command line accepts it (it refuses an unknown role with exit 2).
    accepted = subprocess.run([sys.executable, *command[1:], "--help"], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
    assert accepted.returncode == 0, accepted.stderr


def test_every_variable_is_a_setting(compose, gpu_override):
    for name, service in {**compose["services"], **gpu_override["services"]}.items():
        unknown = set(environment(service)) - SETTING_NAMES
        assert not unknown, f"{name} sets variables settings.py does not read: {unknown}"
    # So are the variables a user may set in the shell or .env to configure the stack, but for
    # Redis' passwords (`make secrets` writes them into .env).
    passwords = {f"REDIS_{user.upper()}_PASSWORD" for user in [*REDIS_USERS, "admin"]}
    for path in ("docker-compose.yml", "docker-compose.gpu.yml"):
        interpolated = set(re.findall(r"\$\{(\w+)", (ROOT / path).read_text()))
        assert interpolated <= SETTING_NAMES | passwords, path


def test_redis_defines_the_services_users_and_each_tier_logs_in_as_its_own(compose):
    """(tests/wire/test_redis_acl.py runs redis-server with these arguments, and the tiers with
    these users, and shows that every path of the service works within them.)"""
    services = compose["services"]
    command = services["redis"]["command"]
    users = [*REDIS_USERS, "admin"]
    assert command[command.index("--user"):] == redis_server_users(
        "${IMAGE_QUEUE:-image_queue}",
        {user: f"${{REDIS_{user.upper()}_PASSWORD:?run make secrets}}" for user in users})
    for tier in ("model", "web"):
        env = environment(services[tier])
        assert env["REDIS_USERNAME"] == tier
        assert env["REDIS_PASSWORD"] == f"${{REDIS_{tier.upper()}_PASSWORD:?run make secrets}}"


def test_every_setting_can_be_given_to_the_stack(compose):
    passed = set().union(*(environment(service) for service in compose["services"].values()))
    # INSTANCE_NAME is left to its default, each container's own hostname.
    assert SETTING_NAMES - {"INSTANCE_NAME"} <= passed, SETTING_NAMES - passed


def test_the_tiers_share_redis_and_limits(compose):
    services = compose["services"]
    model, web, nginx = (environment(services[name]) for name in ("model", "web", "nginx"))

    assert model["REDIS_URL"] == web["REDIS_URL"] == "redis://redis:6379/0"
    assert model["REQUEST_TIMEOUT_S"] == web["REQUEST_TIMEOUT_S"] == nginx["REQUEST_TIMEOUT_S"]
    assert web["MAX_UPLOAD_BYTES"] == nginx["MAX_UPLOAD_BYTES"]


@pytest.mark.parametrize("name", ["model", "web"])
def test_scaled_services_can_run_many_copies(compose, name):
    service = compose["services"][name]
    assert "container_name" not in service and "ports" not in service
    assert "INSTANCE_NAME" not in environment(service)  # the default, the hostname, is unique


def test_gpu_override_reserves_an_nvidia_gpu_for_the_model_service(gpu_override):
    model = gpu_override["services"]["model"]
    device, = model["deploy"]["resources"]["reservations"]["devices"]

    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert model["build"]["args"]["GPU"] == "1"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "requirements.txt" in dockerfile and "tensorflow[and-cuda]" in dockerfile


def mounts(service):
    """Repository files a service mounts, by their path in the container."""
    pairs = (volume.split(":")[:2] for volume in service["volumes"])
    return {target: ROOT / source for source, target in pairs if source.startswith("./")}


def test_nginx_sends_requests_to_the_web_service(compose):
    nginx, web = compose["services"]["nginx"], compose["services"]["web"]
    assert mounts(nginx)["/etc/nginx/templates/default.conf.template"] == NGINX_TEMPLATE
    text = NGINX_TEMPLATE.read_text()

    upstreams = dict(re.findall(r"upstream (\w+) \{(.*?)\}", text, re.S))
    proxied, = re.findall(r"proxy_pass http://(\w+);", text)
    servers = re.findall(r"^\s*server ([\w.-]+):(\d+);", upstreams[proxied], re.M)
    assert servers == [("web", environment(web)["PORT"])]
    assert "web" in nginx["depends_on"]


def render_compose_nginx_conf(nginx, values):
    """What the nginx image makes of the template: it sources its /docker-entrypoint.d/*.envsh
    (only executable ones, in name order, before its 20-envsubst-on-templates step), then fills
    in ${NAME} from the environment."""
    envsh, = (source for target, source in mounts(nginx).items()
              if target.startswith("/docker-entrypoint.d/"))
    assert envsh.name.endswith(".envsh") and os.access(envsh, os.X_OK)
    derived = subprocess.run(["sh", "-c", f'. "{envsh}"; echo "$PROXY_TIMEOUT_S"'],
                             env={**os.environ, **values}, capture_output=True, text=True,
                             check=True).stdout.strip()
    values = {**values, "PROXY_TIMEOUT_S": derived}
    return re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], NGINX_TEMPLATE.read_text())


@pytest.mark.parametrize("timeout_s, proxy_timeout", [("30", "35s"), ("2.5", "7s")])
def test_compose_nginx_config_is_valid_with_timeouts_past_the_apps(compose, tmp_path, timeout_s,
                                                                    proxy_timeout):
    nginx_service = compose["services"]["nginx"]
    # Compose's defaults (`${NAME:-default}`), then the timeout under test.
    env = {name: re.sub(r"\$\{\w+:-(.*)\}", r"\1", value)
           for name, value in environment(nginx_service).items()}
    env["REQUEST_TIMEOUT_S"] = timeout_s
    conf = render_compose_nginx_conf(nginx_service, env)

    assert f"proxy_read_timeout {proxy_timeout};" in conf
    assert f"client_max_body_size {env['MAX_UPLOAD_BYTES']};" in conf
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(nginx):
        pytest.skip("nginx is not installed (`make nginx`)")
    # nginx -t inside an http block like the image's; `web` resolves only on the compose network.
    (tmp_path / "default.conf").write_text(conf.replace("server web:", "server 127.0.0.1:"))
    (tmp_path / "nginx.conf").write_text(
        "pid nginx.pid; error_log stderr; events {}\n"
        "http { client_body_temp_path body; proxy_temp_path proxy; fastcgi_temp_path fastcgi;\n"
        "       uwsgi_temp_path uwsgi; scgi_temp_path scgi; include default.conf; }\n")
    checked = subprocess.run([nginx, "-t", "-p", f"{tmp_path}/", "-c", "nginx.conf", "-e",
                              "stderr"], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
