"""Cluster: the coordinator's handle on the ipyparallel engines and the pipeline they run.

Slow, rare work (start, probe, plan, load, status) goes through ipyparallel; per-token traffic
goes through the data plane set up by :meth:`Cluster.load` (see exo_lab.scheduler).
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

from . import engine as engine_side
from .config import ClusterConfig, DeviceConfig, load_config
from .errors import ClusterError, ExoLabError
from .launch import default_profile_dir, engine_environment, make_ipp_cluster, temporary_profile_dir
from .loop import LoopThread
from .planner import DEFAULT_BANDWIDTH_BYTES_PER_S, Plan
from .sampling import GenerationResult, SamplingParams, StreamEvent

logger = logging.getLogger(__name__)

DEFAULT_START_TIMEOUT_S = 120.0
DEFAULT_CALL_TIMEOUT_S = 60.0
DEFAULT_LOAD_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class EngineInfo:
    """One ipyparallel engine as the planner sees it."""

    engine_id: int
    node: str              # the name in plans: the device hostname (+ "#k" for a second engine there)
    hostname: str
    pid: int
    device: str            # torch device the stage runs on: "cpu", "cuda:0", "mps"
    kind: str              # "cpu" | "cuda" | "mps"
    budget_bytes: int
    bandwidth_bytes_per_s: float
    threads: int
    local: bool            # runs on this machine (its pid can be checked)
    probe: dict


@dataclass
class _Pipeline:
    model_id: str
    model_dir: Path
    plan: Plan
    engines: list[EngineInfo]        # one per stage, in pipeline order
    tokenizer: object
    context_length: int
    scheduler: object
    load_s: float


class Cluster:
    """A pipeline of ipyparallel engines that runs one causal LM. See the README for a tour.

    Use :meth:`local` for engines on this machine or :meth:`from_config` for a config.yaml
    cluster; then :meth:`start` (or ``with``), :meth:`load`, :meth:`generate` / :meth:`chat`,
    :meth:`serve`, :meth:`status`, :meth:`stop`.
    """

    def __init__(self, config: ClusterConfig, *, local_engines: int | None = None,
                 max_cores: int | None = None, max_memory_bytes: int | None = None,
                 profile_dir: str | os.PathLike | None = None,
                 start_timeout_s: float = DEFAULT_START_TIMEOUT_S):
        self.config = config
        self._local_engines = local_engines
        self._max_cores = max_cores
        self._max_memory_bytes = max_memory_bytes
        self._profile_dir = Path(profile_dir) if profile_dir else None
        self.start_timeout_s = start_timeout_s
        self._ipp = None
        self.client = None
        self._loop: LoopThread | None = None
        self._pipeline: _Pipeline | None = None
        self._failure: str | None = None
        self._server = None
        self._engine_state: dict[int, str] = {}
        self._engine_infos: dict[int, EngineInfo] = {}   # from the last probe (status rows)
        self._temporary_profile: Path | None = None

    # ------------------------------------------------------------ construction
    @classmethod
    def local(cls, engines: int = 2, *, max_cores: int | None = None, max_memory: str | int | None = None,
              **kwargs) -> "Cluster":
        """A cluster of ``engines`` engines on this machine (no config file needed).

        max_cores: torch threads per engine (default: every core — one stream runs its stages one
        after another, so they do not compete; lower it when serving many requests at once).
        max_memory: cap on each engine's memory budget (default: free memory / engines).
        """
        from .config import parse_size

        if not isinstance(engines, int) or engines < 1:
            raise ClusterError(f"engines must be an integer >= 1, got {engines!r}")
        config = _local_config(engines)
        budget = parse_size(max_memory, what="max_memory") if max_memory is not None else None
        return cls(config, local_engines=engines, max_cores=max_cores, max_memory_bytes=budget, **kwargs)

    @classmethod
    def from_config(cls, config: str | os.PathLike | ClusterConfig, **kwargs) -> "Cluster":
        """A cluster described by a config.yaml (see the README's config section)."""
        if not isinstance(config, ClusterConfig):
            config = load_config(config)
        return cls(config, **kwargs)

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "stopped" if self.client is None else f"{len(self.client.ids)} engines"
        model = f", model={self._pipeline.model_id!r}" if self._pipeline else ""
        return f"<exo_lab.Cluster {self.config.cluster_name!r}: {state}{model}>"

    # ------------------------------------------------------------ start / stop
    def start(self) -> "Cluster":
        """Start the controller (and this machine's engines) and wait for every compute engine."""
        if self.client is not None:
            return self
        try:
            self._loop = LoopThread()
            self._start_control_plane()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_control_plane(self) -> None:
        coordinator = self.config.coordinator
        is_local = self._local_engines is not None
        if self._profile_dir is None and is_local:
            self._temporary_profile = temporary_profile_dir()   # removed again by stop()
        profile_dir = (self._profile_dir or self._temporary_profile
                       or default_profile_dir(self.config.cluster_name))
        self._ipp = make_ipp_cluster(
            profile_dir=profile_dir,
            controller_ip="127.0.0.1" if is_local else "0.0.0.0",
            controller_location=None if is_local else (coordinator.address or coordinator.hostname),
            port=None if is_local else self.config.network.controller_port)
        self._ipp.start_controller_sync()
        own = self._own_engine_count()
        if own:
            threads = self._threads_for(coordinator if not is_local else None)
            env = engine_environment(threads=threads,
                                     device_name=None if is_local else coordinator.hostname)
            self._ipp.start_engines_sync(own, environment=env)
        self.client = self._ipp.connect_client_sync()
        self._wait_for_engines(self.expected_engines)

    def _own_engine_count(self) -> int:
        if self._local_engines is not None:
            return self._local_engines
        coordinator = self.config.coordinator
        return coordinator.engines if coordinator.is_compute else 0

    @property
    def profile_dir(self) -> Path | None:
        """The ipyparallel profile folder (connection files for workers and %%px, logs)."""
        return Path(self._ipp.profile_dir) if self._ipp is not None else None

    @property
    def expected_engines(self) -> int:
        if self._local_engines is not None:
            return self._local_engines
        return sum(d.engines for d in self.config.compute_devices)

    def _wait_for_engines(self, count: int) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while len(self.client.ids) < count:
            if time.monotonic() > deadline:
                raise ClusterError(self._missing_engines_message(count))
            time.sleep(0.1)

    def _missing_engines_message(self, count: int) -> str:
        have = len(self.client.ids)
        remote = [d.hostname for d in self.config.compute_devices if not d.is_coordinator]
        hint = (f"; on each compute PC ({', '.join(remote)}) run `python -m exo_lab.worker --config "
                f"{self.config.source}`" if remote else "")
        return (f"only {have} of {count} engines registered within {self.start_timeout_s:.0f} s"
                f"{hint}; engine logs are in {self._ipp.profile_dir}/log")

    def stop(self) -> None:
        """Stop serving, unload the model and end every process this cluster started."""
        if self._server is not None:
            try:
                self._server.stop()
            except Exception:  # stopping must go on whatever the server says
                logger.exception("stopping the API server failed")
            self._server = None
        self._close_pipeline()
        if self.client is not None:
            self.client.close()
            self.client = None
        if self._ipp is not None:
            try:
                self._ipp.stop_cluster_sync()
            except Exception:
                logger.exception("stopping the ipyparallel cluster failed")
            self._ipp = None
        if self._loop is not None:
            self._loop.stop()
            self._loop = None
        if self._temporary_profile is not None:
            shutil.rmtree(self._temporary_profile, ignore_errors=True)
            self._temporary_profile = None

    def _require_started(self) -> None:
        if self.client is None:
            raise ClusterError("the cluster is not started: call cluster.start() (or use `with cluster:`)")

    # ------------------------------------------------------------ control plane calls
    def _call(self, engine_id: int, func, *args, timeout_s: float = DEFAULT_CALL_TIMEOUT_S,
              what: str = "a control call"):
        return self._call_many([engine_id], func, *args, timeout_s=timeout_s, what=what)[engine_id]

    def _call_all(self, func, *args, timeout_s: float = DEFAULT_CALL_TIMEOUT_S, what: str = "probing"):
        return self._call_many(list(self.client.ids), func, *args, timeout_s=timeout_s, what=what)

    def _call_many(self, engine_ids: list[int], func, *args, timeout_s: float, what: str) -> dict:
        import ipyparallel as ipp

        results = {eid: self.client[eid].apply_async(func, *args) for eid in engine_ids}
        deadline = time.monotonic() + timeout_s
        out = {}
        for eid, async_result in results.items():
            try:
                out[eid] = async_result.get(max(0.1, deadline - time.monotonic()))
            except ipp.error.TimeoutError as exc:
                raise ClusterError(f"engine {eid} did not answer within {timeout_s:.0f} s while {what}") from exc
            except ipp.error.RemoteError as exc:
                raise _remote_error(eid, what, exc) from None
            except ipp.error.EngineError as exc:
                raise ClusterError(f"engine {eid} died while {what}: {exc}") from exc
        return out

    def engines(self) -> list[EngineInfo]:
        """Probe every live engine and apply the config's limits (memory, cores, gpu)."""
        self._require_started()
        probes = self._call_all(engine_side.probe_resources, True)
        counts: dict[str, int] = {}
        infos = []
        for engine_id in sorted(probes):
            info = self._engine_info(engine_id, probes[engine_id], counts)
            if info is not None:
                infos.append(info)
        for info in infos:
            self._call(info.engine_id, engine_side.set_threads, info.threads, what="setting threads")
        self._engine_infos = {info.engine_id: info for info in infos}
        return infos

    def _engine_info(self, engine_id: int, probe: dict, counts: dict[str, int]) -> EngineInfo | None:
        device = self._device_for(engine_id, probe)
        if device is None:
            return None
        host = device.hostname
        index = counts.get(host, 0)
        counts[host] = index + 1
        same_host = max(1, self._engines_on(host, probe))
        kind, torch_device, free_bytes = _accelerator(probe, device.gpu, index)
        budget = free_bytes // (1 if kind == "cuda" else same_host)
        caps = [c for c in (device.max_memory_bytes, self._max_memory_bytes) if c]
        if caps:
            budget = min(budget, *caps)
        bandwidth = device.memory_bandwidth_bytes_per_s or DEFAULT_BANDWIDTH_BYTES_PER_S[kind]
        node = host if (self._local_engines is None and same_host == 1) else f"{host}#{index}"
        if self._local_engines is not None:
            node = f"engine-{engine_id}"
        return EngineInfo(engine_id=engine_id, node=node, hostname=probe["hostname"], pid=probe["pid"],
                          device=torch_device, kind=kind, budget_bytes=int(budget),
                          bandwidth_bytes_per_s=float(bandwidth), threads=self._threads_for(device, probe),
                          local=probe["hostname"] == _hostname(), probe=probe)

    def _device_for(self, engine_id: int, probe: dict) -> DeviceConfig | None:
        if self._local_engines is not None:
            return self.config.devices[0]
        name = probe.get("device_name") or probe["hostname"]
        for device in self.config.compute_devices:
            if _same_host(device.hostname, name):
                return device
        if self.config.network.discovery == "auto":
            return DeviceConfig(hostname=name, roles=("compute",), max_memory_bytes=None, max_cores=None,
                                gpu=bool(probe["gpus"]), memory_bandwidth_bytes_per_s=None, engines=1,
                                address=None)
        logger.warning("engine %d on %s is not a compute device in %s (discovery: manual); not used",
                       engine_id, name, self.config.source)
        return None

    def _engines_on(self, host: str, probe: dict) -> int:
        if self._local_engines is not None:
            return self._local_engines
        return next((d.engines for d in self.config.devices if _same_host(d.hostname, host)), 1)

    def _threads_for(self, device: DeviceConfig | None, probe: dict | None = None) -> int:
        cores = (probe or {}).get("cores") or os.cpu_count() or 1
        limits = [c for c in (self._max_cores, device.max_cores if device else None) if c]
        return max(1, min([cores, *limits]))

    # ------------------------------------------------------------ load
    def load(self, model: str = "demo", *, dtype: str | None = None, max_context: int | None = None,
             max_batch: int | None = None, objective: str | None = None, min_stages: int = 1,
             progress: bool = True, timeout_s: float = DEFAULT_LOAD_TIMEOUT_S) -> Plan:
        """Plan the split of ``model`` over the live engines and load one shard per stage.

        model: a local folder, a Hugging Face hub id already in the local cache, or "demo".
        dtype: "float32" (default), "bfloat16" or "float16". max_context: tokens per request the KV
        cache is sized for (default: min(model's max positions, 4096)). objective: "latency" or
        "throughput". min_stages: spread over at least this many engines (experiments, tests).
        Raises ModelError, PlanError or ClusterError; on error nothing stays loaded.
        """
        from .loader import load_pipeline

        self._require_started()
        self._close_pipeline()
        self._failure = None
        cfg = self.config
        self._pipeline = load_pipeline(
            self, model, dtype=dtype or cfg.dtype or "float32",
            max_context=max_context or cfg.max_context, max_batch=max_batch or cfg.max_batch or 1,
            objective=objective or cfg.objective or "latency", min_stages=min_stages,
            progress=progress, timeout_s=timeout_s)
        return self._pipeline.plan

    def unload(self) -> None:
        """Free every stage (the engines stay up)."""
        self._close_pipeline()

    def _close_pipeline(self) -> None:
        pipeline, self._pipeline = self._pipeline, None
        if pipeline is None:
            return
        if self._loop is not None:
            try:
                self._loop.run(pipeline.scheduler.close(), timeout_s=10)
            except Exception:
                logger.exception("closing the scheduler failed")
        alive = set(self.client.ids) if self.client is not None else set()
        for info in pipeline.engines:
            if info.engine_id in alive:
                try:
                    self._call(info.engine_id, engine_side.unload_stage, timeout_s=10, what="unloading")
                except ExoLabError as exc:
                    logger.warning("unloading engine %d failed: %s", info.engine_id, exc)

    @property
    def plan(self) -> Plan:
        return self._require_pipeline().plan

    @property
    def model_id(self) -> str:
        return self._require_pipeline().model_id

    @property
    def tokenizer(self):
        return self._require_pipeline().tokenizer

    @property
    def context_length(self) -> int:
        return self._require_pipeline().context_length

    @property
    def loaded(self) -> bool:
        return self._pipeline is not None

    def _require_pipeline(self) -> _Pipeline:
        if self._failure:
            raise ClusterError(self._failure)
        if self._pipeline is None:
            raise ClusterError("no model is loaded: call cluster.load('demo') (or a model folder / hub id)")
        return self._pipeline

    # ------------------------------------------------------------ liveness
    def _check_alive(self) -> str | None:
        """A message naming the dead stage engine, or None when every stage engine is up.

        Called from the loop thread: it only reads ``client.ids`` (a copy of a list the client's
        own IO thread replaces on unregistration), never sends through the client."""
        pipeline = self._pipeline
        if pipeline is None or self.client is None:
            return "the cluster was stopped"
        registered = set(self.client.ids)
        for index, info in enumerate(pipeline.engines):
            if engine_is_gone(info, registered):
                stage = pipeline.plan.stages[index]
                self._failure = (
                    f"engine {info.engine_id} ({info.node}, stage {index}, layers "
                    f"[{stage.start_layer}, {stage.stop_layer})) stopped; call cluster.load(...) again to "
                    f"re-plan on the {max(len(registered) - 1, 0)} engines left, or restart it")
                return self._failure
        return None

    # ------------------------------------------------------------ generation
    def _params(self, max_new_tokens: int, temperature: float, top_p: float, top_k: int,
                seed: int | None, stop, ignore_eos: bool = False) -> SamplingParams:
        stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
        return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                              top_k=top_k, seed=seed, stop=stop, ignore_eos=ignore_eos)

    def encode(self, prompt) -> list[int]:
        """Token ids for a prompt string (no special tokens added) or a list of ids (unchanged)."""
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        return [int(t) for t in prompt]

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation through the tokenizer's chat template."""
        from .chat import apply_chat_template

        return apply_chat_template(self.tokenizer, messages)

    def astream(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[StreamEvent]:
        """Async generation on the cluster's loop (the HTTP server uses this). Closing the
        returned generator (``aclose()``) cancels the request and frees its KV caches."""
        return self._require_pipeline().scheduler.stream(prompt_ids, params)

    async def _collect(self, prompt_ids: list[int], params: SamplingParams) -> GenerationResult:
        started = time.perf_counter()
        first = None
        text, tokens, finish = [], [], "length"
        async for event in self.astream(prompt_ids, params):
            if first is None:
                first = time.perf_counter() - started
            text.append(event.text)
            tokens.extend(event.token_ids)
            finish = event.finish_reason or finish
        return GenerationResult(text="".join(text), token_ids=tokens, finish_reason=finish,
                                prompt_tokens=len(prompt_ids), time_to_first_token_s=first or 0.0,
                                total_time_s=time.perf_counter() - started)

    def generate(self, prompt, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None, stop=None, ignore_eos: bool = False
                 ) -> GenerationResult:
        """Continue a prompt (a string, or token ids). Returns text, new token ids, finish reason
        and timings. temperature 0 is greedy; ``seed`` makes sampling reproducible; ``stop`` is a
        string or list of strings that end generation (not included in the text); ignore_eos
        generates past end-of-sequence tokens (benchmarks)."""
        params = self._params(max_new_tokens, temperature, top_p, top_k, seed, stop, ignore_eos)
        prompt_ids = self.encode(prompt)
        return self._loop.run(self._collect(prompt_ids, params))

    def stream(self, prompt, **sampling) -> Iterator[StreamEvent]:
        """Like generate, yielding StreamEvents as tokens arrive; breaking out cancels the request."""
        params = self._params(**_sampling_defaults(sampling))
        return self._loop.iterate(self.astream(self.encode(prompt), params))

    def chat(self, messages, stream: bool = False, **sampling):
        """Chat through the tokenizer's chat template. ``messages``: a list of {"role", "content"}
        dicts (or one user string). Returns a GenerationResult, or an iterator of StreamEvents
        when stream=True."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        prompt_ids = self.encode_chat(messages)
        if stream:
            return self.stream(prompt_ids, **sampling)
        return self.generate(prompt_ids, **sampling)

    # ------------------------------------------------------------ API server
    def serve(self, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None):
        """Serve the OpenAI-compatible API from this process; returns at once (the server runs on
        the cluster's loop thread, so a notebook stays usable). Returns the server handle
        (``.url``, ``.stop()``)."""
        from .api import start_server

        self._require_started()
        if self._server is not None:
            self._server.stop()
            self._server = None
        self._server = self._loop.run(start_server(self, host=host, port=port, api_key=api_key))
        return self._server

    async def ahealth(self) -> tuple[bool, str]:
        """(True, "ok") when a model is loaded and every stage answers a ping through the pipe."""
        if self._pipeline is None:
            return False, self._failure or "no model is loaded"
        problem = self._check_alive()
        if problem:
            return False, problem
        ok = await self._pipeline.scheduler.ping(timeout_s=5.0)
        return (True, "ok") if ok else (False, "a stage did not answer a data-plane ping within 5 s")

    @property
    def metrics(self):
        """The scheduler's counters (also after a failure, until the next load)."""
        if self._pipeline is None:
            raise ClusterError("no model is loaded: call cluster.load('demo') (or a model folder / hub id)")
        return self._pipeline.scheduler.metrics

    # ------------------------------------------------------------ status
    def status(self) -> dict:
        """Engines (host, device, layers, memory, state), the model, the plan and the counters."""
        from .status import cluster_status

        return cluster_status(self)

    def widget(self, **options):
        """An ipywidgets dashboard of this cluster (updates live; close() stops it). Options go
        to :class:`exo_lab.notebook.widget.ClusterWidget` (interval_s, metrics_interval_s)."""
        from .notebook.widget import ClusterWidget

        return ClusterWidget(self, **options)


def engine_is_gone(info: EngineInfo, registered: set[int]) -> bool:
    """The engine left the controller, or (on this machine) its process no longer exists: the
    pid check notices a killed engine before the heartbeat does."""
    import psutil

    return info.engine_id not in registered or (info.local and not psutil.pid_exists(info.pid))


def _sampling_defaults(sampling: dict) -> dict:
    allowed = {"max_new_tokens": 64, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": None, "stop": None,
               "ignore_eos": False}
    unknown = set(sampling) - set(allowed)
    if unknown:
        raise TypeError(f"unknown sampling argument(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    return {**allowed, **sampling}


def _local_config(engines: int) -> ClusterConfig:
    from .config import config_from_dict

    return config_from_dict({
        "cluster_name": "local",
        "devices": [{"hostname": "localhost", "roles": ["coordinator", "compute"], "engines": engines}],
        "network": {"discovery": "manual"},
    }, source="Cluster.local()")


def _accelerator(probe: dict, use_gpu: bool, index: int) -> tuple[str, str, int]:
    """(kind, torch device, free bytes) for the engine at ``index`` on its host."""
    gpus = probe.get("gpus") or []
    if use_gpu and gpus:
        gpu = gpus[index % len(gpus)]
        return "cuda", f"cuda:{gpu['index']}", int(gpu["free_bytes"])
    if use_gpu and probe.get("mps"):
        return "mps", "mps", int(probe["memory_free_bytes"])
    return "cpu", "cpu", int(probe["memory_free_bytes"])


def _same_host(a: str, b: str) -> bool:
    a, b = a.lower().rstrip("."), b.lower().rstrip(".")
    return a == b or a.split(".")[0] == b.split(".")[0]


def _hostname() -> str:
    import socket

    return socket.gethostname()


def _remote_error(engine_id: int, what: str, exc) -> ExoLabError:
    """Turn an engine-side exception into the same exo-lab error class, naming the engine."""
    from . import errors

    cls = getattr(errors, getattr(exc, "ename", ""), None)
    if not (isinstance(cls, type) and issubclass(cls, ExoLabError)):
        cls = ClusterError
    return cls(f"engine {engine_id} failed while {what}: {exc.ename}: {exc.evalue}")
