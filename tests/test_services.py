"""`python -m exo_lab.server` and `python -m exo_lab.worker` as two processes on this machine,
joined with the cluster secret (manual discovery, the coordinator's address), serving the OpenAI
API; and both refusing, at once, a config that lists other PCs but has no secret."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest
from ports import free_port, free_port_range

CONFIG = """\
cluster_name: services_test
devices:
  - hostname: coordinator.test
    roles: [coordinator]
    address: 127.0.0.1
  - hostname: worker-a.test
    roles: [compute]
    max_memory: 4GB
    max_cores: 1
    engines: 2
network:
  discovery: manual
  port_range: {first_port}-{last_port}
  secret_file: secret.txt
api:
  port: {api_port}
"""


def wait_for_line(process, text: str, timeout_s: float) -> list[str]:
    lines = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if line:
            lines.append(line)
            if text in line:
                return lines
        elif process.poll() is not None:
            break
    raise AssertionError(f"never saw {text!r}; output:\n{''.join(lines)}")


def stop(process) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def config_file(tmp_path):
    from exo_lab.security import new_secret, write_secret_file

    first = free_port_range()
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG.format(first_port=first, last_port=first + 99, api_port=free_port()))
    write_secret_file(tmp_path / "secret.txt", new_secret())
    return path


@pytest.mark.parametrize("service", ["exo_lab.server", "exo_lab.worker"])
def test_other_pcs_and_no_secret_are_refused_at_once(config_file, tmp_path, service):
    """Without a secret everything binds loopback only, so the PCs listed could never join:
    both services say so in one line with the fix, before starting anything."""
    config_file.write_text(config_file.read_text().replace("  secret_file: secret.txt\n", ""))
    env = {**os.environ, "EXO_LAB_HOME": str(tmp_path / "home")}
    env.pop("EXO_LAB_SECRET", None)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", service, "--config", str(config_file)], capture_output=True,
                          text=True, env=env, timeout=60)
    assert done.returncode == 2 and time.monotonic() - started < 20
    assert done.stdout == "" and len(done.stderr.splitlines()) == 1, done.stderr
    assert "worker-a.test" in done.stderr and "exo-lab secret secret.txt" in done.stderr
    assert "secret_file: secret.txt" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "home").exists()       # nothing was started


def test_server_and_worker_processes_serve_a_split_model(config_file, tmp_path):
    env = {**os.environ, "EXO_LAB_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"}
    api_port = int(config_file.read_text().split("port: ")[-1])
    server = subprocess.Popen([sys.executable, "-m", "exo_lab.server", "--config", str(config_file),
                               "--model", "demo"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env)
    worker = subprocess.Popen([sys.executable, "-m", "exo_lab.worker", "--config", str(config_file),
                               "--device", "worker-a.test"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env)
    children = []
    try:
        wait_for_line(worker, "joining", 60)
        lines = wait_for_line(server, "serving", 120)
        assert any("worker-a.test#0" in line for line in lines) and any("worker-a.test#1" in line for line in lines)
        children = psutil.Process(worker.pid).children(recursive=True) + psutil.Process(server.pid).children(recursive=True)
        base = f"http://127.0.0.1:{api_port}"
        with urllib.request.urlopen(base + "/v1/models", timeout=10) as response:
            assert json.load(response)["data"][0]["id"] == "demo"
        body = json.dumps({"model": "demo", "messages": [{"role": "user", "content": "Hi"}],
                           "max_tokens": 5}).encode()
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


def running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_exo_lab_serve_with_local_engines_and_an_api_key(tmp_path):
    from openai import APIStatusError, AuthenticationError, OpenAI

    port = free_port()
    env = {**os.environ, "EXO_LAB_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen([sys.executable, "-m", "exo_lab.cli", "serve", "--engines", "2", "--min-stages", "2",
                               "--model", "demo", "--port", str(port), "--api-key", "sesame"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = wait_for_line(server, "serving", 120)
        assert any("engine-0" in line for line in lines) and any("engine-1" in line for line in lines)
        base = f"http://127.0.0.1:{port}/v1"
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=base, api_key="wrong").models.list()
        client = OpenAI(base_url=base, api_key="sesame")
        assert [m.id for m in client.models.list().data] == ["demo"]
        reply = client.completions.create(model="demo", prompt="Hello", max_tokens=4, temperature=0)
        assert reply.usage.completion_tokens >= 1
        with pytest.raises(APIStatusError) as caught:
            client.completions.create(model="demo", prompt="Hello", max_tokens=4, n=2)
        assert caught.value.status_code == 400 and "n" in str(caught.value)
    finally:
        stop(server)
    assert server.returncode == 0
