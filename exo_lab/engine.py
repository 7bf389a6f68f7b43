"""What runs inside an ipyparallel engine: resource probe, thread setup and the stage worker.

The coordinator calls these functions through ipyparallel (the control plane). The stage worker
is a thread that owns one :class:`~exo_lab.shard.Stage` and moves per-token traffic over pyzmq
(the data plane): it receives from its inbox, runs its layers, and sends to the next stage — or,
on the last stage, samples and sends the token id back to the coordinator.

The live stage is exposed in the engine's namespace as ``exo_stage`` (a :class:`StageWorker`) so
``%%px`` can reach it: ``exo_stage.stage.layers``, ``exo_stage.stage.caches``,
``exo_stage.stage.device``.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass

logger = logging.getLogger(__name__)

NAMESPACE_NAME = "exo_stage"
_worker: "StageWorker | None" = None


def probe_resources(use_gpu: bool = True) -> dict:
    """Describe this engine's machine: memory, cores, accelerators, identity."""
    import psutil
    import torch

    memory = psutil.virtual_memory()
    gpus = []
    if use_gpu and torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            free_bytes, total_bytes = torch.cuda.mem_get_info(index)
            gpus.append({"index": index, "name": torch.cuda.get_device_name(index),
                         "total_bytes": int(total_bytes), "free_bytes": int(free_bytes)})
    mps = bool(use_gpu and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return {
        "hostname": socket.gethostname(),
        "device_name": os.environ.get("EXO_LAB_DEVICE"),   # the config hostname a worker joined as
        "pid": os.getpid(),
        "memory_total_bytes": int(memory.total),
        "memory_free_bytes": int(memory.available),
        "cores": os.cpu_count() or 1,
        "torch_threads": torch.get_num_threads(),
        "gpus": gpus,
        "mps": mps,
        "rss_bytes": int(psutil.Process().memory_info().rss),
    }


def set_threads(max_cores: int) -> int:
    """Cap torch's intra- and inter-op threads for this engine (config max_cores)."""
    import torch

    torch.set_num_threads(max(1, int(max_cores)))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set once in this process: it cannot change after first use
        pass
    return torch.get_num_threads()


@dataclass
class WorkerStats:
    """Counters a status call reads; written by the worker thread only."""

    messages: int = 0
    tokens: int = 0
    errors: int = 0
    busy_s: float = 0.0
    last_forward_ms: float = 0.0
    state: str = "idle"


class StageWorker:
    """One pipeline stage plus the thread that feeds it from the data plane."""

    def __init__(self, stage, inbox, stage_index: int, num_stages: int):
        self.stage = stage
        self.inbox = inbox
        self.stage_index = stage_index
        self.num_stages = num_stages
        self.outbox = None
        self.stats = WorkerStats()
        self._samplers: dict[int, object] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def is_last(self) -> bool:
        return self.stage_index == self.num_stages - 1

    def start(self, next_address: str) -> None:
        import zmq

        from .dataplane import Outbox

        self.outbox = Outbox(zmq.Context.instance(), next_address)
        self._thread = threading.Thread(target=self._run, name="exo-stage-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Ask the worker thread to end. The thread closes its own sockets on the way out (a zmq
        socket must not be closed under a thread still using it, e.g. blocked in a send to a
        peer that went away)."""
        self._stop.set()
        if self._thread is None:
            self._close_sockets()
        else:
            self._thread.join(timeout_s)

    def _close_sockets(self) -> None:
        self.inbox.close()
        if self.outbox is not None:
            self.outbox.close()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    message = self.inbox.recv(timeout_ms=100)
                except Exception as exc:  # a corrupt frame must not kill the stage
                    logger.warning("dropped a malformed data-plane message: %s", exc)
                    if getattr(exc, "request_id", None) is not None:
                        self._free(exc.request_id)
                        self._send_error_for(exc.request_id, exc)
                    continue
                if message is not None:
                    self._handle(message)
        finally:
            self._close_sockets()

    def _handle(self, message) -> None:
        from .dataplane import Kind

        self.stats.messages += 1
        try:
            if message.kind == Kind.FORWARD:
                self._forward(message)
            elif message.kind == Kind.FREE:
                self._free(message.request_id)
                self._send(message)
            elif message.kind == Kind.ERROR:
                self._free(message.request_id)
                self._send(message)
            else:
                self._send(message)  # PING and friends travel the ring unchanged
        except Exception as exc:
            self.stats.errors += 1
            self._free(message.request_id)
            logger.exception("stage %d failed on request %d", self.stage_index, message.request_id)
            self._send_error_for(message.request_id, exc)
        finally:
            self.stats.state = "idle"

    def _forward(self, message) -> None:
        from .dataplane import Kind, Message

        self.stats.state = "generating"
        position = int(message.meta["position"])
        started = time.perf_counter()
        output = self.stage.forward(message.request_id, message.tensor, position)
        elapsed_ms = (time.perf_counter() - started) * 1e3
        self._record(elapsed_ms)
        meta = dict(message.meta)
        meta["stage_ms"] = list(meta.get("stage_ms", ())) + [round(elapsed_ms, 3)]
        if not self.is_last:
            self._send(Message(Kind.FORWARD, message.request_id, meta, output))
            return
        token_id = self._sample(message.request_id, output, meta)
        self.stats.tokens += 1
        self._send(Message(Kind.TOKEN, message.request_id, {**meta, "token_id": token_id}))

    def _sample(self, request_id: int, logits, meta: dict) -> int:
        import torch

        from .shard import sample_next_token

        sampling = meta.get("sampling") or {}
        temperature = float(sampling.get("temperature", 0.0))
        generator = self._samplers.get(request_id)
        if generator is None and temperature > 0.0:
            generator = torch.Generator(device="cpu")
            seed = sampling.get("seed")
            generator.manual_seed(int(seed) if seed is not None else int.from_bytes(os.urandom(7), "little"))
            self._samplers[request_id] = generator
        return sample_next_token(logits.float().cpu(), temperature=temperature,
                                 top_p=float(sampling.get("top_p", 1.0)),
                                 top_k=int(sampling.get("top_k", 0)), generator=generator)

    def _record(self, elapsed_ms: float) -> None:
        stats = self.stats
        stats.busy_s += elapsed_ms / 1e3
        stats.last_forward_ms = elapsed_ms

    def _free(self, request_id: int) -> None:
        self.stage.free(request_id)
        self._samplers.pop(request_id, None)

    def _send(self, message) -> None:
        self.outbox.send(message)

    def _send_error_for(self, request_id: int, exc: BaseException) -> None:
        from .dataplane import Kind, Message

        text = f"stage {self.stage_index} ({socket.gethostname()}): {type(exc).__name__}: {exc}"
        try:
            self._send(Message(Kind.ERROR, request_id, {"error": text}))
        except Exception:  # the next stage is gone too: the coordinator's liveness check reports it
            logger.exception("could not pass an error on from stage %d", self.stage_index)

    def status(self) -> dict:
        stats = self.stats
        return {
            "stage_index": self.stage_index,
            "start_layer": self.stage.spec.start_layer,
            "stop_layer": self.stage.spec.stop_layer,
            "device": str(self.stage.device),
            "state": stats.state,
            "messages": stats.messages,
            "tokens": stats.tokens,
            "errors": stats.errors,
            "busy_s": stats.busy_s,
            "last_forward_ms": stats.last_forward_ms,
            "active_requests": len(self.stage.caches),
            "kv_cache_bytes": self.stage.kv_cache_bytes(),
            "parameter_bytes": self.stage.parameter_bytes(),
        }


def _publish(namespace_value) -> None:
    """Put the worker in the engine's user namespace (for %%px) when running in an engine."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is not None:
        shell.user_ns[NAMESPACE_NAME] = namespace_value


def _publish_progress(**data) -> None:
    try:
        from ipyparallel.datapub import publish_data

        publish_data(data)
    except Exception:  # not inside an engine (tests calling directly): progress is optional
        pass


def load_stage(spec_fields: dict, stage_index: int, num_stages: int, bind_host: str,
               advertise_host: str) -> dict:
    """Load this engine's shard and bind its data-plane inbox. Returns the inbox address."""
    import zmq

    from .dataplane import Inbox
    from .models import resolve_model
    from .shard import ShardSpec, load_stage as build_stage

    unload_stage()
    spec_fields = dict(spec_fields)
    spec_fields["model_dir"] = str(resolve_model(spec_fields.pop("model_id"), need_weights=True))
    _publish_progress(state="loading", stage_index=stage_index)
    started = time.perf_counter()
    stage = build_stage(ShardSpec(**spec_fields))
    inbox = Inbox(zmq.Context.instance(), host=bind_host, port=0, advertise_host=advertise_host)
    global _worker
    _worker = StageWorker(stage, inbox, stage_index, num_stages)
    _publish(_worker)
    _publish_progress(state="loaded", stage_index=stage_index)
    return {"address": inbox.address, "load_s": time.perf_counter() - started,
            "parameter_bytes": stage.parameter_bytes(), **_memory()}


def start_worker(next_address: str) -> bool:
    """Connect this stage to the next one (or the coordinator) and start serving."""
    if _worker is None:
        raise RuntimeError("no stage is loaded on this engine; call load_stage first")
    _worker.start(next_address)
    return True


def unload_stage() -> bool:
    """Stop the worker and drop the shard (idempotent)."""
    global _worker
    if _worker is None:
        return False
    _worker.stop()
    _worker = None
    _publish(None)
    import gc

    gc.collect()
    return True


def current_worker() -> "StageWorker | None":
    """This engine's live stage worker (the same object as ``exo_stage`` in %%px), or None."""
    return _worker


def bare_runtime_rss() -> int:
    """RSS of this engine with everything a stage needs imported but no weights (the baseline
    the memory target is measured against)."""
    import psutil
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    from . import dataplane, shard  # noqa: F401

    return int(psutil.Process().memory_info().rss)


def worker_status() -> dict:
    """Status of this engine's stage (an empty stage dict when none is loaded)."""
    status = {"loaded": _worker is not None, **_memory()}
    if _worker is not None:
        status.update(_worker.status())
    return status


def _memory() -> dict:
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
