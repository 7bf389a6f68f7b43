"""CPU and GPU on one PC, planned as loaded: `exo-lab plan` (config numbers) and a load (what
each engine probed) turn a device into the same planner nodes, a GPU PC with a second engine
also holds a CPU stage in its RAM, and `gpu: true` without a CUDA torch runs as the CPU it is.

The probes are Probes as exo_lab.engine.probe.probe_resources returns them, written by hand: the
policy is pure, so no torch (and no GPU) is needed."""
from __future__ import annotations

import logging

import pytest

from exo_lab.config import config_from_dict
from exo_lab.control_types import EngineState, EngineStatus, Probe
from exo_lab.coordinator.control import EngineControl
from exo_lab.coordinator.status import cluster_status
from exo_lab.model.profile import ModelProfile
from exo_lab.notebook.formatting import format_status
from exo_lab.planning import nodes as planning_nodes
from exo_lab.planning.nodes import (NO_CUDA_TORCH, PcResources, describe_device_budget, engine_slots,
                                    nodes_from_config)
from exo_lab.planning.planner import format_plan, plan_layers

GB = 10**9
H100 = {"index": 0, "name": "NVIDIA H100 80GB HBM3", "total_bytes": 85 * GB, "free_bytes": 80 * GB}


def office(gpu_engines: int = 2, *, cpu_pc: bool = True, **gpu_pc) -> dict:
    """The seed's office: system-a coordinates, system-b has a GPU, system-c is a CPU PC."""
    cpu = [{"hostname": "system-c.local", "roles": ["compute"], "max_memory": "64GB"}] if cpu_pc else []
    gpu = {"hostname": "system-b.local", "roles": ["compute"], "gpu": True, "max_memory": "128GB",
           "gpu_memory": "80GB", "engines": gpu_engines, **gpu_pc}
    return {"cluster_name": "office", "network": {"discovery": "manual"}, "devices": [
        {"hostname": "system-a.local", "roles": ["coordinator", "storage"]},
        {key: value for key, value in gpu.items() if value is not None}, *cpu]}   # None: key left out


def probe(device: str, *, ram_bytes: int, gpus=(), torch_cuda: str | None = "12.4", pid: int = 1) -> Probe:
    """A probe as a worker's engine on ``device`` answers it (its own name is the short one)."""
    return Probe.from_dict({
        "hostname": device.split(".")[0], "device_name": device, "advertise_host": None, "pid": pid,
        "memory_total_bytes": ram_bytes, "memory_free_bytes": ram_bytes, "cores": 16, "torch_threads": 16,
        "gpus": [dict(gpu) for gpu in gpus], "mps": False, "torch_version": "2.5.1",
        "torch_cuda": torch_cuda, "rss_bytes": 400_000_000})


def toy_70b() -> ModelProfile:
    """10 layers of 1 GB, 0.5 GB embeddings and head; no KV cache or workspace (toy numbers)."""
    return ModelProfile(model_id="toy", model_type="llama", dtype="int8", num_layers=10, hidden_size=8,
                        intermediate_size=16, vocab_size=0, max_position_embeddings=64, layer_bytes=GB,
                        embedding_bytes=GB // 2, final_norm_bytes=0, lm_head_bytes=GB // 2, tied_embeddings=False,
                        kv_bytes_per_token_per_layer=0, activation_bytes_per_token=0)


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(planning_nodes, "_warned_pcs", set())


def loaded_nodes(config, probes: dict[int, dict]):
    return [info.node_spec() for info in EngineControl(config).engine_infos(probes)]


