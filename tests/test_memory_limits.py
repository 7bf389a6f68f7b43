"""PCs with hard memory limits, as real PCs have RAM: the planner's arithmetic against the kernel.

Three compute PCs (netlab namespaces, behind the README's firewall rules), each in a cgroup v1
memory group whose limit is its config ``max_memory``. system-d's config gives none: its engine
must read the limit from its cgroup, as in a container, or the planner would give it the
machine's free RAM. The kernel charges everything a PC's worker and engine use (page cache of
the shard it fetched included) and OOM-kills past the limit. The model is larger than any one
PC's limit and than two PCs hold with their engines' overhead, so the planner must spread it
over all three. It loads, answers the official openai client with transformers' own greedy
text, and no process is OOM-killed. Each PC's charge (resident anonymous memory plus mapped
file pages, from memory.stat) must stay within what the planner reserved for its stage.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request

import pytest

import netlab
from procs import read_until

REASON = netlab.unavailable() or netlab.firewall_unavailable() or netlab.memory_unavailable()
REQUIRED = os.environ.get("EXO_LAB_REQUIRE_NETLAB") == "1"    # CI: a missing netlab fails, not skips
pytestmark = pytest.mark.skipif(REASON is not None and not REQUIRED, reason=f"memory-limit netlab skipped: {REASON}")

API_PORT = 8000
# what an office firewall lets in (the README's rules): the default port range, the API, mDNS
OPEN_TCP, OPEN_UDP = ["10100-10199", str(API_PORT)], ["5353"]
LIMIT = 1_400_000_000          # each compute PC's max_memory and cgroup limit
COMPUTE = ("system-b", "system-c", "system-d")
PROMPT = "The cluster of PCs"
MAX_TOKENS = 12
# ~1.7 GB of float32 weights: more than a PC's limit, and more than two PCs hold beside their
# engines' 600 MB overhead each
MODEL = dict(num_layers=24, hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
             num_key_value_heads=4, max_shard_size="100MB")

CONFIG = """\
cluster_name: {name}
max_context: 512
max_batch: 2
devices:
  - hostname: system-a.local
    roles: [coordinator, storage]
{compute}""" + netlab.LAN_CONFIG_END
COMPUTE_DEVICE = """\
  - hostname: {name}.local
    roles: [compute]{limit}
    max_cores: 1
"""


@pytest.fixture(autouse=True)
def _netlab_here():
    if REASON is not None:
        pytest.fail(f"EXO_LAB_REQUIRE_NETLAB=1 but {REASON}")


def charged(net: netlab.Netlab, name: str) -> int:
    """What PC ``name``'s processes hold: resident anonymous memory plus mapped file pages."""
    stat = dict(line.split() for line in (net._cgroups[name] / "memory.stat").read_text().splitlines())
    return int(stat["total_rss"]) + int(stat["total_mapped_file"])


def test_a_model_larger_than_any_pc_loads_across_three_limited_pcs_and_answers(tmp_path, tiny_model_dir):
    from openai import OpenAI

    from exo_lab.security import new_secret, write_secret_file

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir(**MODEL), model)
    weights = sum(path.stat().st_size for path in model.glob("*.safetensors"))
    assert weights > LIMIT
    with netlab.Netlab(["system-a", *COMPUTE], tmp_path / "pcs") as net:
        for name in net.pcs:
            net.firewall(name, tcp_ports=OPEN_TCP, udp_ports=OPEN_UDP)
        config = tmp_path / "cluster" / "config.yaml"
        config.parent.mkdir()
        # system-d's config gives no max_memory: only its cgroup says how much it has (a container)
        devices = "".join(COMPUTE_DEVICE.format(name=name, limit="" if name == "system-d" else f"\n    max_memory: {LIMIT}")
                          for name in COMPUTE)
        config.write_text(CONFIG.format(name=f"limits-{net.run_id}", compute=devices, api_port=API_PORT))
        secret = new_secret()
        write_secret_file(config.parent / "secret.txt", secret)
        server = net.start("system-a", [sys.executable, "-m", "exo_lab.server", "--config", "config.yaml",
                                        "--model", str(model), "--min-stages", "3"],
                           cwd=config.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        logs = {}
        for name in COMPUTE:
            net.limit_memory(name, LIMIT)
            with open(tmp_path / f"{name}.log", "wb") as out:
                logs[name] = out.name
                net.start(name, [sys.executable, "-m", "exo_lab.worker", "--config", "config.yaml"],
                          cwd=config.parent, hide=(model,), stdout=out, stderr=subprocess.STDOUT)
        lines = []
        try:
            read_until(server, "serving", 300, lines)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n" + "\n".join(f"--- {name}:\n{open(path).read()[-3000:]}"
                                                        for name, path in logs.items())) from None
        api = f"http://{net.pcs['system-a'].address}:{API_PORT}"
        client = OpenAI(base_url=api + "/v1", api_key="unused", max_retries=0, timeout=120)
        answer = client.completions.create(model=str(model), prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
        with urllib.request.urlopen(api + "/v1/cluster/status", timeout=30) as response:
            status = json.load(response)
        memory = {name: {**net.memory(name), "charged": charged(net, name)} for name in COMPUTE}
    assert answer.choices[0].text == reference(model)
    stages = status["plan"]["stages"]
    assert sorted(stage["node"].split(".")[0] for stage in stages) == sorted(COMPUTE), stages
    for stage in stages:
        pc = stage["node"].split(".")[0]
        assert memory[pc]["oom_kills"] == 0, memory
        # every PC's budget is within its limit, system-d's read from its cgroup; the planner
        # reserved at least what the kernel charged for the stage's processes
        assert stage["budget_bytes"] <= LIMIT, stage
        assert memory[pc]["charged"] <= stage["total_bytes"] <= LIMIT, (stage, memory[pc])


def reference(model) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    network = AutoModelForCausalLM.from_pretrained(str(model)).eval()
    inputs = torch.tensor([tokenizer(PROMPT, add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        out = network.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=MAX_TOKENS,
                               do_sample=False)
    return tokenizer.decode(out[0, inputs.shape[1]:], skip_special_tokens=True)
