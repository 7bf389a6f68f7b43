"""The README's office recipe, run word for word on three netlab PCs behind firewalls.

The README's office section marks each shell step with the PC it runs on
(``<!-- run: system-a -->`` and the like, just before a fenced block). This test reads those
blocks and runs every command in them literally, each on its PC, in a folder holding what the
recipe says that PC holds: the shipped ``examples/config.yaml`` (the seed's three PCs plus its
``secret_file`` line) as ``config.yaml``, and the ``secret.txt`` written on system-a with the
recipe's own command, copied to the others (the recipe's "copy both files" step). The PCs are
named as real ones are (``system-a``, while the config says ``system-a.local``, which nothing
here resolves) and each sits behind the firewall the recipe opens (its blocks marked
``firewall`` are for Windows/ufw/firewalld; here nftables applies the same ports). The storage
PC has the model, as the recipe's "model on system-a" step says; the compute PCs have no
network beyond the lab, so they fetch their layers from it. Then the official openai client
asks by the served model name, the way an existing application would.

Blocks marked ``install``, ``firewall`` and ``check`` are not run (installing, a firewall this
OS does not have, a name the lab does not resolve); ``test_the_recipe_is_complete`` checks they
are there and say the right ports.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

import netlab
from procs import read_until

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCK = re.compile(r"<!-- run: ([^>]+?) -->[ \t]*\n```[a-z]*\n(.*?)```", re.S)
PCS = ("system-a", "system-b", "system-c")
SERVICES = ("python -m exo_lab.server", "python -m exo_lab.worker")
PORT_RANGE, API_PORT = "10100-10199", 8000

REASON = netlab.unavailable() or netlab.firewall_unavailable()
REQUIRED = os.environ.get("EXO_LAB_REQUIRE_NETLAB") == "1"


def recipe() -> list[tuple[str, list[str]]]:
    """(where, commands) of every marked block, in README order; comments and blank lines out."""
    steps = []
    for where, body in BLOCK.findall(README.read_text(encoding="utf-8")):
        commands = [line.strip() for line in body.splitlines() if line.strip() and not line.strip().startswith("#")]
        steps.append((where.strip(), commands))
    return steps


def runnable() -> list[tuple[str, str]]:
    """(pc, command) in order, "every PC" expanded."""
    found = []
    for where, commands in recipe():
        targets = PCS if where == "every PC" else (where,) if where in PCS else ()
        found += [(pc, command) for command in commands for pc in targets]
    return found


def test_the_recipe_is_complete():
    steps = recipe()
    kinds = {where for where, _ in steps}
    assert {"install", "firewall", "system-a", "system-b", "system-c"} <= kinds, kinds
    commands = runnable()
    assert ("system-a", "exo-lab secret secret.txt") in commands
    server = [c for pc, c in commands if pc == "system-a" and c.startswith(SERVICES[0])]
    assert len(server) == 1 and "--served-model-name" in server[0] and "--host 0.0.0.0" in server[0], server
    for pc in ("system-b", "system-c"):
        assert (pc, "python -m exo_lab.worker --config config.yaml") in commands, pc
    firewall = "\n".join("\n".join(c) for where, c in steps if where == "firewall")
    for needed in ("New-NetFirewallRule", "10100-10199", "ufw allow 10100:10199/tcp", "5353", "8000"):
        assert needed in firewall, needed
    assert "firewall-cmd --permanent --add-port=10100-10199/tcp" in README.read_text(encoding="utf-8")


@pytest.mark.skipif(REASON is not None and not REQUIRED, reason=f"netlab tests skipped: {REASON}")
def test_the_office_recipe_answers_an_openai_client_by_served_name(tmp_path):
    from openai import OpenAI

    from exo_lab.weights.smollm2 import smollm2_gguf_path

    if REASON is not None:
        pytest.fail(f"EXO_LAB_REQUIRE_NETLAB=1 but {REASON}")
    model = smollm2_gguf_path()                     # this machine may reach the registry; the PCs cannot
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}   # the venv, activated
    with netlab.Netlab(list(PCS), tmp_path / "pcs") as net:
        folders = {pc: tmp_path / "pcs" / pc / "office" for pc in PCS}
        for pc, folder in folders.items():
            folder.mkdir(parents=True)
            shutil.copy(ROOT / "examples" / "config.yaml", folder / "config.yaml")
            net.firewall(pc, tcp_ports=[PORT_RANGE] + ([str(API_PORT)] if pc == "system-a" else []),
                         udp_ports=["5353"])
        # the model on the storage PC (system-a): its cache, as `exo-lab` left it there (the GGUF file)
        (net.pcs["system-a"].root / "cache" / "models" / model.parent.name).mkdir(parents=True)
        shutil.copy(model, net.pcs["system-a"].root / "cache" / "models" / model.parent.name / model.name)
        services = []
        for pc, command in runnable():
            if command.startswith(SERVICES):
                services.append((pc, net.start(pc, ["bash", "-c", command], cwd=folders[pc], env=env,
                                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
                continue
            done = net.run(pc, ["bash", "-c", command], cwd=folders[pc], env=env, timeout_s=120)
            assert done.returncode == 0, (pc, command, done.stdout)
            if command.startswith("exo-lab secret"):      # "copy config.yaml and secret.txt to every PC"
                for other in PCS[1:]:
                    shutil.copy(folders[pc] / "secret.txt", folders[other] / "secret.txt")
        server = next(process for pc, process in services if pc == "system-a")
        read_until(server, "serving", 300)
        base = f"http://{net.pcs['system-a'].address}:{API_PORT}"
        with urllib.request.urlopen(base + "/health", timeout=30) as response:
            assert json.load(response)["status"] == "ok"
        client = OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)
        assert "smollm2" in [m.id for m in client.models.list().data]
        reply = client.chat.completions.create(
            model="smollm2", temperature=0, max_tokens=12,
            messages=[{"role": "user", "content": "Tell me the capital of France."}])
        assert "Paris" in reply.choices[0].message.content, reply
        with urllib.request.urlopen(base + "/v1/cluster/status", timeout=30) as response:
            nodes = sorted(row["node"] for row in json.load(response)["engines"] if row.get("stage_index") is not None)
        # the compute PCs hold the stages (no CUDA here: each runs its 2 engines as CPU stages,
        # system-b.local#0 and #1, and the latency plan keeps a 135M model on as few as it can)
        assert nodes and all(node.split("#")[0] in ("system-b.local", "system-c.local") for node in nodes), nodes