def test_plan_and_load_give_the_same_nodes_and_plan_for_a_gpu_pc():
    config = config_from_dict(office())
    probes = {0: probe("system-b.local", ram_bytes=128 * GB, gpus=[H100], pid=10),
              1: probe("system-b.local", ram_bytes=128 * GB, gpus=[H100], pid=11),
              2: probe("system-c.local", ram_bytes=64 * GB, pid=12)}
    planned = nodes_from_config(config)
    assert planned == loaded_nodes(config, probes)
    assert [(n.name, n.kind, n.budget_bytes) for n in planned] == [
        ("system-b.local", "cuda", 80 * GB), ("system-b.local/cpu", "cpu", 128 * GB),
        ("system-c.local", "cpu", 64 * GB)]
    assert plan_layers(toy_70b(), planned) == plan_layers(toy_70b(), loaded_nodes(config, probes))


def test_a_load_caps_the_probe_by_the_config_and_never_exceeds_what_is_free():
    config = config_from_dict(office())
    roomy = dict(H100, free_bytes=90 * GB)      # more free than gpu_memory: the config caps it
    busy = dict(H100, free_bytes=30 * GB)       # another process holds 50 GB: the probe wins
    for gpu, expected in ((roomy, 80 * GB), (busy, 30 * GB)):
        nodes = loaded_nodes(config, {0: probe("system-b.local", ram_bytes=256 * GB, gpus=[gpu]),
                                      1: probe("system-b.local", ram_bytes=256 * GB, gpus=[gpu])})
        assert [(n.name, n.budget_bytes) for n in nodes] == [("system-b.local", expected),
                                                             ("system-b.local/cpu", 128 * GB)]


def test_cpu_and_gpu_on_one_pc_plan_fills_the_gpu_then_the_ram():
    # GPU: 6 GB - 1.5 GB CUDA overhead = 4.5 GB = embeddings + 4 layers; the rest goes to RAM.
    config = config_from_dict(office(cpu_pc=False, gpu_memory="6GB"))
    plan = plan_layers(toy_70b(), nodes_from_config(config))
    assert [(s.node, s.kind, s.start_layer, s.stop_layer) for s in plan.stages] == [
        ("system-b.local", "cuda", 0, 4), ("system-b.local/cpu", "cpu", 4, 10)]
    # 4 GB / 500 GB/s + (6 GB + 0.5 GB head) / 20 GB/s + one hop
    assert plan.predicted_ms_per_token == pytest.approx(8.0 + 325.0 + 0.5)
    assert plan.stages[0].total_bytes == plan.stages[0].budget_bytes == 6 * GB
    assert "system-b.local/cpu  cpu     4-9" in format_plan(plan)


def test_the_cpu_stage_is_left_unused_where_it_does_not_pay_and_the_plan_says_why():
    config = config_from_dict(office())
    plan = plan_layers(toy_70b(), nodes_from_config(config))   # 80 GB of VRAM holds it all
    assert [(s.node, s.start_layer, s.stop_layer) for s in plan.stages] == [("system-b.local", 0, 10)]
    reasons = {u.node: u.reason for u in plan.unused_nodes}
    assert reasons["system-b.local/cpu"].startswith("not needed: slower than every node in the plan")


def test_a_gpu_pc_with_one_engine_plans_its_gpu_only_and_says_how_to_use_its_ram():
    device = config_from_dict(office(gpu_engines=1)).devices[1]
    assert [n.name for n in nodes_from_config(config_from_dict(office(gpu_engines=1)))] == [
        "system-b.local", "system-c.local"]
    assert describe_device_budget(device) == (
        "system-b.local: GPU stage: up to 80 GB VRAM (gpu_memory); CPU stage: none, its one engine runs on "
        "the GPU (engines: 2, the default, adds one: up to 128 GB RAM (max_memory))")


def test_plan_without_gpu_memory_states_the_vram_it_assumed(caplog):
    config = config_from_dict(office(gpu_memory=None))
    with caplog.at_level(logging.WARNING, logger="exo_lab.planning.nodes"):
        nodes = nodes_from_config(config)
    assert nodes[0].budget_bytes == planning_nodes.ASSUMED_GPU_FREE_BYTES
    assert "system-b.local: gpu: true without gpu_memory, so `exo-lab plan` assumed one GPU with 24 GB" in caplog.text
    assert "the free VRAM at load (no gpu_memory; `exo-lab plan` assumes 24 GB)" in describe_device_budget(
        config.devices[1])


