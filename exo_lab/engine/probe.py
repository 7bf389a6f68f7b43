"""Inside an engine: what this machine has (memory, cores, accelerators) and what it uses."""
from __future__ import annotations

import os
import socket

from .. import envvars
from ..control_types import GpuProbe, Probe


def probe_resources(use_gpu: bool = True) -> Probe:
    """Describe this engine's machine: memory, cores, accelerators, identity."""
    import psutil
    import torch

    memory = psutil.virtual_memory()
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
        memory_total_bytes=int(memory.total),
        memory_free_bytes=int(memory.available),
        cores=os.cpu_count() or 1,
        torch_threads=torch.get_num_threads(),
        gpus=tuple(gpus),
        mps=mps,
        torch_version=str(torch.__version__),
        torch_cuda=torch.version.cuda,   # None: a CPU-only torch build (gpu: true cannot use a GPU)
        rss_bytes=int(psutil.Process().memory_info().rss),
    )


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
