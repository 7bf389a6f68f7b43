"""Helpers for tests that start exo-lab's own processes (server, worker, flooders): read their
output up to a line, stop them, tell whether one still runs. A helper module, not a test
module: test modules import from here, never from each other."""
from __future__ import annotations

import selectors
import signal
import subprocess
import threading
import time

import psutil


def read_until(process, text: str, timeout_s: float, lines: list | None = None) -> list[str]:
    """Lines of a process's output (text mode, one stdout pipe) up to one containing ``text``;
    AssertionError with the output so far when it exits first or ``timeout_s`` passes.
    ``lines``: a list to append to (kept by the caller across calls)."""
    lines = [] if lines is None else lines
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if selector.select(timeout=0.5):
                line = process.stdout.readline()
                if line:
                    lines.append(line)
                    if text in line:
                        return lines
                    continue
            if process.poll() is not None:
                break
    finally:
        selector.close()
    raise AssertionError(f"never saw {text!r}; output:\n{''.join(lines)}")


def drain(process, lines: list) -> None:
    """Keep reading a process's output into ``lines`` from a thread of its own, so that a chatty
    process never blocks on a full pipe once the test stops reading it."""
    def read() -> None:
        for line in process.stdout:
            lines.append(line)

    threading.Thread(target=read, name="drain", daemon=True).start()


def stop(process: subprocess.Popen, timeout_s: float = 30) -> None:
    """SIGTERM, then SIGKILL after ``timeout_s``; reaps it."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def running(process: psutil.Process) -> bool:
    """Whether a process still runs (a zombie does not)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