def test_two_gpus_take_the_first_engines_and_the_rest_share_the_ram():
    device = config_from_dict(office(gpu_engines=3, max_memory="100GB")).devices[1]
    second = dict(H100, index=1, free_bytes=70 * GB)
    slots = engine_slots(device, PcResources.from_probe(probe(device.hostname, ram_bytes=512 * GB,
                                                                gpus=[H100, second]).to_dict()), 4)
    assert [(s.node, s.torch_device, s.budget_bytes) for s in slots] == [
        ("system-b.local#0", "cuda:0", 80 * GB), ("system-b.local#1", "cuda:1", 70 * GB),
        ("system-b.local/cpu#0", "cpu", 50 * GB), ("system-b.local/cpu#1", "cpu", 50 * GB)]


class _Control:
    """What cluster_status asks of EngineControl, for one probed engine and no model."""

    started = True
    ids = [0]

    def __init__(self, infos):
        self.infos = {info.engine_id: info for info in infos}

    def gather(self, engine_ids, func, *args, timeout_s, what):
        return {eid: EngineStatus(rss_bytes=500_000_000, peak_rss_bytes=500_000_000) for eid in engine_ids}

    def state(self, engine_id):
        return EngineState.IDLE


def test_gpu_true_without_a_cuda_torch_warns_once_and_runs_as_the_cpu_it_is(caplog):
    config = config_from_dict(office(gpu_engines=1))
    no_cuda = probe("system-b.local", ram_bytes=128 * GB, torch_cuda=None)
    control = EngineControl(config)
    with caplog.at_level(logging.WARNING, logger="exo_lab.planning.nodes"):
        (info,) = control.engine_infos({0: no_cuda})
        control.engine_infos({0: no_cuda})     # every load and re-plan probes again
    warnings = [r.getMessage() for r in caplog.records if "system-b.local" in r.getMessage()]
    assert len(warnings) == 1
    assert "has no CUDA" in warnings[0]
    assert "pip install torch --index-url https://download.pytorch.org/whl/cu124" in warnings[0]
    assert (info.node, info.kind, info.device, info.budget_bytes) == ("system-b.local", "cpu", "cpu", 128 * GB)
    assert info.bandwidth_bytes_per_s == 20e9 and info.device_note == NO_CUDA_TORCH
    plan = plan_layers(toy_70b(), [info.node_spec()])
    assert "system-b.local  cpu (gpu: true but torch has no CUDA)  0-9" in format_plan(plan)
    status = cluster_status(_Control([info]), None, None, "office")
    assert status["engines"][0]["device_note"] == "gpu: true but torch has no CUDA"
    assert "CPU (gpu: true but torch has no CUDA)" in format_status(status)


def test_a_cuda_torch_that_sees_no_gpu_points_at_the_driver(caplog):
    config = config_from_dict(office(gpu_engines=1))
    with caplog.at_level(logging.WARNING, logger="exo_lab.planning.nodes"):
        (info,) = EngineControl(config).engine_infos({0: probe("system-b.local", ram_bytes=128 * GB)})
    assert info.kind == "cpu" and info.device_note == "gpu: true but torch sees no GPU"
    assert "nvidia-smi" in caplog.text


def test_a_gpu_stage_shows_its_gpu_name_in_the_status():
    config = config_from_dict(office(gpu_engines=1))
    (info,) = EngineControl(config).engine_infos({0: probe("system-b.local", ram_bytes=128 * GB, gpus=[H100])})
    assert "NVIDIA H100 80GB HBM3 (cuda:0)" in format_status(cluster_status(_Control([info]), None, None, "o"))
