"""Planner nodes from a config.yaml alone (`exo-lab plan`), before any engine has joined."""
from __future__ import annotations

import socket

from .config import ClusterConfig, DeviceConfig
from .errors import ConfigError
from .planner import DEFAULT_BANDWIDTH_BYTES_PER_S, NodeSpec


def is_this_machine(hostname: str) -> bool:
    here = {socket.gethostname().lower(), socket.getfqdn().lower(), "localhost", "127.0.0.1"}
    name = hostname.lower().rstrip(".")
    return name in here or name.split(".")[0] in {h.split(".")[0] for h in here}


def local_free_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def device_nodes(device: DeviceConfig, source: str) -> list[NodeSpec]:
    """One node per engine of a compute device. Its budget is max_memory, capped by the free
    memory this machine reports when the device is this machine (split over its engines)."""
    budget = device.max_memory_bytes
    if is_this_machine(device.hostname) and not device.gpu:
        free = local_free_bytes() // device.engines
        budget = min(budget, free) if budget else free
    if not budget:
        raise ConfigError(f"{source}: device {device.hostname!r} has no max_memory, and the planner cannot "
                          f"probe another PC before it joins; set max_memory (e.g. 64GB) for it")
    kind = "cuda" if device.gpu else "cpu"
    bandwidth = device.memory_bandwidth_bytes_per_s or DEFAULT_BANDWIDTH_BYTES_PER_S[kind]
    names = [device.hostname] if device.engines == 1 else [f"{device.hostname}#{i}" for i in range(device.engines)]
    return [NodeSpec(name=name, budget_bytes=int(budget), bandwidth_bytes_per_s=float(bandwidth), kind=kind)
            for name in names]


def nodes_from_config(config: ClusterConfig) -> list[NodeSpec]:
    """Every compute engine of the config, in config order (= pipeline order)."""
    return [node for device in config.compute_devices for node in device_nodes(device, config.source)]
