"""Where the CPU went during a load: the service's processes by role (model, web, Redis) and the
load generator's, from psutil's CPU times, between two snapshots."""
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import psutil

CPU_ROLES = ("model", "web", "redis", "load")  # "load": the load generator


def process_role(name, cmdline):
    """The service's part a process plays, from its name and command line (None: another)."""
    if name.startswith("redis-server"):
        return "redis"
    args = cmdline[1:] if cmdline and Path(cmdline[0]).name.startswith("python") else cmdline
    program, rest = (args[1:2], args[2:]) if args[:1] == ["-m"] else (args[:1], args[1:])
    program = Path(program[0]).name if program else ""
    if program == "gunicorn":
        return "web"
    if program == "run_keras_server.py" and rest[:1] in (["model"], ["model-forks"]):
        return "model"
    return None


def service_processes(root_pid):
    """(process, role) of the service started as root_pid and of every process under it."""
    try:
        root = psutil.Process(root_pid)
        family = [root, *root.children(recursive=True)]
    except psutil.Error:  # the service has ended
        return
    for process in family:
        try:
            yield process, process_role(process.name(), process.cmdline())
        except psutil.Error:  # it ended meanwhile
            continue


def cpu_snapshot(root_pid, load_pids=()):
    """The machine's busy, idle and stolen CPU seconds so far, and the CPU seconds of each process
    of the service started as root_pid and of the load generator's (load_pids): their role and
    user + system time, by pid. (Stolen: time a virtual machine's host gave to others.)"""
    machine = psutil.cpu_times()
    processes = {}
    family = [*service_processes(root_pid), *load_processes(load_pids)]
    for process, role in family:
        try:
            times = process.cpu_times()
        except psutil.Error:  # it ended meanwhile
            continue
        processes[process.pid] = (role, times.user + times.system)
    idle = machine.idle + getattr(machine, "iowait", 0.0)
    stolen = getattr(machine, "steal", 0.0)
    busy = sum(machine) - idle - getattr(machine, "guest", 0.0) - getattr(
        machine, "guest_nice", 0.0) - stolen
    return {"at": time.monotonic(), "busy": busy, "idle": idle, "stolen": stolen,
            "processes": processes}


def load_processes(pids):
    """(process, "load") of the load generator's processes still running."""
    for pid in list(pids):
        try:
            yield psutil.Process(pid), "load"
        except psutil.Error:
            continue


def cores_between(first, last):
    """Cores (CPU seconds per second) used between two snapshots by the service's model, web and
    Redis processes, by everything else ("other": the load generator, this script, the launcher,
    the kernel's own work) and left idle. A process that started in between counts from zero."""
    seconds = last["at"] - first["at"]
    used = dict.fromkeys(CPU_ROLES, 0.0)
    for pid, (role, cpu_s) in last["processes"].items():
        if role:
            used[role] += cpu_s - first["processes"].get(pid, (role, 0.0))[1]
    busy = last["busy"] - first["busy"]
    cores = {role: used[role] / seconds for role in CPU_ROLES}
    cores["other"] = max(0.0, busy - sum(used.values())) / seconds
    cores["idle"] = (last["idle"] - first["idle"]) / seconds
    cores["stolen"] = (last["stolen"] - first["stolen"]) / seconds
    return cores


@contextmanager
def cpu_split(root_pid, skip_s, until_s=None, load_pids=()):
    """Yields a dict that, when the block ends, holds cores_between() from skip_s into the block
    (the load's warm-up left out) to until_s or its end; empty if the block ended sooner or the
    span is empty (until_s == skip_s, e.g. --overload-seconds no longer than (d)). load_pids: the
    load generator's processes, a list that the load fills as it starts."""
    split, snapshots = {}, {}
    timers = [threading.Timer(at, lambda at=at: snapshots.update(
        {at: cpu_snapshot(root_pid, load_pids)})) for at in (skip_s, until_s) if at is not None]
    for timer in timers:
        timer.start()
    try:
        yield split
    finally:
        for timer in timers:
            timer.cancel()
            timer.join()
    first = snapshots.get(skip_s)
    last = cpu_snapshot(root_pid, load_pids) if first and until_s is None else snapshots.get(
        until_s)
    if first and last and last["at"] > first["at"]:
        split.update(cores_between(first, last))
