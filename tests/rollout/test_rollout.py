"""Rollout parts that need no service: CPU priority while loading, and how reload reads the
heartbeats. (Reloads end to end are in test_model_lifecycle.py.)"""
import os
import signal
import subprocess
import sys
import textwrap

import psutil
import pytest

from conftest import ROOT, Clock, wait_until
from serving.rollout.loader_watch import LOADER_MIN_SHARE, LOADER_WINDOW_S, LoaderWatch
from serving.rollout.spec import spec_text
from serving.rollout.reload import workers_not_serving


def test_a_loading_process_and_the_threads_it_starts_idle_then_all_return_to_normal():
    script = textwrap.dedent("""
        import os, threading
        from serving.rollout.priority import lower_priority, restore_priority

        def policies():
            return {os.sched_getscheduler(int(t)) for t in os.listdir("/proc/self/task")}

        assert lower_priority(0)
        pool = [threading.Thread(target=threading.Event().wait, daemon=True) for _ in range(3)]
        for thread in pool:  # like a runtime's thread pool, started while loading
            thread.start()
        assert policies() == {os.SCHED_IDLE}, policies()
        restore_priority(0)
        assert policies() == {os.SCHED_OTHER}, policies()
        assert {os.getpriority(os.PRIO_PROCESS, int(t))
                for t in os.listdir("/proc/self/task")} == {0}
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr


def test_a_starved_process_is_returned_to_normal_priority_and_let_go_on():
    """let_go_on at normal priority (a fork server that has not answered in LOADER_WINDOW_S, a
    loader starved twice): from SCHED_IDLE and stopped, to normal scheduling and running."""
    from serving.rollout.priority import can_leave_idle, let_go_on

    if not can_leave_idle(os.getpriority(os.PRIO_PROCESS, 0)):
        pytest.skip("this process could not return a process from the lowest priority")
    sleeper = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import os, sys, time
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        print("idle", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert sleeper.stdout.readline().strip() == "idle"
        os.kill(sleeper.pid, signal.SIGSTOP)
        wait_until(lambda: psutil.Process(sleeper.pid).status() == psutil.STATUS_STOPPED,
                   what="the process to stop")
        let_go_on(sleeper.pid, normal_priority=True)

        assert os.sched_getscheduler(sleeper.pid) == os.SCHED_OTHER
        wait_until(lambda: psutil.Process(sleeper.pid).status() != psutil.STATUS_STOPPED,
                   what="the process to go on")
    finally:
        sleeper.kill()
        sleeper.wait()


def test_reload_waits_for_every_process_of_every_worker():
    new, old = spec_text({"model": "m", "version": "2"}), spec_text({"version": "1", "model": "m"})
    beats = [{"supervisor": "a", "spec": new, "warm": "1"},
             {"supervisor": "b", "spec": new, "warm": "1"},
             {"supervisor": "b", "spec": old, "warm": "1"},  # b's old process has not left yet
             {"supervisor": "c", "spec": new, "warm": "0"}]  # c's is not warm
    assert workers_not_serving(beats, new) == ["b", "c"]
    assert workers_not_serving(beats[:2], new) == []


def test_a_loader_starved_of_cpu_is_unheld_then_returned_to_normal_priority_and_then_left():
    """LoaderWatch at its defaults (LOADER_WINDOW_S, LOADER_MIN_SHARE), on a real process that
    uses no CPU: one step per window, each once."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        clock = Clock()
        watch = LoaderWatch(sleeper.pid, clock=clock)
        assert watch.step() is None  # the window is not over
        clock.now += LOADER_WINDOW_S
        action, share, seconds = watch.step()
        assert action == "unhold" and share < LOADER_MIN_SHARE and seconds == LOADER_WINDOW_S
        assert watch.step() is None
        clock.now += LOADER_WINDOW_S
        assert watch.step()[0] == "normal priority"
        clock.now += LOADER_WINDOW_S
        assert watch.step() is None  # nothing left to give it
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_loader_that_gets_its_share_of_cpu_is_left_held():
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        clock = Clock()
        watch = LoaderWatch(spinner.pid, clock=clock)
        process = psutil.Process(spinner.pid)
        # Its CPU time reaches the share of one window, however busy the machine is.
        wait_until(lambda: sum(process.cpu_times()[:2]) >= LOADER_MIN_SHARE * LOADER_WINDOW_S,
                   timeout=60, what="the spinner's CPU time")
        clock.now += LOADER_WINDOW_S
        assert watch.step() is None and watch.held
    finally:
        spinner.kill()
        spinner.wait()
