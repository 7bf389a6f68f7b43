"""SIGTERM ends `python -m exo_lab.server` and `python -m exo_lab.worker` within 3 s, each with
every process it started: the ipyparallel controller and its schedulers, the engines, and each
engine's nanny (which used to outlive its engine by ~3 s). Before issue 22 the server took 3-4 s
(ipyparallel stopped the engines one after another, each engine spent 1-2 s tearing down) and the
nannies 5-6 s.

The coordinator PC computes too. The worker goes first, while a stream is open and the
coordinator still runs (its nannies then report their engines' exit, and the stream goes on on the
coordinator's own engine); then the coordinator. The seconds are printed (run with -s).
"""
from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
from procs import read_until, running

SIGTERM_BUDGET_S = 3.0


def sigterm_and_time(process: subprocess.Popen) -> tuple[float, float, list]:
    """SIGTERM ``process``; returns (seconds until it exited, seconds until it and every process
    it had started were gone, those still running after the budget)."""
    children = psutil.Process(process.pid).children(recursive=True)
    assert children, "nothing was started"
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    exited = None
    while time.monotonic() - started < SIGTERM_BUDGET_S + 5:
        if exited is None and process.poll() is not None:
            exited = time.monotonic() - started
        if exited is not None and not any(running(child) for child in children):
            break
        time.sleep(0.02)
    left = [(child.pid, " ".join(child.cmdline()[1:4])) for child in children if running(child)]
    for child in children:
        if running(child):
            child.kill()
    return exited, time.monotonic() - started, left


def open_stream(port: int) -> threading.Thread:
    """A long streamed chat, read on a thread until the server ends it."""
    body = json.dumps({"model": "demo", "messages": [{"role": "user", "content": "Tell me a long story."}],
                       "max_tokens": 1000, "stream": True})
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    answer = connection.getresponse()
    assert answer.status == 200
    answer.readline()                    # the first event: generation is under way

    def read() -> None:
        try:
            answer.read()
        except (OSError, http.client.HTTPException):
            pass

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return reader


def test_worker_and_server_exit_on_sigterm_with_every_child_within_3_s(two_process_config, tmp_path):
    # the coordinator PC computes too: its own engine (and nanny) must end with it
    two_process_config.write_text(two_process_config.read_text().replace(
        "roles: [coordinator]\n", "roles: [coordinator, compute]\n    engines: 1\n    max_cores: 1\n"))
    env = {**os.environ, "EXO_LAB_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"}
    api_port = int(two_process_config.read_text().split("port: ")[-1])
    server = subprocess.Popen([sys.executable, "-m", "exo_lab.server", "--config", str(two_process_config), "--model",
                               "demo"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    worker = subprocess.Popen([sys.executable, "-m", "exo_lab.worker", "--config", str(two_process_config), "--device",
                               "worker-a.test"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        read_until(worker, "joining", 60)
        read_until(server, "serving", 120)
        stream = open_stream(api_port)
        worker_exit, worker_all, worker_left = sigterm_and_time(worker)
        server_exit, server_all, server_left = sigterm_and_time(server)
        stream.join(10)
    finally:
        for process in (server, worker):
            if process.poll() is None:
                process.kill()
    print(f"\nSIGTERM: worker exited in {worker_exit:.2f} s, with its engines and nannies in {worker_all:.2f} s; "
          f"server exited in {server_exit:.2f} s, with its controller, engine and nanny in {server_all:.2f} s")
    assert not worker_left and not server_left, (worker_left, server_left)
    assert worker_all <= SIGTERM_BUDGET_S and server_all <= SIGTERM_BUDGET_S
    assert server.returncode == 0 and worker.returncode == 0
    assert not stream.is_alive(), "the open stream was not ended"
    for name, process in (("server", server), ("worker", worker)):
        output = process.stdout.read()
        assert "Traceback" not in output, f"{name} output:\n{output[-3000:]}"
