"""Inside an engine: what this machine has (memory, cores, accelerators) and what it uses."""
from __future__ import annotations

import os
import socket
from pathlib import Path

from .. import envvars
from ..control_types import GpuProbe, Probe


def probe_resources(use_gpu: bool = True) -> Probe:
    """Describe this engine's machine: memory, cores, accelerators, identity."""
    import psutil
    import torch

    memory = psutil.virtual_memory()
    total, free = int(memory.total), int(memory.available)
    limited = cgroup_memory()
    if limited is not None:       # a container, a systemd slice: its limit is this PC's RAM
        total, free = min(total, limited[0]), min(free, limited[1])
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
        rss_bytes=int(psutil.Process().memory_info().rss),
    )


UNLIMITED = 1 << 60       # a cgroup limit at or past this is none (v1 writes "no limit" as ~2^63)


def cgroup_memory(root: str | os.PathLike = "/sys/fs/cgroup", self_cgroup: str | os.PathLike = "/proc/self/cgroup"
                  ) -> tuple[int, int] | None:
    """(limit, free) bytes of the Linux memory cgroup this process runs in when it has a limit
    (a container, a systemd slice or user session with MemoryMax, a netlab PC), ancestors' limits
    included; free = limit - (charge - inactive file cache, which the kernel reclaims before it
    kills). None without a limit, off Linux, or where the cgroup files cannot be read: the OS's
    figures stand. cgroup v1 (memory controller) or v2 (unified)."""
    try:
        lines = Path(self_cgroup).read_text().splitlines()
    except OSError:
        return None
    entries = [line.split(":", 2) for line in lines if line.count(":") >= 2]
    v1 = next((path for _, controllers, path in entries if "memory" in controllers.split(",")), None)
    v2 = next((path for hierarchy, controllers, path in entries if hierarchy == "0" and not controllers), None)
    try:
        if v1 is not None:
            folder = Path(root, "memory", v1.lstrip("/"))
            stat = _cgroup_stat(folder / "memory.stat")
            limit = min(stat.get("hierarchical_memory_limit", UNLIMITED), _cgroup_int(folder / "memory.limit_in_bytes"))
            charged = _cgroup_int(folder / "memory.usage_in_bytes") - stat.get("total_inactive_file", 0)
        elif v2 is not None:
            folder = Path(root, v2.lstrip("/"))
            limit = min([_cgroup_int(group / "memory.max") for group in (folder, *folder.parents)
                         if (group / "memory.max").exists() and Path(root) in (group, *group.parents)]
                        or [UNLIMITED])
            charged = _cgroup_int(folder / "memory.current") - _cgroup_stat(folder / "memory.stat").get("inactive_file", 0)
        else:
            return None
    except (OSError, ValueError):
        return None
    if limit >= UNLIMITED:
        return None
    return limit, max(0, limit - max(0, charged))


def _cgroup_int(path: Path) -> int:
    text = path.read_text().strip()
    return UNLIMITED if text == "max" else int(text)


def _cgroup_stat(path: Path) -> dict[str, int]:
    try:
        return {key: int(value) for key, value in (line.split() for line in path.read_text().splitlines())}
    except (OSError, ValueError):
        return {}


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


def memory() -> dict:
    """This engine's resident and peak resident bytes."""
    import psutil

    info = psutil.Process().memory_info()
    return {"rss_bytes": int(info.rss), "peak_rss_bytes": _peak_rss_bytes()}


def _peak_rss_bytes() -> int:
    """This process's peak resident set size. On Linux VmHWM, which starts afresh at exec:
    ru_maxrss would include the RSS of the parent that forked the engine."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource

        scale = 1 if os.uname().sysname == "Darwin" else 1024   # ru_maxrss: bytes on macOS, KiB elsewhere
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale
    except (ImportError, AttributeError):  # Windows has no resource module
        import psutil

        return int(getattr(psutil.Process().memory_info(), "peak_wset", 0))
