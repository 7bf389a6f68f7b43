"""Planner nodes: config.yaml and a PC's resources -> :class:`NodeSpec`, through one function.

``exo-lab plan`` and ``Cluster.load`` both turn (a device of the config, what its PC has) into
planner nodes with :func:`engine_slots`; only where the numbers come from differs. ``exo-lab
plan`` has no probe: :func:`config_resources` takes the config's numbers (one GPU with
``gpu_memory`` free, else :data:`ASSUMED_GPU_FREE_BYTES`, which it says; RAM = ``max_memory``, or
this PC's free RAM). A load passes what each engine probed (:meth:`PcResources.from_probe`),
capped by the same config keys. So the same numbers give the same nodes and the same plan.

A PC is CPU, GPU or both. Its engines (in engine order on that PC) take these slots:

* **GPU stages**: one engine per CUDA GPU torch sees on a ``gpu: true`` PC; budget = that GPU's
  free VRAM, capped by ``gpu_memory``; bandwidth = the GPU default
  (``DEFAULT_BANDWIDTH_BYTES_PER_S["cuda"]``). Node ``hostname`` (``hostname#k``: the k-th GPU).
* **CPU stages**: every further engine; budget = min(free RAM, ``max_memory``) shared by the
  CPU engines of that PC; bandwidth = ``memory_bandwidth`` (the RAM's), else the CPU default.
  Node ``hostname/cpu`` on a PC that also holds a GPU stage, else ``hostname`` (``#k`` as above).

An ipyparallel engine hosts one stage (engine/worker.py), so a GPU PC with ``engines: 1`` runs
on its GPU only and its RAM is unused; ``engines: 2`` (the config's default for ``gpu: true``)
adds a CPU stage in its RAM, which the planner uses only where it pays (the latency objective says why it left a node unused). GPU
first, because a GPU stage is ~25x faster per byte. A ``gpu: true`` PC whose torch has no CUDA
(or sees no GPU) runs as the CPU it is: all its engines are CPU stages, their ``note`` says why,
and one warning per PC names the fix. A Mac's GPU (MPS) shares the RAM: every engine of such a
PC is an MPS stage with a share of the RAM.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..config import ClusterConfig, DeviceConfig, is_this_machine
from ..errors import ConfigError
from ..units import format_bytes
from .planner import DEFAULT_BANDWIDTH_BYTES_PER_S, NodeSpec

logger = logging.getLogger(__name__)

# What `exo-lab plan` assumes a GPU has free when the config gives no gpu_memory (a 24 GB card:
# RTX 3090/4090, A5000, L4); a load uses the free VRAM its engine probes instead.
ASSUMED_GPU_FREE_BYTES = 24 * 10**9
CUDA_TORCH_INSTALL = ("pip install torch --index-url https://download.pytorch.org/whl/cu124 (pick the "
                      "CUDA version its NVIDIA driver supports: https://pytorch.org/get-started/locally/)")
NO_CUDA_TORCH = "gpu: true but torch has no CUDA"
NO_GPU_SEEN = "gpu: true but torch sees no GPU"

_warned_pcs: set[str] = set()   # PCs already warned about running as a CPU (once per process)


@dataclass(frozen=True)
class GpuResources:
    """One CUDA device as torch on the PC sees it."""

    index: int                      # torch's cuda index: the stage runs on f"cuda:{index}"
    name: str                       # "NVIDIA H200"
    free_bytes: int


@dataclass(frozen=True)
class PcResources:
    """What one PC offers the planner: what an engine probed there, or what the config says."""

    ram_free_bytes: int | None      # None: unknown (another PC before it joins, no max_memory)
    gpus: tuple[GpuResources, ...] = ()
    mps: bool = False
    torch_cuda: str | None = None   # torch.version.cuda; None: a CPU-only torch build
    torch_version: str | None = None

    @classmethod
    def from_probe(cls, probe: Mapping[str, Any]) -> PcResources:
        """From the dict :func:`exo_lab.engine.probe.probe_resources` returns."""
        gpus = tuple(GpuResources(index=int(gpu["index"]), name=str(gpu["name"]), free_bytes=int(gpu["free_bytes"]))
                     for gpu in probe.get("gpus") or ())
        return cls(ram_free_bytes=int(probe["memory_free_bytes"]), gpus=gpus, mps=bool(probe.get("mps")),
                   torch_cuda=probe.get("torch_cuda"), torch_version=probe.get("torch_version"))


@dataclass(frozen=True)
class EngineSlot:
    """Where one engine of a PC runs, and what the planner gives it."""

    node: str                       # its name in plans
    kind: str                       # "cpu" | "cuda" | "mps"
    torch_device: str               # "cpu", "cuda:0", "mps"
    budget_bytes: int
    bandwidth_bytes_per_s: float
    gpu_name: str | None = None     # the GPU's name, for a GPU stage
    note: str | None = None         # why a gpu: true PC runs as a CPU (NO_CUDA_TORCH, NO_GPU_SEEN)

    def node_spec(self) -> NodeSpec:
        return NodeSpec(name=self.node, budget_bytes=self.budget_bytes,
                        bandwidth_bytes_per_s=self.bandwidth_bytes_per_s, kind=self.kind, note=self.note)


def engine_slots(device: DeviceConfig, resources: PcResources, engines: int,
                 per_engine_caps: Sequence[int | None] = ()) -> tuple[EngineSlot, ...]:
    """The slot of each of ``engines`` engines of ``device``, in engine order on that PC (the
    module docstring gives the rule). ``per_engine_caps`` cap every budget (Cluster.local's
    max_memory). Warns once per PC when ``gpu: true`` finds no CUDA GPU there."""
    if device.gpu and not resources.gpus and resources.mps:
        return _ram_slots(device, resources, engines, "mps", device.hostname, per_engine_caps)
    gpus = resources.gpus[:engines] if device.gpu else ()
    note = _cpu_note(device, resources)
    if note is not None:
        _warn_once(device.hostname, _cpu_warning(device, resources, note))
    gpu_slots = tuple(_gpu_slot(device, gpu, _numbered(device.hostname, i, len(gpus)), per_engine_caps)
                      for i, gpu in enumerate(gpus))
    base = f"{device.hostname}/cpu" if gpus else device.hostname
    return gpu_slots + _ram_slots(device, resources, engines - len(gpus), "cpu", base, per_engine_caps, note)


def _gpu_slot(device: DeviceConfig, gpu: GpuResources, node: str, caps: Sequence[int | None]) -> EngineSlot:
    return EngineSlot(node=node, kind="cuda", torch_device=f"cuda:{gpu.index}",
                      budget_bytes=_capped(gpu.free_bytes, device.gpu_memory_bytes, *caps),
                      bandwidth_bytes_per_s=DEFAULT_BANDWIDTH_BYTES_PER_S["cuda"], gpu_name=gpu.name)


def _ram_slots(device: DeviceConfig, resources: PcResources, count: int, kind: str, base: str,
               caps: Sequence[int | None], note: str | None = None) -> tuple[EngineSlot, ...]:
    """``count`` stages sharing the PC's RAM (CPU stages, or MPS on a Mac's unified memory)."""
    if count <= 0:
        return ()
    assert resources.ram_free_bytes is not None, "config_resources refuses an unknown RAM a stage needs"
    share = _capped(resources.ram_free_bytes, device.max_memory_bytes) // count
    bandwidth = float(device.memory_bandwidth_bytes_per_s or DEFAULT_BANDWIDTH_BYTES_PER_S[kind])
    return tuple(EngineSlot(node=_numbered(base, i, count), kind=kind, torch_device=kind,
                            budget_bytes=_capped(share, *caps), bandwidth_bytes_per_s=bandwidth, note=note)
                 for i in range(count))


def _capped(free_bytes: int, *caps: int | None) -> int:
    return int(min([free_bytes, *[cap for cap in caps if cap]]))


def _numbered(base: str, index: int, count: int) -> str:
    """``base``, or ``base#k`` for the k-th of several."""
    return base if count == 1 else f"{base}#{index}"


