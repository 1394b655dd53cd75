"""Entry points of the service: the Flask web tier, the model worker, and both at once.

    python run_keras_server.py          # private Redis + one model worker + the web server
    python run_keras_server.py web      # the web tier alone (gunicorn, serving.web.app:create_app)
    python run_keras_server.py model    # one model worker; start several on one queue to scale
    python run_keras_server.py reload --model PATH --version V   # switch workers, no downtime
    python run_keras_server.py reload --rollback                   # back to the version before

A request travels: /predict checks the upload's header, stores it as a job in Redis with its id on
the IMAGE_QUEUE list, and blocks on its result list; a model worker claims up to BATCH_SIZE jobs,
decodes their images into one batch, runs one forward pass for all of them and pushes each result
where its handler is waiting.
"""
import os
import signal
import sys

# `reload` runs beside serving workers: it takes the lowest CPU priority before its imports, and
# each command imports only what it runs. Even at that priority, a process computing beside a
# forward pass slows it through the shared caches (see serving.model.loader_pause).
if __name__ == "__main__" and sys.argv[1:2] == ["reload"]:
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))

import argparse
import logging

import settings
from serving.wire.connection import check_login

HERE = os.path.dirname(os.path.abspath(__file__))


def run_model_worker(args=None):
    """The `model` command: a supervisor that serves the wanted model from a child process and
    rolls out reloads (see serving/rollout/); exits 2 if no model loads."""
    from serving.rollout.supervisor import run_supervisor

    return run_supervisor()


def run_reload_command(args):
    """The `reload` command (see serving.rollout.reload)."""
    from serving.rollout.reload import run_reload

    return run_reload(args)


def run_model_forks(args):
    """The `model-forks` command, started by `model`: forks a process for each model version."""
    from serving.rollout.forks import run_fork_server

    return run_fork_server(args.fd, args.import_idle)


def run_everything(args=None):
    """The default command: private Redis, one model worker and the web tier."""
    from serving.processes import run_all

    return run_all()


def run_web(args=None):
    """The `web` command: this app under gunicorn with serving/web/gunicorn.conf.py (once Redis
    has taken this tier's login, or does not answer yet: the web tier answers 503 until it does)."""
    check_login(patience_s=5)
    os.execv(sys.executable, [sys.executable, "-m", "gunicorn", "--chdir", HERE,
                              "-c", os.path.join(HERE, "serving", "web", "gunicorn.conf.py"),
                              "serving.web.app:create_app()"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("all", help="(default) private Redis if REDIS_URL is unset, one model "
                                    "worker and the web server")
    commands.add_parser("web", help="the web tier under gunicorn")
    commands.add_parser("model", help="one model worker")
    forks = commands.add_parser("model-forks", help="(started by `model`) forks a process for "
                                "each model version")
    forks.add_argument("fd", type=int, help="the socket to the supervisor")
    forks.add_argument("--import-idle", action="store_true",
                       help="import at the lowest CPU priority (a version already serves)")
    reload = commands.add_parser("reload", help="switch every worker to another model version, "
                                 "once checked; exits non-zero, saying why, if any worker refuses")
    reload.add_argument("--model", help="resnet50, mobilenet_v2 or a .keras/.h5 path")
    reload.add_argument("--version", help="version name shown in the answers")
    reload.add_argument("--weights", default=settings.MODEL_WEIGHTS, help="as MODEL_WEIGHTS")
    reload.add_argument("--labels", default=settings.LABELS, help="as LABELS")
    reload.add_argument("--preprocess", default=settings.PREPROCESS, help="as PREPROCESS")
    reload.add_argument("--precision", default=settings.PRECISION,
                        choices=("fp32", "bf16", "fp16", "int8", "auto"), help="as PRECISION")
    reload.add_argument("--calibration-images", default=settings.CALIBRATION_IMAGES,
                        help="as CALIBRATION_IMAGES")
    reload.add_argument("--rollback", action="store_true",
                        help="instead: back to the accepted version before the current one")
    reload.add_argument("--timeout-s", type=float, default=600,
                        help="how long every worker may take to load and warm up, and one to "
                        "come if none is live (600)")
    args = parser.parse_args(argv)
    if args.command == "reload" and not args.rollback and not (args.model and args.version):
        parser.error("reload needs --model and --version, or --rollback")
    logging.basicConfig(level=settings.LOG_LEVEL,
                        format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s")
    run = {"web": run_web, "model": run_model_worker, "reload": run_reload_command,
           "model-forks": run_model_forks}
    return run.get(args.command, run_everything)(args)


if __name__ == "__main__":
    status = main()
    # The command is done: a further Ctrl-C or SIGTERM has nothing left to stop. Python gives its
    # handlers back to the default while it exits, where one would kill the process and belie the
    # exit status.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    sys.exit(status)
