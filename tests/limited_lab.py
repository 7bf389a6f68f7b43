"""A netlab cluster whose compute PCs run under hard memory limits, serving one model over the
README's firewall rules: tests/test_memory_limits.py and benchmarks/bench_memory_limits.py.

``system-a`` is the coordinator and storage PC (the model is hidden from the others, which fetch
their stages' tensors from it); each compute PC is a cgroup v1 memory group with its limit, as
its RAM, and its config gives ``max_memory`` equal to it unless ``unconfigured`` names it (its
engine must then read the limit from its cgroup, as in a container).
"""
from __future__ import annotations

import contextlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import netlab
from procs import drain, read_until

API_PORT = 8000
# what an office firewall lets in (the README's rules): the default port range, the API, mDNS
OPEN_TCP, OPEN_UDP = ["10100-10199", str(API_PORT)], ["5353"]

CONFIG = """\
cluster_name: {name}
max_context: {max_context}
max_batch: {max_batch}
objective: {objective}
devices:
  - hostname: system-a.local
    roles: [coordinator, storage]
{compute}""" + netlab.LAN_CONFIG_END
COMPUTE_DEVICE = """\
  - hostname: {name}.local
    roles: [compute]{limit}
    max_cores: 1
"""


@dataclass
class Lab:
    net: netlab.Netlab
    model: Path
    api: str
    client: object
    server_output: list       # the coordinator's log lines so far (read by a thread of its own)


def charged(net: netlab.Netlab, name: str) -> int:
    """What PC ``name``'s processes hold: resident anonymous memory plus mapped file pages."""
    stat = dict(line.split() for line in (net._cgroups[name] / "memory.stat").read_text().splitlines())
    return int(stat["total_rss"]) + int(stat["total_mapped_file"])


@contextlib.contextmanager
def limited_cluster(folder: Path, model: Path, *, limit: int, compute=("system-b", "system-c", "system-d"),
                    unconfigured=(), max_context: int = 512, max_batch: int = 1, objective: str = "latency",
                    server_args=(), timeout_s: float = 300):
    """Start the lab in ``folder`` and serve ``model`` over ``compute`` (each under ``limit``
    bytes); yields a Lab once the server says it is serving. Everything ends on exit."""
    from openai import OpenAI

    from exo_lab.security import new_secret, write_secret_file

    with netlab.Netlab(["system-a", *compute], folder / "pcs") as net:
        for name in net.pcs:
            net.firewall(name, tcp_ports=OPEN_TCP, udp_ports=OPEN_UDP)
        config = folder / "cluster" / "config.yaml"
        config.parent.mkdir()
        devices = "".join(COMPUTE_DEVICE.format(name=name, limit="" if name in unconfigured else f"\n    max_memory: {limit}")
                          for name in compute)
        config.write_text(CONFIG.format(name=f"limits-{net.run_id}", compute=devices, api_port=API_PORT,
                                        max_context=max_context, max_batch=max_batch, objective=objective))
        write_secret_file(config.parent / "secret.txt", new_secret())
        server = net.start("system-a", [sys.executable, "-m", "exo_lab.server", "--config", "config.yaml",
                                        "--model", str(model), "--min-stages", str(len(compute)), *server_args],
                           cwd=config.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        logs = {}
        for name in compute:
            net.limit_memory(name, limit)
            with open(folder / f"{name}.log", "wb") as out:
                logs[name] = out.name
                net.start(name, [sys.executable, "-m", "exo_lab.worker", "--config", "config.yaml"],
                          cwd=config.parent, hide=(model,), stdout=out, stderr=subprocess.STDOUT)
        lines = []
        try:
            read_until(server, "serving", timeout_s, lines)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n" + "\n".join(f"--- {name}:\n{open(path).read()[-3000:]}"
                                                        for name, path in logs.items())) from None
        drain(server, lines)
        api = f"http://{net.pcs['system-a'].address}:{API_PORT}"
        client = OpenAI(base_url=api + "/v1", api_key="unused", max_retries=0, timeout=600)
        yield Lab(net, model, api, client, lines)
