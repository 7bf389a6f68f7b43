"""`python -m exo_lab.server` and `python -m exo_lab.worker` as two processes on this machine,
joined with the cluster secret (manual discovery, the coordinator's address), serving the OpenAI
API; and both refusing, at once, a config that lists other PCs but has no secret."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest
from ports import free_port
from procs import read_until, running, stop

@pytest.mark.parametrize("service", ["exo_lab.server", "exo_lab.worker"])
def test_other_pcs_and_no_secret_are_refused_at_once(two_process_config, tmp_path, service):
    """Without a secret everything binds loopback only, so the PCs listed could never join:
    both services say so in one line with the fix, before starting anything."""
    two_process_config.write_text(two_process_config.read_text().replace("  secret_file: secret.txt\n", ""))
    env = {**os.environ, "EXO_LAB_HOME": str(tmp_path / "home")}
    env.pop("EXO_LAB_SECRET", None)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", service, "--config", str(two_process_config)], capture_output=True,
                          text=True, env=env, timeout=60)
    assert done.returncode == 2 and time.monotonic() - started < 20
    assert done.stdout == "" and len(done.stderr.splitlines()) == 1, done.stderr
    assert "worker-a.test" in done.stderr and "exo-lab secret secret.txt" in done.stderr
    assert "secret_file: secret.txt" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "home").exists()       # nothing was started


def test_server_and_worker_processes_serve_a_split_model(two_process_config, tmp_path):
    env = {**os.environ, "EXO_LAB_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"}
    api_port = int(two_process_config.read_text().split("port: ")[-1])
    server = subprocess.Popen([sys.executable, "-m", "exo_lab.server", "--config", str(two_process_config),
                               "--model", "demo"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env)
    worker = subprocess.Popen([sys.executable, "-m", "exo_lab.worker", "--config", str(two_process_config),
                               "--device", "worker-a.test"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env)
    children = []
    try:
        read_until(worker, "joining", 60)
        lines = read_until(server, "serving", 120)
        assert any("worker-a.test#0" in line for line in lines) and any("worker-a.test#1" in line for line in lines)
        children = psutil.Process(worker.pid).children(recursive=True) + psutil.Process(server.pid).children(recursive=True)
        base = f"http://127.0.0.1:{api_port}"
        with urllib.request.urlopen(base + "/v1/models", timeout=10) as response:
            assert json.load(response)["data"][0]["id"] == "demo"
        # greedy: sampled at the API's default temperature 1, the random demo model's first token is
        # an end-of-sequence token 0.9% of the time, and the answer then has no token at all
        body = json.dumps({"model": "demo", "messages": [{"role": "user", "content": "Hi"}],
                           "max_tokens": 5, "temperature": 0}).encode()
        request = urllib.request.Request(base + "/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            reply = json.load(response)
        assert reply["choices"][0]["finish_reason"] in ("stop", "length")
        assert reply["usage"]["completion_tokens"] >= 1
    finally:
        stop(server)
        stop(worker)
    assert server.returncode == 0
    # each engine's ipyparallel nanny exits a few seconds after its engine
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(running(p) for p in children):
        time.sleep(0.25)
    left = [p.pid for p in children if running(p)]
    assert not left, f"processes left running: {left}"


def test_exo_lab_serve_with_local_engines_and_an_api_key(tmp_path):
    from openai import APIStatusError, AuthenticationError, OpenAI

    port = free_port()
    env = {**os.environ, "EXO_LAB_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen([sys.executable, "-m", "exo_lab.cli", "serve", "--engines", "2", "--min-stages", "2",
                               "--model", "demo", "--port", str(port), "--api-key", "sesame"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = read_until(server, "serving", 120)
        assert any("engine-0" in line for line in lines) and any("engine-1" in line for line in lines)
        base = f"http://127.0.0.1:{port}/v1"
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=base, api_key="wrong").models.list()
        client = OpenAI(base_url=base, api_key="sesame")
        assert [m.id for m in client.models.list().data] == ["demo"]
        reply = client.completions.create(model="demo", prompt="Hello", max_tokens=4, temperature=0)
        assert reply.usage.completion_tokens >= 1
        assert len(client.completions.create(model="demo", prompt="Hello", max_tokens=4, n=2).choices) == 2
        with pytest.raises(APIStatusError) as caught:     # past the load's max_batch (8)
            client.completions.create(model="demo", prompt="Hello", max_tokens=4, n=9)
        assert caught.value.status_code == 400 and "n" in str(caught.value)
    finally:
        stop(server)
    assert server.returncode == 0
