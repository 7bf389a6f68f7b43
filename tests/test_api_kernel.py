"""serve() inside a real Jupyter kernel: the cell returns at once, the API answers while the
kernel is idle, the kernel stays usable, and nothing is left running afterwards."""
from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request

import openai
import psutil
import pytest
from kernels import kernel_manager


class Kernel:
    """A started kernel and a blocking client; ``run(code)`` returns (stdout, last result)."""

    def __init__(self):
        self.manager = kernel_manager()
        self.manager.start_kernel()
        self.client = self.manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=60)

    @property
    def pid(self) -> int:
        return self.manager.provisioner.process.pid

    def run(self, code: str, timeout_s: float = 120) -> tuple[str, str | None]:
        stdout, results, errors = [], [], []

        def collect(message: dict) -> None:
            kind, content = message["header"]["msg_type"], message["content"]
            if kind == "stream" and content["name"] == "stdout":
                stdout.append(content["text"])
            elif kind == "execute_result":
                results.append(content["data"]["text/plain"])
            elif kind == "error":
                errors.append("\n".join(content["traceback"]))

        reply = self.client.execute_interactive(code, timeout=timeout_s, output_hook=collect)
        assert reply["content"]["status"] == "ok", "\n".join(errors)
        return "".join(stdout), (results[-1] if results else None)

    def shutdown(self) -> None:
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=False)


@pytest.fixture()
def kernel():
    started = Kernel()
    yield started
    if not started.manager.is_alive():
        return
    # The test failed half-way: stop what the kernel started, then make sure of it.
    leftovers = psutil.Process(started.pid).children(recursive=True)
    try:
        started.run("if 'cluster' in globals(): cluster.stop()", timeout_s=60)
    except Exception:
        pass
    started.shutdown()
    for process in leftovers:
        if process.is_running():
            process.kill()


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _alive(pids: set[int]) -> set[int]:
    """The pids among ``pids`` still running (zombies count as gone: only their reaping is left)."""
    alive = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.add(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def test_serve_from_a_kernel_then_keep_using_it(kernel):
    stdout, _ = kernel.run("import sys; print(sys.executable)")
    assert stdout.strip() == sys.executable, "the kernel must run the tests' interpreter"

    kernel.run("import exo_lab, torch\n"
               "torch.set_num_threads(1)\n"
               "cluster = exo_lab.Cluster.local(engines=2, max_cores=1).start()\n")
    started = time.monotonic()
    stdout, _ = kernel.run("server = cluster.serve(port=0)\nprint(server.url)")
    assert time.monotonic() - started < 5, "serve() must return at once"
    url = stdout.strip()
    assert url.startswith("http://127.0.0.1:")

    status, body = _get(url + "/health")           # served while the kernel is idle, no model yet
    assert status == 503 and body["status"] == "unavailable" and "no model" in body["reason"]

    kernel.run("cluster.load('demo', min_stages=2, progress=False)")
    assert _get(url + "/health") == (200, {"status": "ok", "state": "serving", "model": "demo"})
    assert [m["id"] for m in _get(url + "/v1/models")[1]["data"]] == ["demo"]   # no key needed: none set
    with openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as client:
        answer = client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "Hello from outside"}], max_tokens=6,
            temperature=0)
    assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 6
    direct, _ = kernel.run(
        "print(cluster.chat([{'role': 'user', 'content': 'Hello from outside'}], max_new_tokens=6).text, end='')")
    assert direct == answer.choices[0].message.content

    assert kernel.run("1 + 1")[1] == "2"
    assert kernel.run("cluster.status()['state']")[1] == "'ready'"

    children = {p.pid for p in psutil.Process(kernel.pid).children(recursive=True)}
    assert len(children) >= 3, "the controller and two engines should run under the kernel"
    kernel.run("cluster.stop()")
    with pytest.raises(OSError):
        urllib.request.urlopen(url + "/health", timeout=5)
    kernel_pid = kernel.pid
    kernel.shutdown()
    deadline = time.monotonic() + 20
    while _alive(children | {kernel_pid}) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(children | {kernel_pid}), "processes left after the kernel shut down"
