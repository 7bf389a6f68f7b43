"""EngineControl: the one owner of the ipyparallel control plane.

It starts the controller (and this PC's engines), owns the ``ipyparallel.Client``, makes every
call to the engines, turns their failures into exo-lab errors, probes them into
:class:`EngineInfo` and keeps each engine's state. Nobody else touches the client.
Slow, rare work only: per-token traffic goes over the data plane (exo_lab.wire).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import shutil
import signal
import socket
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..config import ClusterConfig, DeviceConfig
from ..control_types import EngineState, Probe, received
from ..engine import probe as engine_probe
from ..engine import speed as engine_speed
from ..errors import ClusterError, ExoLabError
from ..planning.nodes import PcResources, engine_slots
from ..planning.planner import NodeSpec, slowed
from ..membership.launch import (default_profile_dir, engine_environment, make_ipp_cluster, session_key, temporary_profile_dir,
                     write_local_secret)

logger = logging.getLogger(__name__)

DEFAULT_START_TIMEOUT_S = 120.0
DEFAULT_CALL_TIMEOUT_S = 60.0
SURVIVOR_PROBE_S = 5.0      # after a failure, an engine that does not answer this fast is left out
MEASURE_TIMEOUT_S = 120.0   # an engine measuring its decode speed (exo_lab.engine.speed: a few seconds)
ENGINE_EXIT_S = 1.0         # on stop: how long the engines get to exit before the controller stops
LEFTOVER_GRACE_S = 0.5      # on stop: a child that outlived its launcher, SIGTERMed, then SIGKILLed


@dataclass(frozen=True)
class EngineInfo:
    """One ipyparallel engine as the planner sees it."""

    engine_id: int
    node: str              # the name in plans: "system-b.local", "system-b.local/cpu" (planning.nodes)
    hostname: str
    pid: int
    device: str            # torch device the stage runs on: "cpu", "cuda:0", "mps"
    kind: str              # "cpu" | "cuda" | "mps"
    budget_bytes: int
    bandwidth_bytes_per_s: float
    threads: int
    local: bool            # runs on this machine (its pid can be checked)
    device_name: str       # the config hostname of its PC
    probe: Probe
    gpu_name: str | None = None       # the GPU's name, for a GPU stage
    device_note: str | None = None    # why a gpu: true PC runs as a CPU ("gpu: true but torch has no CUDA")
    measured_ms: tuple[float, float] | None = None   # (ms per layer, ms for the head) of the model loading

    def node_spec(self) -> NodeSpec:
        return NodeSpec(name=self.node, budget_bytes=self.budget_bytes,
                        bandwidth_bytes_per_s=self.bandwidth_bytes_per_s, kind=self.kind, note=self.device_note,
                        measured_ms=self.measured_ms)


class EngineControl:
    """The controller, the engines this PC starts, and the client that talks to all engines.

    ``local_engines`` set: a cluster of that many engines on this machine, all on loopback.
    Otherwise the config's coordinator starts the controller for the compute PCs to join.
    """

    def __init__(self, config: ClusterConfig, *, local_engines: int | None = None,
                 max_cores: int | None = None, max_memory_bytes: int | None = None,
                 profile_dir: str | os.PathLike | None = None,
                 start_timeout_s: float = DEFAULT_START_TIMEOUT_S):
        self.config = config
        self.local_engines = local_engines
        self.max_cores = max_cores
        self.max_memory_bytes = max_memory_bytes
        self.start_timeout_s = start_timeout_s
        self._profile_dir = Path(profile_dir) if profile_dir else None
        self._temporary_profile: Path | None = None
        self._ipp = None
        self._client = None
        self._states: dict[int, EngineState] = {}
        self.infos: dict[int, EngineInfo] = {}        # from the last probe
        # node -> how much slower its stage ran than measured, seen while serving (re-balancing:
        # exo_lab.coordinator.balance); every plan after that uses it
        self.speed_factors: dict[str, float] = {}
        self.secret: bytes | None = None              # the cluster secret (config clusters), set by start()
        # what this cluster's engines and data plane authenticate with: the shared secret, else
        # a random one per cluster made by start() (and then everything binds loopback only)
        self.runtime_secret: bytes | None = None
        self.lan_address: str | None = None           # this PC's address as a joining worker saw it

    @property
    def is_local(self) -> bool:
        return self.local_engines is not None

    @property
    def started(self) -> bool:
        return self._client is not None

    @property
    def ids(self) -> list[int]:
        """Engine ids registered now (a copy; safe to read from any thread)."""
        return list(self._client.ids) if self._client is not None else []

    @property
    def profile_dir(self) -> Path | None:
        """The ipyparallel profile folder (connection files for workers and %%px, logs)."""
        return Path(self._ipp.profile_dir) if self._ipp is not None else None

    @property
    def binds_lan(self) -> bool:
        """Whether the controller and the data plane listen on every interface: only for a
        config cluster with a shared secret; otherwise 127.0.0.1 only."""
        return not self.is_local and self.secret is not None

    @property
    def data_plane_key(self) -> bytes:
        """The key of this cluster's data-plane sockets (after :meth:`start`)."""
        from ..security import derive_key

        if self.runtime_secret is None:
            raise ClusterError("the cluster is not started: call cluster.start() (or use `with cluster:`)")
        return derive_key(self.runtime_secret, "data-plane")

    @property
    def launches_workers(self) -> bool:
        """Whether this coordinator starts the compute PCs' workers (``launcher: ssh | slurm``)."""
        return not self.is_local and self.config.launcher.kind != "manual"

    @property
    def expected_engines(self) -> int:
        if self.is_local:
            return self.local_engines
        if self.config.launcher.kind == "slurm":   # the job's nodes are not listed in the config
            coordinator = self.config.coordinator
            return (coordinator.engines if coordinator.is_compute else 0) + self.config.launcher.nodes
        return sum(d.engines for d in self.config.compute_devices)

    # ------------------------------------------------------------ start / stop
    def start(self, on_controller=None) -> None:
        """Start the controller and this PC's engines; wait for every expected engine.
        ``on_controller()`` runs once the controller is up, before the wait (the cluster starts
        the service remote workers join through there)."""
        from ..security import new_secret, require_shared_secret

        coordinator = self.config.coordinator
        self.secret = None if self.is_local else require_shared_secret(self.config)
        self.runtime_secret = self.secret or new_secret().encode()
        if self._profile_dir is None and self.is_local:
            self._temporary_profile = temporary_profile_dir()   # removed again by stop()
        profile_dir = (self._profile_dir or self._temporary_profile
                       or default_profile_dir(self.config.cluster_name))
        if self.secret is None and not self.is_local:
            write_local_secret(profile_dir, self.runtime_secret)   # for workers on this PC
        if self.launches_workers:
            from ..membership.launchers import prepare_launch   # probe every PC before anything starts
            prepare_launch(self.config, self.secret)
        # This PC's own client and engines reach the controller on loopback, never by the
        # configured host name (`system-a.local` need not resolve, not even here); other PCs
        # connect to the address they joined at (exo_lab.worker).
        self._ipp = make_ipp_cluster(
            profile_dir=profile_dir, controller_ip="0.0.0.0" if self.binds_lan else "127.0.0.1",
            controller_location=None,
            port=None if self.is_local else self.config.network.controller_port,
            session_key=session_key(self.secret) if self.secret else None)
        self._ipp.start_controller_sync()
        if on_controller is not None:
            on_controller()
        own = self.local_engines if self.is_local else (coordinator.engines if coordinator.is_compute else 0)
        if own:
            self._ipp.start_engines_sync(own, environment=self._own_engine_environment())
        if self.launches_workers:
            from ..membership.launchers import start_launched_workers   # stopped with the cluster (stop())
            start_launched_workers(self._ipp, self.config, self.secret)
        self._client = self._ipp.connect_client_sync()
        self._wait_for_engines(self.expected_engines)

    def _wait_for_engines(self, count: int) -> None:
        try:
            if self.launches_workers and self.config.launcher.kind == "ssh":
                from ..membership.launchers import wait_for_launched_engines   # a PC whose worker ended fails at once
                wait_for_launched_engines(self._client, self._ipp, count, self.start_timeout_s)
            else:
                self._client.wait_for_engines(count, timeout=self.start_timeout_s, interactive=False)
        except TimeoutError:
            raise ClusterError(self._missing_engines_message(count)) from None

    def _missing_engines_message(self, count: int) -> str:
        remote = [d.hostname for d in self.config.compute_devices if not d.is_coordinator]
        hint = (f"; on each compute PC ({', '.join(remote)}) run `python -m exo_lab.worker --config "
                f"{self.config.source}`" if remote else "")
        return (f"only {len(self.ids)} of {count} engines registered within {self.start_timeout_s:.0f} s"
                f"{hint}; engine logs are in {self._ipp.profile_dir}/log")

    def stop(self) -> None:
        """Close the client, stop the controller and every engine this PC started, and make sure
        their children (the controller's schedulers, each engine's nanny) end too. Takes well
        under a second; at most about ENGINE_EXIT_S + 2 x LEFTOVER_GRACE_S + launch.STOP_SECONDS_UNTIL_KILL."""
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._ipp is not None:
            if self.launches_workers:
                from ..membership.launchers import stop_launched_workers   # every PC at once
                stop_launched_workers(self._ipp)
            engines = _process_trees(self._engine_launchers())
            controller = _process_trees([self._ipp.controller])
            try:
                self._stop_engines_first(engines)
                self._ipp.stop_cluster_sync()
            except Exception:
                logger.exception("stopping the ipyparallel cluster failed")
            self._ipp = None
            _end_leftovers(engines + controller)
        if self._temporary_profile is not None:
            shutil.rmtree(self._temporary_profile, ignore_errors=True)
            self._temporary_profile = None

    def ends_on_stop(self, info: EngineInfo) -> bool:
        """Whether :meth:`stop` ends this engine's process (this PC's launchers started it)."""
        if self._ipp is None or not info.local:
            return False
        return any(getattr(getattr(launcher, "process", None), "pid", None) == info.pid
                   for launcher in self._engine_launchers())

    def _engine_launchers(self) -> list:
        return [launcher for engine_set in self._ipp.engines.values()
                for launcher in getattr(engine_set, "launchers", {}).values()]

    def _stop_engines_first(self, engines: list) -> None:
        """SIGTERM every engine at once (ipyparallel's stop waits for one engine after another)
        and give them ENGINE_EXIT_S while the controller is still up: each nanny then reports its
        engine's exit at once and ends, instead of waiting 3 s for a controller that is gone."""
        import psutil

        from ..lifeline import end_processes

        self._ipp.signal_engines_sync(signal.SIGTERM)
        _, stuck = psutil.wait_procs(engines, timeout=ENGINE_EXIT_S)
        end_processes(stuck, LEFTOVER_GRACE_S)     # busy in a native call: SIGKILL soon, not after 5 s

    def require_started(self) -> None:
        if self._client is None:
            raise ClusterError("the cluster is not started: call cluster.start() (or use `with cluster:`)")

    # ------------------------------------------------------------ calls
    def submit(self, engine_id: int, func, *args, **kwargs):
        """Start ``func(*args, **kwargs)`` on one engine; returns its AsyncResult (a Future)."""
        return self._client[engine_id].apply_async(func, *args, **kwargs)

    def call(self, engine_id: int, func, *args, timeout_s: float = DEFAULT_CALL_TIMEOUT_S,
             what: str = "a control call"):
        """``func(*args)`` on one engine. Raises the engine's exo-lab error, or ClusterError."""
        return self.call_many([engine_id], func, *args, timeout_s=timeout_s, what=what)[engine_id]

    def call_all(self, func, *args, timeout_s: float = DEFAULT_CALL_TIMEOUT_S, what: str = "probing"):
        return self.call_many(self.ids, func, *args, timeout_s=timeout_s, what=what)

    def call_many(self, engine_ids: list[int], func, *args, timeout_s: float, what: str) -> dict:
        """``func(*args)`` on several engines at once; raises the first failure."""
        results = self.gather(engine_ids, func, *args, timeout_s=timeout_s, what=what)
        for result in results.values():
            if isinstance(result, ExoLabError):
                raise result
        return results

    def gather(self, engine_ids: list[int], func, *args, timeout_s: float, what: str) -> dict:
        """``func(*args)`` on several engines at once, bounded by one timeout for all of them.
        Never raises: each engine's value is its result or the ExoLabError it caused."""
        pending, failed = {}, {}
        for eid in engine_ids:
            try:
                pending[eid] = self.submit(eid, func, *args)
            except Exception as exc:   # unregistered meanwhile: ipyparallel refuses the target
                failed[eid] = ClusterError(f"engine {eid} is not registered any more ({what}): {exc}")
        concurrent.futures.wait(list(pending.values()), timeout=timeout_s)
        return {**failed, **{eid: self._outcome(eid, ar, timeout_s, what) for eid, ar in pending.items()}}

    def result(self, engine_id: int, async_result, what: str):
        """The value of a finished AsyncResult, or the exo-lab error its engine raised."""
        outcome = self._outcome(engine_id, async_result, 0.0, what)
        if isinstance(outcome, ExoLabError):
            raise outcome
        return outcome

    def _outcome(self, engine_id: int, async_result, timeout_s: float, what: str):
        import ipyparallel as ipp

        if not async_result.done():
            return EngineTimeout(f"engine {engine_id} did not answer within {timeout_s:.0f} s while {what}")
        try:
            return async_result.get(0)
        except ipp.error.RemoteError as exc:
            return remote_error(engine_id, what, exc)
        except ipp.error.EngineError as exc:
            return ClusterError(f"engine {engine_id} died while {what}: {exc}")

    # ------------------------------------------------------------ engines
    def probe(self, *, survivors_only: bool = False, exclude: set[int] = frozenset()) -> list[EngineInfo]:
        """Probe every live engine, apply the config's limits (memory, cores, gpu) and set each
        engine's torch threads. Engines of PCs the config does not use are left out.
        ``survivors_only`` (after a failure): engines that do not answer within
        SURVIVOR_PROBE_S (dead, or hung) are left out instead of failing the probe; so are the
        engines in ``exclude`` (known lost)."""
        self.require_started()
        if survivors_only:
            alive = [eid for eid in self.ids if eid not in exclude]
            answers = self.gather(alive, engine_probe.probe_resources, True, timeout_s=SURVIVOR_PROBE_S,
                                  what="probing the survivors")
            probes = {eid: a for eid, a in answers.items() if not isinstance(a, ExoLabError)}
        else:
            probes = self.call_all(engine_probe.probe_resources, True)
        infos = self.engine_infos({eid: received(probe, Probe, f"engine {eid}") for eid, probe in probes.items()})
        for info in infos:
            self.call(info.engine_id, engine_probe.set_threads, info.threads, what="setting threads")
        self.infos = {info.engine_id: info for info in infos}
        return infos

    def measure_speeds(self, infos: list[EngineInfo], config: dict, dtype: str) -> list[EngineInfo]:
        """``infos`` with each CPU engine's decode speed for this model (``config``, a dict of
        config.json) and ``dtype`` measured (exo_lab.engine.speed): once per PC and thread
        count, on its first engine (engines of one PC with as many threads are alike, and equal
        figures let the planner split evenly between them), one PC after another; a PC whose
        config gives ``memory_bandwidth`` keeps that figure. An engine that cannot measure keeps
        its figure."""
        measured, known = [], {}
        for info in infos:
            device = None if self.is_local else self.config.device_named(info.device_name)
            if info.kind != "cpu" or (device is not None and device.memory_bandwidth_bytes_per_s):
                measured.append(info)
                continue
            key = (info.hostname, info.threads)
            if key in known:
                result = known[key]
            else:
                known[key] = result = self._measure(info, config, dtype)
            if isinstance(result, dict):
                info = dataclasses.replace(info, measured_ms=(result["layer_seconds"] * 1000,
                                                              result["head_seconds"] * 1000))
                self.infos[info.engine_id] = info
            measured.append(info)
        return measured

    def node_specs(self, infos: list[EngineInfo], factors: dict[str, float] | None = None) -> list[NodeSpec]:
        """The planner's nodes for ``infos``, each slowed by its factor seen while serving
        (``factors``, else :attr:`speed_factors`)."""
        factors = self.speed_factors if factors is None else factors
        return [slowed(info.node_spec(), factors.get(info.node, 1.0)) for info in infos]

    def _measure(self, info: EngineInfo, config: dict, dtype: str) -> dict | None:
        try:
            return self.call(info.engine_id, engine_speed.measure_decode, config, dtype,
                             what="measuring its decode speed", timeout_s=MEASURE_TIMEOUT_S)
        except ExoLabError as exc:
            logger.warning("engine %d could not measure its decode speed (%s); its PC plans with %.0f GB/s",
                           info.engine_id, exc, info.bandwidth_bytes_per_s / 1e9)
            return None

    def engine_infos(self, probes: dict[int, Probe]) -> list[EngineInfo]:
        """Each probed engine as the planner sees it, in engine id order: placed on a slot of its
        PC (GPU stages first, then CPU stages: planning.nodes.engine_slots, the rule
        ``exo-lab plan`` follows too), budgets capped by the config. Engines of PCs the config
        does not use are left out."""
        devices = {eid: device for eid in sorted(probes) if (device := self._device_for(eid, probes[eid]))}
        registered = Counter(device.hostname for device in devices.values())
        placed: Counter[str] = Counter()
        infos = []
        for eid, device in devices.items():
            # the configured engines, so a PC whose second engine is late plans as `exo-lab plan` does
            configured = self.local_engines if self.is_local else device.engines
            engines = max(configured, registered[device.hostname])
            infos.append(self._engine_info(eid, probes[eid], device, placed[device.hostname], engines))
            placed[device.hostname] += 1
        return infos

    def _engine_info(self, engine_id: int, probe: Probe, device: DeviceConfig, index: int, engines: int) -> EngineInfo:
        # planning.nodes reads the probe as the plain dict it was before it was typed
        slot = engine_slots(device, PcResources.from_probe(probe.to_dict()), engines, (self.max_memory_bytes,))[index]
        return EngineInfo(engine_id=engine_id, node=f"engine-{engine_id}" if self.is_local else slot.node,
                          hostname=probe.hostname, pid=probe.pid, device=slot.torch_device, kind=slot.kind,
                          budget_bytes=slot.budget_bytes, bandwidth_bytes_per_s=slot.bandwidth_bytes_per_s,
                          threads=self._threads_for(device, probe), local=probe.hostname == socket.gethostname(),
                          device_name=device.hostname, probe=probe, gpu_name=slot.gpu_name, device_note=slot.note)

    def _device_for(self, engine_id: int, probe: Probe) -> DeviceConfig | None:
        if self.is_local:
            return self.config.devices[0]
        name = probe.device_name or probe.hostname
        device = self.config.device_named(name)
        if device is not None and device.is_compute:
            return device
        if self.config.network.discovery == "auto":
            return DeviceConfig(hostname=name, roles=("compute",), max_memory_bytes=None, max_cores=None,
                                gpu=bool(probe.gpus), memory_bandwidth_bytes_per_s=None, engines=1,
                                address=None)
        logger.warning("engine %d on %s is not a compute device in %s (discovery: manual); not used",
                       engine_id, name, self.config.source)
        return None

    def _threads_for(self, device: DeviceConfig | None, probe: Probe | None = None) -> int:
        cores = probe.cores if probe is not None else os.cpu_count() or 1
        limits = [c for c in (self.max_cores, device.max_cores if device else None) if c]
        return max(1, min([cores, *limits]))

    def start_engines(self, count: int) -> None:
        """Start ``count`` more engines on this PC (they join as spares; a local cluster uses
        this to replace a lost engine)."""
        self.require_started()
        before = set(self.ids)
        self._ipp.start_engines_sync(count, environment=self._own_engine_environment())
        # not wait_for_engines: it gives up when another (lost) engine unregisters meanwhile
        deadline = time.monotonic() + self.start_timeout_s
        while len(set(self.ids) - before) < count:
            if time.monotonic() > deadline:
                raise ClusterError(self._missing_engines_message(len(before) + count))
            time.sleep(0.1)

    def _own_engine_environment(self) -> dict[str, str]:
        """The environment of the engines this PC starts (threads, device name, the secret)."""
        coordinator = self.config.coordinator
        return engine_environment(threads=self._threads_for(None if self.is_local else coordinator),
                                  device_name=None if self.is_local else coordinator.hostname,
                                  secret=self.runtime_secret)

    def is_gone(self, info: EngineInfo) -> bool:
        """The engine left the controller, or (on this machine) its process no longer exists:
        the pid check notices a killed engine before the heartbeat does."""
        import psutil

        return info.engine_id not in self.ids or (info.local and not psutil.pid_exists(info.pid))

    def state(self, engine_id: int) -> EngineState:
        """What the coordinator last set for this engine (IDLE when nothing was)."""
        return self._states.get(engine_id, EngineState.IDLE)

    def set_state(self, engine_id: int, state: EngineState) -> None:
        if not isinstance(state, EngineState):
            raise TypeError(f"set_state takes an EngineState, got {state!r} ({type(state).__name__})")
        self._states[engine_id] = state

    # ------------------------------------------------------------ addresses
    @property
    def inbox_ports(self) -> tuple[int, ...] | None:
        """The ports a data-plane inbox may take: ``network.port_range``'s data ports when the
        cluster listens on the LAN (firewalls allow that range); None (the OS picks) on loopback."""
        return self.config.network.data_ports if self.binds_lan else None

    def inbox_hosts(self, info: EngineInfo, stage_engines: list[EngineInfo]) -> tuple[str, str]:
        """(bind host, advertised host) for an engine's data-plane inbox in a pipeline of
        ``stage_engines``: loopback when every stage runs on this PC."""
        if not self.binds_lan or all(e.local for e in stage_engines):
            return "127.0.0.1", "127.0.0.1"
        if info.local:     # a remote stage sends to this PC's stage
            return "0.0.0.0", self._own_lan_host()
        device = self.config.device_named(info.device_name)
        # a discovered worker learnt its LAN address when it joined (probe "advertise_host")
        return "0.0.0.0", ((device.address if device else None) or info.probe.advertise_host
                           or info.device_name)

    def coordinator_inbox_hosts(self, stage_engines: list[EngineInfo]) -> tuple[str, str]:
        """(bind host, advertised host) for the coordinator's own inbox (the last stage sends there)."""
        if not self.binds_lan or all(e.local for e in stage_engines):
            return "127.0.0.1", "127.0.0.1"
        return "0.0.0.0", self._own_lan_host()

    def _own_lan_host(self) -> str:
        """How other PCs reach this one: the config's address, else the address a joining
        worker reached it at, else its first LAN address (never a name that may not resolve)."""
        from ..membership.discovery import lan_addresses

        coordinator = self.config.coordinator
        return coordinator.address or self.lan_address or next(iter(lan_addresses()), coordinator.hostname)

    # ------------------------------------------------------------ notebook access
    def view(self, engine_ids: list[int] | None = None):
        """An ipyparallel DirectView on these engines (all when None), for %%px and experiments."""
        self.require_started()
        return self._client[engine_ids if engine_ids is not None else self.ids]

    def queue_status(self) -> dict:
        """ipyparallel's per-engine queue counts (tasks queued, running, completed)."""
        self.require_started()
        return self._client.queue_status(verbose=False)


