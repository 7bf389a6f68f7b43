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

**Exit.** When the module ends (an engine or controller told to stop with SIGTERM), this process
ends at once (:func:`exit_now`): its children, then ``os._exit``. Neither atexit functions nor
the interpreter's teardown run: they took an engine 1-2 s (IPython clearing its namespace and
closing its history, torch) and save nothing an engine or controller needs. An engine's nanny
first gets ``NANNY_GRACE_S`` to tell a controller that is still up that its engine left (left to
itself, it waits up to 3 s for one that is gone).
"""
from __future__ import annotations

import logging
import os
import runpy
import subprocess
import sys
import threading
import time
import traceback

from . import envvars

WATCH_PID_ENV = envvars.WATCH_PID
WATCH_START_ENV = envvars.WATCH_START
POLL_S = 0.5
TERMINATE_GRACE_S = 2.0
NANNY_GRACE_S = 0.3         # an engine's nanny tells the controller the engine left (fast when it is up)
EXIT_GRACE_S = 0.5          # children left at exit: SIGTERM, then SIGKILL after this long


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


def run_module(module: str) -> int:
    """Run ``module`` as ``__main__`` in this process; its exit status."""
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        return _exit_status(exc.code)
    except BaseException as exc:
        if not _stopped_by_signal(module, exc):
            traceback.print_exc()
            return 1
    return 0


def _exit_status(code) -> int:
    if code is None or isinstance(code, int):
        return code or 0
    print(code, file=sys.stderr)
    return 1


def _stopped_by_signal(module: str, exc: BaseException) -> bool:
    # An ipyparallel engine stops on SIGTERM by stopping the tornado loop that run_sync waits on:
    # tornado then raises this, which is the engine's normal way out, not a failure to report.
    return (module == "ipyparallel.engine" and isinstance(exc, RuntimeError)
            and "Event loop stopped before Future completed" in str(exc))


def exit_now(status: int) -> None:
    """End this process: its children (an engine's nanny gets NANNY_GRACE_S first), then
    ``os._exit(status)`` after flushing logs and output; no atexit functions, no teardown."""
    import psutil

    try:
        _release_nanny()
        end_processes(psutil.Process().children(recursive=True), EXIT_GRACE_S)
        logging.shutdown()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:   # a closed or broken stream: nothing left to say
                pass
        os._exit(status)


def _release_nanny() -> None:
    """Close the pipe an ipyparallel engine's nanny watches: it takes that as its engine's exit,
    tells the controller (when that is still up) and ends; wait NANNY_GRACE_S for that."""
    app = sys.modules.get("ipyparallel.engine.app")
    if app is None or not app.IPEngine.initialized():
        return
    nanny = getattr(app.IPEngine.instance(), "nanny_pipe", None)
    if not isinstance(nanny, subprocess.Popen):
        return
    try:
        nanny.stdout.close()
        nanny.wait(NANNY_GRACE_S)
    except (OSError, subprocess.TimeoutExpired):
        pass   # end_processes ends it


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: python -m exo_lab.lifeline MODULE [ARGS...]")
    module = sys.argv[1]
    start_watch()
    from .limits import bound_process

    bound_process()      # descriptor limit, short ZeroMQ handshakes (engines, the controller)
    sys.argv = [module, *sys.argv[2:]]
    exit_now(run_module(module))


if __name__ == "__main__":
    main()
