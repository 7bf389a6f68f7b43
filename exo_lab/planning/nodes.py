"""Planner nodes: config.yaml and probed engines -> :class:`NodeSpec`, with one budget rule.

``exo-lab plan`` builds nodes from the config alone (:func:`nodes_from_config`), before any
engine has joined; ``Cluster.load`` from the engines it probed (``EngineInfo.node_spec``).
Both name and budget a node the same way, so the same inputs plan the same way.
"""
from __future__ import annotations

from ..config import ClusterConfig, DeviceConfig, is_this_machine
from ..errors import ConfigError
from .planner import DEFAULT_BANDWIDTH_BYTES_PER_S, NodeSpec


def node_budget(free_bytes: int, engines_sharing: int, kind: str, caps: list[int | None]) -> int:
    """A node's memory budget: the free memory of its device (a CPU's RAM is shared by the
    engines on that PC, a GPU is its engine's own), capped by every cap that is set (the
    config's max_memory, Cluster.local's max_memory)."""
    budget = free_bytes // (1 if kind == "cuda" else max(1, engines_sharing))
    return min(budget, *[c for c in caps if c]) if any(caps) else budget


def node_name(hostname: str, index: int, engines_on_host: int) -> str:
    """A node's name in plans: the hostname, or ``hostname#k`` for the k-th of several engines."""
    return hostname if engines_on_host == 1 else f"{hostname}#{index}"


def device_bandwidth(device: DeviceConfig, kind: str) -> float:
    """The device's configured memory bandwidth, else the default for its kind."""
    return float(device.memory_bandwidth_bytes_per_s or DEFAULT_BANDWIDTH_BYTES_PER_S[kind])


def device_nodes(device: DeviceConfig, source: str) -> list[NodeSpec]:
    """One node per engine of a compute device. When the device is this machine (and uses no
    GPU) its free memory is known and caps the budget, as a probe would."""
    kind = "cuda" if device.gpu else "cpu"
    if is_this_machine(device.hostname) and not device.gpu:
        budget = node_budget(_local_free_bytes(), device.engines, kind, [device.max_memory_bytes])
    elif device.max_memory_bytes:
        budget = device.max_memory_bytes
    else:
        raise ConfigError(f"{source}: device {device.hostname!r} has no max_memory, and the planner cannot "
                          f"probe another PC before it joins; set max_memory (e.g. 64GB) for it")
    return [NodeSpec(name=node_name(device.hostname, i, device.engines), budget_bytes=int(budget),
                     bandwidth_bytes_per_s=device_bandwidth(device, kind), kind=kind)
            for i in range(device.engines)]


def nodes_from_config(config: ClusterConfig) -> list[NodeSpec]:
    """Every compute engine of the config, in config order (= pipeline order)."""
    return [node for device in config.compute_devices for node in device_nodes(device, config.source)]


def _local_free_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().available)
