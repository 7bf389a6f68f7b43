"""Inside an engine: what this machine has (memory, cores, accelerators) and what it uses."""
from __future__ import annotations

import os
import socket

from .. import envvars
from ..control_types import GpuProbe, Probe
from .room import UNLIMITED, cgroup_memory  # noqa: F401  (their home before room.py)


def probe_resources(use_gpu: bool = True) -> Probe:
    """Describe this engine's machine: memory, cores, accelerators, identity."""
    import psutil
    import torch

    memory = psutil.virtual_memory()
    total, free = int(memory.total), int(memory.available)
    limited = cgroup_memory()
    if limited is not None:       # a container, a systemd slice: its limit is this PC's RAM
        total, free = min(total, limited[0]), min(free, limited[1])
    # What this engine holds is its own to plan with: the planner charges a stage plus the
    # engine's runtime overhead, and the next load frees (or keeps) the stage held now. So a
    # re-plan while it serves (a failover, a re-balance, a move away from a PC short of memory)
    # does not count the engine's own memory as used by someone else.
    rss = int(psutil.Process().memory_info().rss)
    free = min(total, free + max(rss, held_stage_bytes()))
    gpus = []
    if use_gpu and torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            free_bytes, total_bytes = torch.cuda.mem_get_info(index)
            gpus.append(GpuProbe(index=index, name=torch.cuda.get_device_name(index),
                                 total_bytes=int(total_bytes), free_bytes=int(free_bytes)))
    mps = bool(use_gpu and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return Probe(
        hostname=socket.gethostname(),
        device_name=os.environ.get(envvars.DEVICE),   # the config hostname a worker joined as
        advertise_host=os.environ.get(envvars.ADVERTISE_HOST),   # its LAN address, learnt on joining
        pid=os.getpid(),
        memory_total_bytes=total,
        memory_free_bytes=free,
        cores=os.cpu_count() or 1,
        torch_threads=torch.get_num_threads(),
        gpus=tuple(gpus),
        mps=mps,
        torch_version=str(torch.__version__),
        torch_cuda=torch.version.cuda,   # None: a CPU-only torch build (gpu: true cannot use a GPU)
        rss_bytes=rss,
    )


def held_stage_bytes() -> int:
    """Bytes of the stage this engine holds (weights and KV slots), 0 without one."""
    from .worker import current_worker

    worker = current_worker()
    if worker is None:
        return 0
    return int(worker.stage.parameter_bytes() + worker.stage.kv_cache_bytes())


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one, else all)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def set_threads(max_cores: int) -> int:
    """Cap torch's intra- and inter-op threads for this engine (config max_cores)."""
    import torch

    torch.set_num_threads(max(1, int(max_cores)))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set once in this process: it cannot change after first use
        pass
    return torch.get_num_threads()


def bare_runtime_rss(model_id: str | None = None) -> int:
    """RSS of this engine with everything a stage needs imported but no weights (the baseline
    the memory target is measured against). With ``model_id``, also that model's config and
    transformers classes, built as a one-layer stage skeleton on the meta device: importing a
    model's modeling code costs tens of MB that are not weights."""
    import psutil
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    from ..control_types import ShardSpec
    from ..weights.checkpoint import stage_skeleton
    from ..wire import sockets  # noqa: F401

    if model_id is not None:
        from ..weights.resolve import read_model_config, resolve_model

        folder = resolve_model(model_id, need_weights=False)
        num_layers = read_model_config(folder)["num_hidden_layers"]
        stage_skeleton(ShardSpec(str(folder), 0, 1, num_layers))
    return int(psutil.Process().memory_info().rss)
