"""The `reload` command: propose a model version, then wait until every worker serves it or one
refuses."""
import json
import logging
import os
import signal
import sys
import time

import settings
from serving.model.catalog import APPLICATIONS, ModelLoadError, load_labels
from serving.rollout.spec import check_files, files_named, spec_text
from serving.text import header_value_problem
from serving.wire import jobqueue, records
from serving.wire.connection import REDIS_ERRORS, connect_redis
from serving.wire.keys import Keys

log = logging.getLogger("keras_server.rollout")


class RolloutFailed(Exception):
    """A rollout that was refused, timed out or superseded; the message says which and why."""

    status = 1


class SpecRefused(RolloutFailed):
    """A model spec refused by `reload` itself, before any worker saw it."""

    status = 2


def run_reload(args):
    """The `reload` command: check the spec here (check_model), then switch every worker to it
    (or, with --rollback, to the accepted version before the current one); 0 once all serve it."""
    # SIGTERM as an exception, as Ctrl-C is: a proposal made by now is taken back (roll_out).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    # Ctrl-C too where a shell started this in the background: it hands SIGINT ignored, and
    # Python would keep it so (as serving.processes.run_all does).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    store, keys = connect_redis(), Keys(settings.IMAGE_QUEUE)
    try:
        if args.rollback:
            spec = previous_model(store, keys)
        elif header_value_problem(args.version):
            raise SpecRefused(f"--version {args.version!r} {header_value_problem(args.version)}: "
                              "every answer carries it in a header")
        else:
            spec = {"model": args.model, "weights": args.weights, "labels": args.labels,
                    "preprocess": args.preprocess, "version": args.version,
                    "precision": args.precision, "calibration_images": args.calibration_images}
        check_model(spec)
        roll_out(store, keys, spec, args.timeout_s, rollback=args.rollback)
    except RolloutFailed as exc:
        log.error("reload failed: %s", exc)
        return exc.status
    log.info("every worker on %s serves version %s", settings.IMAGE_QUEUE, spec["version"])
    return 0


def previous_model(store, keys):
    history = records.accepted_models(store, keys)
    if len(history) < 2:
        raise SpecRefused("no earlier accepted version to roll back to")
    return history[-2]


def check_model(spec):
    """Refuse a spec here, before any worker sees it, by what can be told without loading it: its
    files are under MODELS_DIR, exist and can be read, and its labels read. Whether the model
    loads, its outputs match the labels and its input the queue's is checked where it is loaded
    anyway, by the workers' held candidate processes, whose refusal comes back with the reason.
    So `reload` never loads a model, nor imports a deep learning framework, on a serving
    machine."""
    try:
        check_files(spec)
        if spec["model"] not in APPLICATIONS and not os.path.isfile(spec["model"]):
            raise ModelLoadError(f"--model {spec['model']!r} is neither one of "
                                 f"{', '.join(APPLICATIONS)} nor an existing .keras/.h5 file")
        for path in files_named(spec):
            if not os.access(path, os.R_OK):
                raise ModelLoadError(f"{path} cannot be read")
        if spec.get("calibration_images") and not os.path.isdir(spec["calibration_images"]):
            raise ModelLoadError(f"--calibration-images {spec['calibration_images']} is not a "
                                 "folder")
        load_labels(spec["labels"])
    except ModelLoadError as exc:
        raise SpecRefused(f"version {spec['version']} cannot serve: {exc}") from exc


def roll_out(store, keys, spec, timeout_s, rollback=False):
    """Propose `spec`, wait until every live worker serves it, and accept it; on a refusal or a
    timeout take it back and raise RolloutFailed."""
    # With no accepted version (Redis lost its history), a failure returns to the one every live
    # worker serves; without it, the workers that had switched would stay switched.
    served = {beat.get("spec") for beat in jobqueue.live_workers(store, keys)}
    if len(served) == 1 and None not in served:
        records.accept_first_model(store, keys, json.loads(served.pop()))
    # Ctrl-C or SIGTERM waits until the proposal is made and can be taken back: arriving while
    # Redis answered the proposal, it would leave it proposed.
    interrupts = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, interrupts)
    try:
        rollout = records.propose_model(store, keys, spec)
    except BaseException:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, interrupts)
        raise
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, interrupts)
        log.info("rollout %d: asked every worker on %s to serve version %s", rollout,
                 settings.IMAGE_QUEUE, spec["version"])
        failure = wait_for_rollout(store, keys, rollout, spec, time.monotonic() + timeout_s)
    except BaseException:  # Ctrl-C, SIGTERM, Redis gone: no proposal is left open
        try:
            take_back(store, keys, rollout)
        except REDIS_ERRORS as exc:
            log.error("rollout %d stays proposed: %s", rollout, exc)
        raise
    if failure is None:
        if rollback:
            records.forget_newest_model(store, keys)
        else:
            records.accept_model(store, keys, spec)
        return
    if "superseded" not in failure:
        take_back(store, keys, rollout, time.monotonic() + timeout_s)
    raise RolloutFailed(f"version {spec['version']}: {failure}")


def take_back(store, keys, rollout, deadline=None):
    """Return the workers to the last accepted version after a failed rollout; wait for them
    until `deadline` (None: an interrupted reload does not wait)."""
    history = records.accepted_models(store, keys)
    previous = history[-1] if history else None
    restored = records.restore_model(store, keys, rollout, previous)
    if restored:
        log.info("rollout %d: workers return to version %s", restored, previous["version"])
        if deadline is None:
            return
        failure = wait_for_rollout(store, keys, restored, previous, deadline, need_one=False)
        if failure:
            log.error("returning to version %s: %s", previous["version"], failure)


def wait_for_rollout(store, keys, rollout, spec, deadline, need_one=True):
    """None once every live worker, and at least one if `need_one`, serves `spec`; else why not
    (refused, timed out, superseded). A version no worker has loaded is never accepted: with none
    live, this waits for one to come."""
    target = spec_text(spec)
    while True:
        if records.wanted_model(store, keys)[1] != rollout:
            return "superseded by a later reload"
        refused = records.refusals(store, keys, rollout)
        if refused:
            return "refused by " + "; ".join(f"worker {worker}: {reason}"
                                             for worker, reason in sorted(refused.items()))
        beats = jobqueue.live_workers(store, keys)
        pending = workers_not_serving(beats, target)
        if not pending and (beats or not need_one):
            return None
        if time.monotonic() > deadline:
            return (f"timed out; not yet served by {', '.join(pending)}" if pending else
                    f"timed out; no model worker is live on {settings.IMAGE_QUEUE}")
        time.sleep(0.2)


def workers_not_serving(beats, target):
    """The supervisors whose every live process does not yet serve the spec `target`."""
    pending = set()
    for beat in beats:
        if beat.get("spec") != target or beat.get("warm") != "1":
            pending.add(beat.get("supervisor", beat.get("id")))
    return sorted(pending)
