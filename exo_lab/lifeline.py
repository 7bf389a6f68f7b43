"""A parent-death watch: processes exo-lab starts end when the process that started them dies.

The coordinator starts an ipyparallel controller (which forks its schedulers) and engines
(each of which starts a nanny). When the coordinator ends normally it stops them all; when it
is killed (SIGKILL, the OOM killer) nothing would, and they would hold memory, ports and open
data-plane inboxes forever. So each is started through this module::

    python -m exo_lab.lifeline ipyparallel.engine [ipengine arguments]

with ``$EXO_LAB_WATCH_PID`` (and ``$EXO_LAB_WATCH_START``, the watched process's start time,
so a reused pid is not mistaken for it) in its environment: :func:`watch_environment`. A
daemon thread checks every ``POLL_S`` whether that process still exists; when it is gone it
ends this process's own descendants (the controller's schedulers, an engine's nanny), then
this process. The module then runs the given module as ``__main__``, in this same process.

Polling rather than Linux's PR_SET_PDEATHSIG: that signal fires when the parent *thread* that
started the child ends (ipyparallel starts processes from a helper thread), it exists only on
Linux, and it reaches only direct children, not the forked schedulers.
"""
from __future__ import annotations

import os
import runpy
import sys
import threading
import time

WATCH_PID_ENV = "EXO_LAB_WATCH_PID"
WATCH_START_ENV = "EXO_LAB_WATCH_START"
POLL_S = 0.5
TERMINATE_GRACE_S = 2.0


def command(module: str) -> list[str]:
    """The argv that runs ``python -m module`` under the watch."""
    return [sys.executable, "-m", "exo_lab.lifeline", module]


def watch_environment(pid: int | None = None) -> dict[str, str]:
    """Environment entries that make a process started with :func:`command` end when ``pid``
    (default: this process) ends."""
    import psutil

    pid = os.getpid() if pid is None else pid
    return {WATCH_PID_ENV: str(pid), WATCH_START_ENV: repr(psutil.Process(pid).create_time())}


def _alive(pid: int, started: float | None) -> bool:
    import psutil

    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE and (
            started is None or abs(process.create_time() - started) < 0.01)
    except psutil.NoSuchProcess:
        return False


def _end_descendants() -> None:
    import psutil

    end_processes(psutil.Process().children(recursive=True), TERMINATE_GRACE_S)


def end_processes(processes, timeout_s: float) -> None:
    """SIGTERM each of ``processes`` (psutil.Process) still alive, then SIGKILL whatever is
    left after ``timeout_s``, and wait up to ``timeout_s`` more for those."""
    import psutil

    for process in processes:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=timeout_s)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=timeout_s)


def _watch(pid: int, started: float | None) -> None:
    while _alive(pid, started):
        time.sleep(POLL_S)
    try:
        _end_descendants()
    finally:
        os._exit(70)   # no cleanup that could hang: whoever would have waited for us is gone


def start_watch() -> bool:
    """Start the watch thread when ``$EXO_LAB_WATCH_PID`` is set (an already dead watched
    process ends this one at once). Returns whether a watch runs."""
    pid = os.environ.get(WATCH_PID_ENV)
    if not pid:
        return False
    start = os.environ.get(WATCH_START_ENV)
    threading.Thread(target=_watch, args=(int(pid), float(start) if start else None),
                     name="exo-lab-lifeline", daemon=True).start()
    return True


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: python -m exo_lab.lifeline MODULE [ARGS...]")
    module = sys.argv[1]
    start_watch()
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