def _cpu_note(device: DeviceConfig, resources: PcResources) -> str | None:
    """Why a ``gpu: true`` PC runs as a CPU, or None when it does not."""
    if not device.gpu or resources.gpus or resources.mps:
        return None
    return NO_CUDA_TORCH if resources.torch_cuda is None else NO_GPU_SEEN


def _cpu_warning(device: DeviceConfig, resources: PcResources, note: str) -> str:
    if note == NO_CUDA_TORCH:
        torch = f"torch {resources.torch_version}" if resources.torch_version else "torch"
        return (f"{device.hostname}: gpu: true, but its {torch} has no CUDA (a CPU-only build), so it is "
                f"planned and used as a CPU (RAM). To use its GPU, install a CUDA torch there: "
                f"{CUDA_TORCH_INSTALL}; then restart its worker")
    return (f"{device.hostname}: gpu: true, but torch (CUDA {resources.torch_cuda}) sees no GPU there, so it is "
            f"planned and used as a CPU (RAM); check the NVIDIA driver (nvidia-smi) and CUDA_VISIBLE_DEVICES")


def _warn_once(hostname: str, message: str) -> None:
    if hostname.lower() not in _warned_pcs:
        _warned_pcs.add(hostname.lower())
        logger.warning("%s", message)


# ----------------------------------------------------------------------------- exo-lab plan

