"""CPU priority of a loading model process and every thread it starts."""
import logging
import os
import signal
import threading

log = logging.getLogger("keras_server.rollout")


def lower_priority(niceness):
    """Put this process (its threads, and those to come, which inherit it) at the lowest CPU
    priority, SCHED_IDLE, if it can return to `niceness` afterwards; True if it did.

    Under SCHED_IDLE a thread yields its CPU the moment a serving thread wakes up, where at nice
    19 it keeps it for a time slice, on every one of a forward pass's many thread wake-ups.
    Returning needs CAP_SYS_NICE or an RLIMIT_NICE of at least 20 - niceness: a probe thread tries
    both steps first, so that a process never stays at the lowest priority for good.
    """
    if not can_leave_idle(niceness):
        log.warning("this version loads at normal CPU priority and may slow the requests being "
                    "served meanwhile: returning from the lowest priority needs CAP_SYS_NICE or an "
                    "RLIMIT_NICE of %d (ulimit -e; compose: ulimits nice)", 20 - niceness)
        return False
    idle_every_thread()
    return True


def can_leave_idle(niceness):
    """Whether a process can go to SCHED_IDLE and return to `niceness`: a probe thread tries."""
    returned = []

    def probe():
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
            os.setpriority(os.PRIO_PROCESS, 0, niceness)
            returned.append(True)
        except PermissionError:
            pass
    thread = threading.Thread(target=probe)
    thread.start()
    thread.join()
    return bool(returned)


def idle_every_thread():
    """SCHED_IDLE for every thread of this process (e.g. a BLAS pool started at import) and,
    by inheritance, for those it starts later."""
    for_every_thread(lambda thread_id: os.sched_setscheduler(thread_id, os.SCHED_IDLE,
                                                             os.sched_param(0)))


def restore_priority(niceness, pid="self"):
    """Return every thread of a process (this one by default), the runtime's thread pools too, to
    normal CPU scheduling at the supervisor's niceness."""
    def restore(thread_id):
        os.sched_setscheduler(thread_id, os.SCHED_OTHER, os.sched_param(0))
        os.setpriority(os.PRIO_PROCESS, thread_id, niceness)
    for_every_thread(restore, pid)


def let_go_on(pid, normal_priority=False):
    """Let a process held back (stopped, or at the lowest priority) go on: first return it to this
    process's niceness if `normal_priority`, then SIGCONT. ProcessLookupError once it has ended;
    PermissionError where returning it is not allowed (it could return itself, which is all the
    kernel asks)."""
    if normal_priority:
        restore_priority(os.getpriority(os.PRIO_PROCESS, 0), pid)
    os.kill(pid, signal.SIGCONT)


def for_every_thread(change, pid="self"):
    try:
        thread_ids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return  # the process has ended
    for thread_id in thread_ids:
        try:
            change(int(thread_id))
        except ProcessLookupError:
            pass  # a thread that has ended meanwhile