def _process_trees(launchers) -> list:
    """The processes ``launchers`` started on this PC (controller, engines, ssh clients) with
    their descendants, as psutil.Process: once an engine is gone its nanny is nobody's child."""
    import psutil

    processes = []
    for launcher in launchers:
        pid = getattr(getattr(launcher, "process", None), "pid", None)
        try:
            process = psutil.Process(pid) if pid else None
            processes += [process, *process.children(recursive=True)] if process else []
        except psutil.NoSuchProcess:
            pass
    return processes


def _end_leftovers(processes: list) -> None:
    """End whatever of ``processes`` outlived its launcher's stop (SIGTERM, then SIGKILL)."""
    from ..lifeline import end_processes

    left = [process for process in processes if _running(process)]
    if left:
        logger.info("ending %d process(es) left after stopping the cluster: %s", len(left),
                    ", ".join(str(process.pid) for process in left))
        end_processes(left, LEFTOVER_GRACE_S)


def _running(process) -> bool:
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class EngineTimeout(ClusterError):
    """An engine did not answer in time (it may be busy with a long %%px cell, or hung)."""


def remote_error(engine_id: int, what: str, exc) -> ExoLabError:
    """An engine-side exception as the same exo-lab error class, naming the engine."""
    from .. import errors

    cls = getattr(errors, getattr(exc, "ename", ""), None)
    if not (isinstance(cls, type) and issubclass(cls, ExoLabError)):
        cls = ClusterError
    return cls(f"engine {engine_id} failed while {what}: {exc.ename}: {exc.evalue}")