def config_resources(device: DeviceConfig, source: str) -> PcResources:
    """What ``exo-lab plan`` assumes ``device`` has, before any engine has probed it: one GPU
    with ``gpu_memory`` (else ASSUMED_GPU_FREE_BYTES) free when ``gpu: true``; RAM =
    ``max_memory``, or the free RAM when the device is this machine (as a probe would see).
    Raises ConfigError when another PC needs a CPU stage and has no max_memory."""
    ram = _local_free_bytes() if is_this_machine(device.hostname) else device.max_memory_bytes
    if ram is None and _cpu_engines(device):
        raise ConfigError(f"{source}: device {device.hostname!r} has no max_memory, and the planner cannot "
                          f"probe another PC before it joins; set max_memory (e.g. 64GB) for it")
    gpus = (GpuResources(index=0, name="assumed GPU", free_bytes=device.gpu_memory_bytes or ASSUMED_GPU_FREE_BYTES),)
    return PcResources(ram_free_bytes=ram, gpus=gpus if device.gpu else (), torch_cuda="assumed")


def device_nodes(device: DeviceConfig, source: str) -> list[NodeSpec]:
    """The planner nodes of one compute device as ``exo-lab plan`` sees it (config numbers)."""
    if device.gpu and device.gpu_memory_bytes is None:
        logger.warning("%s: gpu: true without gpu_memory, so `exo-lab plan` assumed one GPU with %s of free "
                       "VRAM (a load uses the free VRAM its engine probes); set gpu_memory (e.g. gpu_memory: "
                       "80GB) in %s to plan with your GPU's size", device.hostname,
                       format_bytes(ASSUMED_GPU_FREE_BYTES), source)
    return [slot.node_spec() for slot in engine_slots(device, config_resources(device, source), device.engines)]


def nodes_from_config(config: ClusterConfig) -> list[NodeSpec]:
    """Every compute engine of the config, in config order (= pipeline order)."""
    return [node for device in config.compute_devices for node in device_nodes(device, config.source)]


def describe_device_budget(device: DeviceConfig) -> str:
    """One line for ``check-config`` and ``plan``: the memory each stage of this PC is planned
    with, e.g. "system-b.local: GPU stage: up to 80 GB VRAM (gpu_memory); CPU stage: up to 128 GB
    RAM (max_memory)"."""
    if not device.is_compute:
        return f"{device.hostname}: no stage (not a compute PC)"
    parts = [f"GPU stage: {_memory_text(device.gpu_memory_bytes, 'VRAM', 'gpu_memory')}"] if device.gpu else []
    ram = _memory_text(device.max_memory_bytes, "RAM", "max_memory")
    cpu_engines = _cpu_engines(device)
    if cpu_engines == 0:
        parts.append(f"CPU stage: none, its one engine runs on the GPU (engines: 2, the default, adds one: {ram})")
    else:
        shared = f", shared by {cpu_engines} engines" if cpu_engines > 1 else ""
        parts.append(f"CPU stage{'s' if cpu_engines > 1 else ''}: {ram}{shared}")
    return f"{device.hostname}: " + "; ".join(parts)


def format_device_budgets(config: ClusterConfig) -> str:
    """``describe_device_budget`` of every compute device, one line each (for ``exo-lab plan``)."""
    return "\n".join("  " + describe_device_budget(device) for device in config.compute_devices)


def _cpu_engines(device: DeviceConfig) -> int:
    """Engines of ``device`` that run CPU stages when its GPU is there (one GPU assumed)."""
    return device.engines - (1 if device.gpu else 0)


def _memory_text(cap_bytes: int | None, memory: str, key: str) -> str:
    if cap_bytes is not None:
        return f"up to {format_bytes(cap_bytes)} {memory} ({key})"
    assumed = f"; `exo-lab plan` assumes {format_bytes(ASSUMED_GPU_FREE_BYTES)}" if memory == "VRAM" else ""
    return f"the free {memory} at load (no {key}{assumed})"


def _local_free_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().available)
