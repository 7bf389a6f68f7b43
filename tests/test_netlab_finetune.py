"""Fine-tuning across PCs as an office has them: namespaces behind the README's firewall rules.

system-a runs the coordinator as a notebook would (``Cluster.from_config("config.yaml")``, then
``cluster.finetune``) and stores the model; system-b and system-c are compute PCs that cannot see
the model folder, named ``system-b`` while the config says ``system-b.local`` (nothing resolves
``.local`` here), each behind a default-drop firewall that lets in only ``network.port_range``,
the API port and mDNS. Fine-tuning adds a path serving never uses: each stage sends gradients
*upstream*, to the previous stage's inbox. The job's losses must equal the same job on a local
2-engine cluster, and the adapter it serves must answer the same tokens.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

import netlab
from procs import read_until

REASON = netlab.unavailable() or netlab.firewall_unavailable()
pytestmark = netlab.skip_unless_required(REASON)

API_PORT = 8000
OPEN_TCP = ["10100-10199", str(API_PORT)]
OPEN_UDP = ["5353"]
ROWS = [{"prompt": f"Question {i}: what is the code?", "completion": f" The code is {i * 7} zebra."} for i in range(8)]
SETTINGS = dict(r=4, alpha=8, batch_size=4, micro_batch_size=2, epochs=2, learning_rate=5e-3, seed=3,
                lr_schedule="constant")
PROMPT = "Question 3: what is the code?"


# What a notebook on system-a runs; prints one JSON line.
NOTEBOOK = """
import json, sys
import exo_lab
rows, settings, prompt, model, out = json.loads(sys.argv[1])
with exo_lab.Cluster.from_config("config.yaml") as cluster:
    cluster.load(model, min_stages=2, progress=False)
    job = cluster.finetune(rows, name="codes", output_dir=out, **settings).wait(300)
    ids = cluster.tokenizer(prompt)["input_ids"]
    print("RESULT " + json.dumps({"losses": job.losses, "nodes": [s.node for s in cluster.plan.stages],
                                  "answer": cluster.generate(ids, max_new_tokens=8, adapter="codes").token_ids,
                                  "base": cluster.generate(ids, max_new_tokens=8).token_ids}), flush=True)
"""


def local_run(model, out) -> dict:
    import exo_lab

    with exo_lab.Cluster.local(engines=2, max_cores=1) as cluster:
        cluster.load(str(model), min_stages=2, progress=False)
        job = cluster.finetune(ROWS, name="codes", output_dir=out, **SETTINGS).wait(300)
        ids = cluster.tokenizer(PROMPT)["input_ids"]
        return {"losses": job.losses, "answer": cluster.generate(ids, max_new_tokens=8, adapter="codes").token_ids}


def test_a_job_trains_through_firewalled_pcs_as_on_one_machine(tiny_model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir(num_layers=4), model)
    expected = local_run(model, tmp_path / "local")
    from exo_lab.security import new_secret, write_secret_file

    with netlab.Netlab(["system-a", "system-b", "system-c"], tmp_path / "pcs") as net:
        for name in net.pcs:
            net.firewall(name, tcp_ports=OPEN_TCP, udp_ports=OPEN_UDP)
        config = tmp_path / "cluster" / "config.yaml"
        config.parent.mkdir()
        config.write_text(netlab.OFFICE_CONFIG.format(name=f"netlab-ft-{net.run_id}", api_port=API_PORT,
                                                     replan="manual"))
        write_secret_file(config.parent / "secret.txt", new_secret())
        argument = json.dumps([ROWS, SETTINGS, PROMPT, str(model), str(tmp_path / "adapter")])
        notebook = net.start("system-a", [sys.executable, "-c", NOTEBOOK, argument], cwd=config.parent,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        workers = [net.start(name, [sys.executable, "-m", "exo_lab.worker", "--config", "config.yaml"],
                             cwd=config.parent, hide=(model,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                   for name in ("system-b", "system-c")]
        try:
            lines = read_until(notebook, "RESULT ", 300)
        finally:
            for process in (notebook, *workers):
                net.stop(process)
    got = json.loads(lines[-1].split("RESULT ", 1)[1])
    assert sorted(got["nodes"]) == ["system-b.local", "system-c.local"]
    assert got["losses"] == pytest.approx(expected["losses"], rel=1e-6, abs=0) and len(got["losses"]) == 4
    assert got["answer"] == expected["answer"] != got["base"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
