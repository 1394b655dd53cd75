"""The production topology on one machine, without Docker; Ctrl-C or SIGTERM stops all of it.

    python deploy/topology.py --models 2 --webs 3 [--port 8080]

Starts Redis (REDIS_URL if set, else a private redis-server), N model workers
(`run_keras_server.py model`), M web instances (`run_keras_server.py web`, gunicorn) on free
loopback ports named web-1..web-M, and nginx (the system package; `make nginx`) on HOST:PORT in
front of them, balancing round-robin. Every other setting reaches every process through the same
environment variables as settings.py. `--models 0` runs only the front, for workers elsewhere.
"""
import argparse
import logging
import math
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import settings  # noqa: E402
from serving.processes import start_private_redis, stop_processes  # noqa: E402

log = logging.getLogger("keras_server.topology")
NGINX_TEMPLATE = os.path.join(ROOT, "deploy", "nginx.conf")
SERVER = os.path.join(ROOT, "run_keras_server.py")
STARTUP_TIMEOUT_S = 60  # a web instance imports Flask and NumPy; nginx starts at once


def proxy_timeout_s():
    """nginx's proxy timeouts: a little past REQUEST_TIMEOUT_S, so the app's own 504 comes first."""
    return math.ceil(settings.REQUEST_TIMEOUT_S) + 5


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def render_nginx_conf(web_ports, port):
    """deploy/nginx.conf with its ${NAME} placeholders filled in for these web instances."""
    values = {
        "USER": pwd.getpwuid(os.geteuid()).pw_name,
        "HOST": f"[{settings.HOST}]" if ":" in settings.HOST else settings.HOST,  # IPv6
        "PORT": port,
        "UPSTREAM_SERVERS": "\n".join(f"        server 127.0.0.1:{p};" for p in web_ports),
        "MAX_UPLOAD_BYTES": settings.MAX_UPLOAD_BYTES,
        "PROXY_TIMEOUT_S": proxy_timeout_s(),
    }
    with open(NGINX_TEMPLATE, encoding="utf-8") as template:
        return re.sub(r"\$\{(\w+)\}", lambda m: str(values[m.group(1)]), template.read())


def nginx_binary():
    # Debian puts it in /usr/sbin, which is not on every user's PATH.
    for found in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if found and os.path.exists(found):
            return found
    raise RuntimeError("nginx is not installed: `make nginx` installs the system package")


