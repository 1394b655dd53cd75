"""Redis locked as docker-compose.yml locks it: redis-server started with the compose file's own
arguments (its ACL users, with test passwords), the model worker and the web tier logging in as
the compose file's users. Every path of the service (answers, errors, a deadline's withdrawal, a
reload, metrics) runs without Redis denying one command, while each user can do only its part,
and a process with a wrong password stops at start, saying so.
"""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import redis
import requests
import yaml

from serving.wire.connection import REDIS_USERS
from serving.wire.keys import Keys
from conftest import (LASTING_HEARTBEAT, ROOT, Processes, assert_own_predictions,
                      distinct_images, free_port, frozen_workers, image_bytes, post_image,
                      reload_args, stop, tiny_settings, wait_until)

QUEUE = "acl_queue"
PASSWORDS = {f"REDIS_{user.upper()}_PASSWORD": f"{user}-secret-1234"
             for user in [*REDIS_USERS, "admin"]}

# KEDA's redis scaler asks for a list's length with this script (pkg/scalers/redis_scaler.go).
KEDA_LENGTH = """local listName = KEYS[1]
local listType = redis.call('type', listName).ok
if listType == 'list' then return redis.call('llen', listName) end
return 0"""


def interpolate(value, variables):
    """docker compose's interpolation: ${NAME}, ${NAME:-default}, ${NAME:?error}."""
    def one(match):
        name, kind, fallback = match.groups()
        if variables.get(name):
            return variables[name]
        assert kind != "?", f"compose would refuse to start: {name} unset ({fallback})"
        return fallback or ""
    return re.sub(r"\$\{(\w+)(?::([-?])([^}]*))?\}", one, value)


@pytest.fixture
def compose_redis(tmp_path):
    """redis-server with the compose file's arguments; yields its port and an admin client."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    variables = {"IMAGE_QUEUE": QUEUE, **PASSWORDS}
    command = [interpolate(arg, variables) for arg in compose["services"]["redis"]["command"]]
    assert command[0] == "redis-server"
    port = free_port()
    process = subprocess.Popen([*command, "--port", str(port), "--bind", "127.0.0.1",
                                "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    admin = redis.Redis(port=port, username="admin", password=PASSWORDS["REDIS_ADMIN_PASSWORD"],
                        decode_responses=True)
    wait_until(admin.ping, timeout=10, what="redis-server to answer")
    env = {role: {name: interpolate(str(value), variables)
                  for name, value in compose["services"][role]["environment"].items()
                  if name in ("REDIS_USERNAME", "REDIS_PASSWORD")} for role in ("model", "web")}
    yield {"port": port, "admin": admin, "env": env}
    stop(process)


def test_every_path_runs_within_each_tiers_rights(compose_redis, tmp_path, tiny_model):
    port, admin, env = compose_redis["port"], compose_redis["admin"], compose_redis["env"]
    assert env["model"]["REDIS_USERNAME"] == "model" and env["web"]["REDIS_USERNAME"] == "web"
    url = f"redis://127.0.0.1:{port}/0"
    # The test itself watches as admin; the service's processes log in as compose's users.
    processes = Processes(f"redis://admin:{PASSWORDS['REDIS_ADMIN_PASSWORD']}@127.0.0.1:{port}/0",
                          tmp_path, QUEUE)
    try:
        web = processes.web(REDIS_URL=url, **env["web"])
        refused = post_image(web.url, image_bytes())  # no worker yet: its sign for KEDA is left
        assert refused.status_code == 503 and admin.llen(Keys(QUEUE).wake) == 1
        assert "no model worker" in refused.json()["error"]
        processes.worker(REDIS_URL=url, **LASTING_HEARTBEAT, **env["model"],
                         **tiny_settings(tiny_model))
        images = distinct_images(3)
        for data in images:
            response = post_image(web.url, data, "image.png")
            assert response.status_code == 200, response.text
            assert_own_predictions(response.json()["predictions"], data, tiny_model)
        assert post_image(web.url, b"not an image").status_code == 400
        for path in ("/readyz", "/model", "/metrics"):  # heartbeats and the queue's length
            assert requests.get(web.url + path, timeout=10).status_code == 200, path

        # A job whose deadline passes while the worker is stopped is withdrawn by the web tier.
        with frozen_workers(admin, Keys(QUEUE)):
            late = post_image(web.url, images[0], "image.png",
                              headers={"X-Request-Timeout-S": "1"})
        assert late.status_code == 504, late.text

        # A reload, run as the workers' user (as `docker compose exec model ... reload` runs).
        reloaded = subprocess.run(
            [sys.executable, "run_keras_server.py", "reload",
             *reload_args(Path(tiny_model["MODEL"]).parent, "2", model="tiny.keras")],
            cwd=ROOT, env=processes.env({"REDIS_URL": url, **env["model"]}),
            capture_output=True, text=True, timeout=300)
        assert reloaded.returncode == 0, reloaded.stderr
        answer = post_image(web.url, images[1], "image.png")
        assert answer.status_code == 200 and answer.headers["X-Model-Version"] == "2"
    finally:
        processes.stop_all()

    denied = admin.execute_command("ACL", "LOG")
    assert denied == [], f"Redis denied the service: {denied}"


def test_each_user_can_do_only_its_part(compose_redis):
    port, admin = compose_redis["port"], compose_redis["admin"]
    keys = Keys(QUEUE)
    admin.rpush(QUEUE, "job-1:10")
    admin.set(keys.job("job-1"), "a queued image")
    admin.rpush(keys.wake, "1765000000")

    def client(user):
        return redis.Redis(port=port, username=user,
                           password=PASSWORDS[f"REDIS_{user.upper()}_PASSWORD"],
                           decode_responses=True)

    web, keda, anonymous = client("web"), client("keda"), redis.Redis(port=port)
    for forbidden in (lambda: web.hset(keys.model, "model", "/tmp/evil.h5"),  # propose a model
                      lambda: web.hset(keys.heartbeat("forged"), "warm", "1"),  # forge a worker
                      lambda: web.lrange(keys.processing("w"), 0, -1),  # read a worker's claims
                      lambda: web.flushall(),
                      lambda: keda.get(keys.job("job-1")),  # KEDA reads lengths only
                      lambda: keda.rpush(QUEUE, "x"),
                      lambda: anonymous.llen(QUEUE)):  # without a password: PING only
        with pytest.raises(redis.exceptions.NoPermissionError):
            forbidden()
    assert anonymous.ping()
    assert keda.eval(KEDA_LENGTH, 1, QUEUE) == 1 and keda.eval(KEDA_LENGTH, 1, keys.wake) == 1
    assert web.llen(QUEUE) == 1 and web.get(keys.job("job-1")) == "a queued image"


@pytest.mark.parametrize("role", ["web", "model"])
def test_a_wrong_password_stops_the_process_at_start_saying_so(compose_redis, tmp_path, role):
    env = {**compose_redis["env"][role], "REDIS_PASSWORD": "not-the-password"}
    processes = Processes(f"redis://127.0.0.1:{compose_redis['port']}/0", tmp_path, QUEUE)
    process = processes.spawn(["run_keras_server.py", role], processes.env(env), role)
    try:
        assert process.wait(60) != 0
    finally:
        stop(process)
    log = process.log_path.read_text()
    assert f"Redis refuses user '{role}'" in log and "REDIS_PASSWORD" in log, log