def local_address(host):
    """Where this machine reaches a server bound to `host` (a wildcard means any address)."""
    return {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(host, f"[{host}]" if ":" in host else host)


def spawn(args, env):
    # Each child gets its own session: Ctrl-C in the terminal reaches only this script, which then
    # stops the tiers front to back. Delivered to all at once, gunicorn and nginx would drop the
    # requests in flight (SIGINT is their fast stop).
    return subprocess.Popen(args, cwd=ROOT, env=env, start_new_session=True)


def start_models(count, env):
    processes = []
    for number in range(1, count + 1):
        model_env = dict(env)
        if settings.WORKER_METRICS_PORT:
            # One machine, so one metrics port each: WORKER_METRICS_PORT, the next one, ...
            model_env["WORKER_METRICS_PORT"] = str(settings.WORKER_METRICS_PORT + number - 1)
        processes.append(spawn([sys.executable, SERVER, "model"], model_env))
        log.info("model-%d: pid %d, metrics port %s", number, processes[-1].pid,
                 model_env.get("WORKER_METRICS_PORT", "none"))
    return processes


def start_webs(count, env, prefix):
    """M web instances on free loopback ports; returns their processes and ports."""
    processes, ports = [], []
    for number in range(1, count + 1):
        ports.append(free_port())
        # Each instance adds up its own gunicorn processes' metrics: a shared folder would mix
        # the instances, and each one empties it when it starts.
        metrics_dir = os.path.join(prefix, f"metrics-web-{number}")
        os.mkdir(metrics_dir)
        web_env = dict(env, INSTANCE_NAME=f"web-{number}", HOST="127.0.0.1", PORT=str(ports[-1]),
                       PROMETHEUS_MULTIPROC_DIR=metrics_dir)
        processes.append(spawn([sys.executable, SERVER, "web"], web_env))
        log.info("web-%d: pid %d on http://127.0.0.1:%d (its /metrics)", number,
                 processes[-1].pid, ports[-1])
    return processes, ports


def start_nginx(nginx, prefix, web_ports, port):
    with open(os.path.join(prefix, "nginx.conf"), "w", encoding="utf-8") as conf:
        conf.write(render_nginx_conf(web_ports, port))
    # -e: even the errors nginx meets before reading its config go to stderr, not /var/log/nginx.
    process = spawn([nginx, "-p", prefix + "/", "-c", "nginx.conf", "-e", "stderr"],
                    dict(os.environ))
    log.info("nginx: pid %d on %s:%d, config and access log in %s", process.pid, settings.HOST,
             port, prefix)
    return process


def wait_healthy(process, url, what):
    """Poll url/healthz until it answers 200; fail if the process exits or time runs out."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode} while starting")
        try:
            if requests.get(f"{url}/healthz", timeout=2).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not answer {url}/healthz within {STARTUP_TIMEOUT_S} s")


def supervise(named):
    """Run until signalled, logging any process that exits on its own meanwhile (no restarts)."""
    running = dict(named)
    while True:
        for name, process in list(running.items()):
            if process.poll() is not None:
                log.warning("%s (pid %d) exited with code %d", name, process.pid,
                            process.returncode)
                del running[name]
        time.sleep(0.5)


class Topology:
    """The processes started so far: a failure half-way through starting still stops each one."""

    def __init__(self):
        self.redis, self.models, self.webs, self.nginx = None, [], [], None

    def start(self, models, webs, port, prefix):
        nginx = nginx_binary()  # before anything starts: a missing nginx is the likeliest failure
        env = dict(os.environ)
        if not settings.REDIS_URL:
            self.redis, env["REDIS_URL"] = start_private_redis(prefix)
            log.info("redis: pid %d at %s", self.redis.pid, env["REDIS_URL"])
        self.models = start_models(models, env)
        self.webs, web_ports = start_webs(webs, env, prefix)
        for number, (process, web_port) in enumerate(zip(self.webs, web_ports), 1):
            wait_healthy(process, f"http://127.0.0.1:{web_port}", f"web-{number}")
        self.nginx = start_nginx(nginx, prefix, web_ports, port)
        wait_healthy(self.nginx, f"http://{local_address(settings.HOST)}:{port}", "nginx")
        log.info("serving on http://%s:%d (GET /readyz is 200 once a model worker is warm)",
                 settings.HOST, port)

    def named(self):
        named = {"nginx": self.nginx, "redis": self.redis}
        named.update({f"web-{n}": process for n, process in enumerate(self.webs, 1)})
        named.update({f"model-{n}": process for n, process in enumerate(self.models, 1)})
        return {name: process for name, process in named.items() if process is not None}

    def stop(self):
        """Stop front to back, so that every request accepted on the way out is answered."""
        if self.nginx is not None and self.nginx.poll() is None:
            # SIGQUIT: stop accepting, finish the requests in flight (bounded by proxy timeout).
            self.nginx.send_signal(signal.SIGQUIT)
            try:
                self.nginx.wait(proxy_timeout_s() + 5)
            except subprocess.TimeoutExpired:
                stop_processes([self.nginx])
        # gunicorn's SIGTERM lets in-flight requests finish within its graceful_timeout; the
        # model workers still run meanwhile to answer them.
        stop_processes(self.webs, timeout_s=settings.REQUEST_TIMEOUT_S + 10)
        # A model worker's SIGTERM: no new jobs, answer the batch in hand, deregister, exit.
        stop_processes(self.models)
        if self.redis is not None:
            stop_processes([self.redis])


def run(models, webs, port):
    """Start every part, wait for a signal, then stop every part; the exit status."""
    topology = Topology()
    with tempfile.TemporaryDirectory(prefix="keras-topology-") as prefix:
        try:
            topology.start(models, webs, port, prefix)
            supervise(topology.named())
        except (KeyboardInterrupt, SystemExit):
            log.info("stopping")
            return 0
        except RuntimeError as exc:
            log.error("%s; stopping", exc)
            return 1
        finally:
            # A second Ctrl-C must not cut the orderly stop short and leave processes behind.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            topology.stop()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=1, help="model workers to start (0: none)")
    parser.add_argument("--webs", type=int, default=2, help="web instances behind nginx")
    parser.add_argument("--port", type=int, default=settings.PORT,
                        help="port nginx listens on (default: PORT, %(default)s)")
    args = parser.parse_args(argv)
    if args.models < 0 or args.webs < 1:
        parser.error("--models must be 0 or more and --webs 1 or more")
    logging.basicConfig(level=settings.LOG_LEVEL,
                        format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    return run(args.models, args.webs, args.port)


if __name__ == "__main__":
    sys.exit(main())
