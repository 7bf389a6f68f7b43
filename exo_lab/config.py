"""config.yaml: the cluster's description, read and checked in one place.

``load_config(path)`` is the only code in exo-lab that reads config.yaml. It returns a frozen
:class:`ClusterConfig` or raises :class:`~exo_lab.errors.ConfigError` with one message that
names the file, the device (its hostname, or ``devices[2]`` when it has none) and the key, says
what is wrong and what is allowed. Bad input is never replaced by a default: a typo in a key is
an error with the closest valid key suggested, a wrong type is an error, a size with an unknown
unit is an error.

The smallest valid file (``examples/config.yaml``)::

    cluster_name: engineering_cluster
    devices:
      - hostname: system-a.local
        roles: [coordinator, storage]
        max_memory: 128GB
        max_cores: 16
        gpu: false
      - hostname: system-b.local
        roles: [compute]
        max_memory: 128GB
        max_cores: 16
        gpu: true
    network:
      discovery: auto        # or manual: use the devices listed

Keys (every other key is an error):

==============================  ========  ===========  ============================================
key                             required  default      meaning
==============================  ========  ===========  ============================================
``cluster_name``                yes                    name of the cluster: letters, digits, ``.``,
                                                       ``_``, ``-`` (it may end up in file names)
``devices``                     yes                    list of the PCs, one mapping each (below)
``network``                     no        see below    mapping, keys below
``api``                         no        see below    mapping, keys below
``model``                       no        none         model to load: local folder, hub id or
                                                       ``demo``
``served_model_names``          no        the model    names the API answers to (``/v1/models``
                                          id           lists them; any is accepted as ``model``)
``dtype``                       no        none         ``float32`` | ``bfloat16`` | ``float16`` | ``int8``
``max_context``                 no        none         tokens per sequence the KV cache is sized
                                                       for (positive whole number)
``max_batch``                   no        8            KV slots: sequences decoded at once; the
                                                       KV cache is sized for them
``objective``                   no        none         planner objective: ``latency`` (fastest
                                                       single stream) | ``throughput`` (balance
                                                       the slowest stage)
``prefill_chunk``               no        256          prompt tokens fed per step, between decode
                                                       steps (the planner's workspace follows it)
``micro_batches``               no        stages       steps in flight at once (one per stage keeps
                                                       every PC busy; 1 when stages sharing a PC
                                                       have more threads than it has cores)
``max_queued``                  no        64           requests waiting for a KV slot; past it the
                                                       API answers 429
``replan``                      no        ``manual``   ``manual``: a worker that joins after load
                                                       stays a spare until ``cluster.replan()``;
                                                       ``auto``: the coordinator re-plans by itself
                                                       when engines join (or after a failure) and
                                                       loads the better plan
**devices[i]**
``hostname``                    yes                    the PC's host name; unique (case-insensitive)
``roles``                       yes                    list of ``coordinator`` | ``compute`` |
                                                       ``storage``; exactly one device in the
                                                       cluster is the coordinator and at least one
                                                       is compute
``max_memory``                  no        none (no     cap on the RAM the planner gives this PC
                                          cap)         (shared by its CPU stages): a size, see below
``max_cores``                   no        none (no     cap on the CPU threads torch uses here
                                          cap)         (positive whole number)
``gpu``                         no        ``false``    use this PC's GPU: ``true`` | ``false``
                                                       (a real boolean, not the string "yes")
``gpu_memory``                  no        probed free  cap on the GPU memory (VRAM) a GPU stage of
                                          VRAM         this PC gets: a size; ``max_memory`` caps
                                                       its RAM (a CPU stage there)
``memory_bandwidth``            no        none         speed hint for the planner: effective
                                                       memory bandwidth, a size with an optional
                                                       ``/s``, e.g. ``20GB/s`` (decode is
                                                       memory-bound) of this PC's RAM (its CPU
                                                       stages); none = 20 GB/s; a GPU stage is
                                                       planned at 500 GB/s
``engines``                     no        1; 2 with    ipyparallel engines (pipeline stages) this
                                          ``gpu:       PC runs; only on compute devices. A GPU PC
                                          true``       gives one to each GPU and the rest are CPU
                                                       stages in its RAM, so by default it holds a
                                                       GPU stage and a CPU stage (the planner uses
                                                       the CPU one only where it pays)
``address``                     no        hostname     host name or IP to connect to, when
                                                       ``hostname`` does not resolve
**network**
``discovery``                   no        ``manual``   ``auto``: the coordinator advertises the
                                                       cluster on the LAN (mDNS, with a proof of
                                                       the secret), workers find it with nothing
                                                       but this file, and engines of PCs not
                                                       listed are used too; ``manual``: workers
                                                       join the coordinator's ``address`` (or
                                                       hostname) and only the devices listed are
                                                       used
``port_range``                  no        ``10100-     every TCP port exo-lab listens on, on every
                                          10199``      PC, lies in it (one firewall rule per PC):
                                                       the service port, the controller's 30 ports
                                                       and the data-plane inboxes; only
                                                       ``api.port`` is outside it, and discovery
                                                       is UDP 5353 (at least 35 ports)
``controller_port``             no        range + 1    the first of the controller's 30 ports on the
                                                       coordinator (inside ``port_range``)
``hop_latency_ms``              no        none         planner hint: milliseconds one stage-to-
                                                       stage hop costs (>= 0); none = 0.5
``secret_file``                 no        none         file holding the cluster secret, the same
                                                       on every PC (``$EXO_LAB_SECRET`` wins over
                                                       it); a relative path is relative to
                                                       config.yaml's folder; the file must be
                                                       private to its owner (``chmod 600``; on
                                                       Windows ``exo-lab secret`` restricts it
                                                       with icacls and its ACL is not checked
                                                       when read).
                                                       None = no shared secret: the controller
                                                       and the data plane bind 127.0.0.1 only
                                                       (see exo_lab.security), so a config that
                                                       lists other PCs is refused without one
                                                       (``exo-lab secret secret.txt`` makes one)
``service_port``                no        range start  the coordinator's HTTP port where workers
                                                       join, and the storage PC's port where it
                                                       serves model files (inside ``port_range``)
**api**
``host``                        no        127.0.0.1    address the OpenAI-compatible API binds
``port``                        no        ``8000``     its port (1-65535)
``api_key_env``                 no        none         name of the environment variable holding
                                                       the API key (the name, never the key)
``api_key_file``                no        none         file holding the API key; a relative path
                                                       is relative to config.yaml's folder.
                                                       Set at most one of the two; none of them =
                                                       no key required
``max_connections``             no        ``256``      open connections the API accepts; past
                                                       it a new one gets a 503 and is closed
``max_connections_per_client``  no        ``64``       open connections one client address may
                                                       hold (at most ``max_connections``; the
                                                       default is a quarter of it); past it the
                                                       client's new ones get a 429 while other
                                                       clients still get in
``max_running_per_client``      no        none (all    KV slots one client's requests may hold at
                                          slots)       once; without a cap a client may use every
                                                       free slot, and when another client waits
                                                       the scheduler takes slots back until they
                                                       hold about as many each (fair share)
``max_queued_per_client``       no        ``16``       requests one client may have waiting for a
                                                       KV slot; past it that client gets a 429
                                                       naming this limit (``max_queued`` caps all
                                                       clients together, but a client's first
                                                       waiting request always fits). A client is
                                                       its address plus the API key it sent;
                                                       prompts are reused as cached prefixes only
                                                       within one client (and its ``user`` /
                                                       ``X-Exo-Lab-Isolation``, see
                                                       exo_lab.api.tenants)
``allowed_hosts``               no        none         list of extra names the API answers to in
                                                       the ``Host`` header; on a loopback
                                                       ``host`` only localhost, 127.0.0.1 and
                                                       [::1] are answered otherwise (DNS
                                                       rebinding defence)
**launcher** (``launcher: manual`` | a mapping; see exo_lab.coordinator.launchers)
``kind``                        no        ``manual``   ``manual``: workers are started by hand or
                                                       as a service; ``ssh``: the coordinator
                                                       starts ``python -m exo_lab.worker`` on each
                                                       compute PC over SSH (ipyparallel's
                                                       SSHEngineSetLauncher); ``slurm``: the
                                                       workers run as one Slurm job
                                                       (SlurmEngineSetLauncher). ssh and slurm
                                                       need a shared secret; slurm reads it from
                                                       ``network.secret_file`` and needs
                                                       ``discovery: auto``
``user``                        no        yours        ssh: login name on the compute PCs
``port``                        no        ``22``       ssh: sshd port (1-65535)
``python``                      no        this one     ssh, slurm: the Python (with exo-lab) on
                                                       the compute PCs; default: this process's
                                                       interpreter path
``identity_file``               no        ssh's own    ssh: private key file (``ssh -i``)
``shell``                       no        ``posix``    ssh: the PC's login shell, ``posix`` (sh,
                                                       bash) or ``powershell`` (Windows OpenSSH)
``options``                     no        none         ssh: list of extra ``ssh -o`` settings,
                                                       e.g. ``[StrictHostKeyChecking=accept-new]``
``config``                      no        this file    the config.yaml path on the compute PCs
                                                       (default: this file's absolute path, as on
                                                       a shared folder)
``devices``                     no        none         ssh: per-PC overrides, a mapping from a
                                                       compute hostname to ``user``, ``port``,
                                                       ``python``, ``identity_file``, ``shell``
``partition``                   no        site's       slurm: ``#SBATCH --partition``
``time``                        no        site's       slurm: ``#SBATCH --time`` (e.g. ``4:00:00``)
``account``                     no        none         slurm: ``#SBATCH --account``
``nodes``                       no        ``1``        slurm: nodes (one worker, one engine each)
==============================  ========  ===========  ============================================

Optional keys written with no value (``max_memory:``) are errors: delete the line to get the
default. Sizes (``max_memory``, ``gpu_memory``, ``memory_bandwidth``) are a whole byte count (``137438953472``
or ``"137438953472"``) or a number and a unit, with or without a space: ``128GB``, ``128 GiB``,
``512MB``, ``1.5TB``, ``64KiB``. As in accelerate's ``max_memory``, ``KB MB GB TB`` are powers
of 1000 and ``KiB MiB GiB TiB`` powers of 1024; ``B`` is bytes; units ignore case. Fractions
round down to whole bytes.
"""
from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from .errors import ConfigError
from .planning.options import OBJECTIVES
from .units import DTYPES, describe_value, format_bytes, parse_bandwidth, parse_size

ROLES = ("coordinator", "compute", "storage")
DISCOVERY_MODES = ("auto", "manual")
REPLAN_MODES = ("manual", "auto")

_TOP_KEYS = ("cluster_name", "devices", "network", "api", "model", "served_model_names", "dtype", "max_context",
             "max_batch", "objective", "replan", "prefill_chunk", "micro_batches", "max_queued", "launcher")
_DEVICE_KEYS = ("hostname", "roles", "max_memory", "max_cores", "gpu", "gpu_memory", "memory_bandwidth",
                "engines", "address")
_NETWORK_KEYS = ("discovery", "port_range", "controller_port", "hop_latency_ms", "service_port", "secret_file")
_API_KEYS = ("host", "port", "api_key_env", "api_key_file", "max_connections", "allowed_hosts",
             "max_connections_per_client", "max_running_per_client", "max_queued_per_client")
LAUNCHER_KINDS = ("manual", "ssh", "slurm")
SSH_SHELLS = ("posix", "powershell")
_SSH_HOST_KEYS = ("user", "port", "python", "identity_file", "shell")
_LAUNCHER_KEYS = ("kind", *_SSH_HOST_KEYS, "options", "config", "devices", "partition", "time", "account", "nodes")
_LAUNCHER_ONLY = {"ssh": ("user", "port", "identity_file", "options", "devices"), "slurm": ("partition", "time", "account", "nodes")}

_CLUSTER_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_ENV_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# --------------------------------------------------------------------------- value types

@dataclass(frozen=True)
class DeviceConfig:
    """One PC of the cluster, as config.yaml describes it."""

    hostname: str
    roles: tuple[str, ...]              # subset of ROLES, in the order written
    max_memory_bytes: int | None        # None: no cap beyond what the PC has free
    max_cores: int | None               # None: no cap on torch threads
    gpu: bool
    memory_bandwidth_bytes_per_s: float | None   # planner speed hint; None: measure or estimate
    engines: int = 1                    # ipyparallel engines (pipeline stages) on this PC
    address: str | None = None          # where to connect when hostname does not resolve
    gpu_memory_bytes: int | None = None  # cap on the VRAM a GPU stage of this PC gets; None: probed free VRAM

    @property
    def is_coordinator(self) -> bool:
        return "coordinator" in self.roles

    @property
    def is_compute(self) -> bool:
        return "compute" in self.roles

    @property
    def is_storage(self) -> bool:
        return "storage" in self.roles


DEFAULT_PORT_RANGE = (10100, 10199)
CONTROLLER_PORT_SPAN = 30   # the ipyparallel controller listens on [controller_port, controller_port + span)
MIN_PORT_RANGE = CONTROLLER_PORT_SPAN + 1 + 4   # controller, service, and a few data-plane inboxes


@dataclass(frozen=True)
class NetworkConfig:
    """How the PCs reach each other. Every TCP port exo-lab listens on, on every PC, lies in
    ``port_range`` (inclusive), so one firewall rule per PC is enough: ``service_port`` (join and
    model files), the controller's ``[controller_port, controller_port + CONTROLLER_PORT_SPAN)``
    on the coordinator, and the data-plane inboxes in the rest (:attr:`data_ports`). Only the
    API's ``api.port`` lies outside it; discovery is UDP 5353."""

    discovery: str = "manual"           # "auto" | "manual"
    controller_port: int = DEFAULT_PORT_RANGE[0] + 1    # ipyparallel's first port on the coordinator
    hop_latency_ms: float | None = None  # planner hint per stage-to-stage hop; None: estimate
    secret_file: str | None = None      # cluster secret file (absolute once loaded from a file)
    service_port: int = DEFAULT_PORT_RANGE[0]   # HTTP: workers join here; the storage PC serves files here
    port_range: tuple[int, int] = DEFAULT_PORT_RANGE   # (first, last), both included

    @property
    def controller_ports(self) -> range:
        return range(self.controller_port, self.controller_port + CONTROLLER_PORT_SPAN)

    @property
    def data_ports(self) -> tuple[int, ...]:
        """The ports of the range left for data-plane inboxes, in the order they are tried."""
        first, last = self.port_range
        taken = set(self.controller_ports) | {self.service_port}
        return tuple(port for port in range(first, last + 1) if port not in taken)

    @property
    def port_range_text(self) -> str:
        return f"{self.port_range[0]}-{self.port_range[1]}"


@dataclass(frozen=True)
class ApiConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key_env: str | None = None      # environment variable NAME holding the key
    api_key_file: str | None = None     # file holding the key (absolute once loaded from a file)
    max_connections: int = 256          # open connections; past it a new one gets a 503
    allowed_hosts: tuple[str, ...] = ()  # extra names the API answers to in the Host header
    max_connections_per_client: int = 64    # per client address; default max_connections // 4
    max_running_per_client: int | None = None  # KV slots one client holds; None: fair share only
    max_queued_per_client: int = 16     # requests one client has waiting for a slot


@dataclass(frozen=True)
class SSHHostConfig:
    """How to reach one PC over SSH (launcher ``ssh``); None: ssh's own default."""

    user: str | None = None
    port: int | None = None
    python: str | None = None           # the remote interpreter; None: this process's path
    identity_file: str | None = None    # absolute once loaded from a file
    shell: str | None = None            # the login shell on that PC: "posix" | "powershell"; None: posix


@dataclass(frozen=True)
class LauncherConfig:
    """Who starts the compute PCs' workers: by hand (``manual``), over SSH, or as a Slurm job."""

    kind: str = "manual"                # "manual" | "ssh" | "slurm"
    ssh: SSHHostConfig = field(default_factory=SSHHostConfig)      # defaults for every PC
    hosts: tuple[tuple[str, SSHHostConfig], ...] = ()                # per-PC overrides
    options: tuple[str, ...] = ()       # extra `ssh -o` settings, e.g. StrictHostKeyChecking=accept-new
    config: str | None = None           # config.yaml path on the compute PCs; None: the same path
    partition: str | None = None        # slurm
    time: str | None = None             # slurm, e.g. "4:00:00"
    account: str | None = None          # slurm
    nodes: int = 1                      # slurm: one worker (one engine) per node

    def ssh_for(self, hostname: str) -> SSHHostConfig:
        """The SSH settings of one PC: its overrides on top of the defaults."""
        own = next((c for name, c in self.hosts if same_host(name, hostname)), SSHHostConfig())
        return SSHHostConfig(**{key: getattr(own, key) if getattr(own, key) is not None
                                else getattr(self.ssh, key) for key in _SSH_HOST_KEYS})




@dataclass(frozen=True)
class ClusterConfig:
    """The whole of config.yaml, checked. Build it with :func:`load_config`."""

    cluster_name: str
    devices: tuple[DeviceConfig, ...]
    network: NetworkConfig = field(default_factory=NetworkConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    model: str | None = None
    served_model_names: tuple[str, ...] = ()   # names the API answers to; () = the model id
    dtype: str | None = None            # "float32" | "bfloat16" | "float16" | "int8" | None
    max_context: int | None = None
    max_batch: int | None = None
    prefill_chunk: int | None = None
    micro_batches: int | None = None
    max_queued: int | None = None
    objective: str | None = None        # "latency" | "throughput" | None
    replan: str = "manual"              # "manual" | "auto": re-plan by itself when engines join
    source: str = "<dict>"              # the file it came from, for messages

    @property
    def coordinator(self) -> DeviceConfig:
        """The one device with the coordinator role."""
        found = [d for d in self.devices if d.is_coordinator]
        if len(found) != 1:
            raise ConfigError(f"{self.source}: expected exactly one coordinator device, "
                              f"found {len(found)}")
        return found[0]

    @property
    def compute_devices(self) -> tuple[DeviceConfig, ...]:
        return tuple(d for d in self.devices if d.is_compute)

    @property
    def storage_devices(self) -> tuple[DeviceConfig, ...]:
        return tuple(d for d in self.devices if d.is_storage)

    def device_named(self, name: str) -> DeviceConfig | None:
        """The device whose hostname is ``name`` (by :func:`same_host`), or None."""
        return next((d for d in self.devices if same_host(d.hostname, name)), None)


# --------------------------------------------------------------------------- host names

def same_host(a: str, b: str) -> bool:
    """Whether two host names mean the same PC: case-insensitive, a trailing dot ignored, and
    a short name matching its qualified form (``system-b`` is ``system-b.local``). The one
    host-name rule of exo-lab."""
    a, b = a.lower().rstrip("."), b.lower().rstrip(".")
    return a == b or a.split(".")[0] == b.split(".")[0]


def is_this_machine(hostname: str) -> bool:
    """Whether ``hostname`` names the PC this runs on (its host name, FQDN or localhost)."""
    import socket

    here = (socket.gethostname(), socket.getfqdn(), "localhost", "127.0.0.1")
    return any(same_host(hostname, name) for name in here)


# --------------------------------------------------------------------------- loading

def load_config(path: str | os.PathLike) -> ClusterConfig:
    """Read, parse and check a config.yaml.

    Returns the :class:`ClusterConfig`; ``source`` is the path as given, and a relative
    ``api.api_key_file`` is made absolute against the file's folder.

    Raises:
        ConfigError: the file is missing or unreadable, is not valid YAML (the message gives the
            line), or breaks a rule of the module docstring's table. The message names the file,
            the device and the key.
    """
    source = os.fspath(path)
    data = _parse_yaml(_read_text(Path(source)), source)
    if data is None:
        raise ConfigError(f"{source}: the file is empty; it needs at least cluster_name and "
                          f"devices (see examples/config.yaml)")
    config = config_from_dict(data, source=source)
    return _resolve_paths(config, Path(source).parent)


def config_from_dict(data: object, *, source: str = "<dict>") -> ClusterConfig:
    """Check an already-parsed config (a dict as yaml.safe_load returns it) and build the
    :class:`ClusterConfig`. ``source`` names the origin in messages. Raises ConfigError."""
    top = _Scope(source, None, "the top level of the file")
    mapping = _require_mapping(top, data, "the configuration",
                               "start the file with 'cluster_name: ...' and 'devices:'")
    _reject_unknown_keys(top, mapping, _TOP_KEYS)
    _require_keys(top, mapping, ("cluster_name", "devices"))
    cluster_name = _parse_cluster_name(top, mapping["cluster_name"])
    devices = _parse_devices(top, mapping["devices"])
    _check_cluster(top, devices)
    return ClusterConfig(
        cluster_name=cluster_name,
        devices=devices,
        network=_parse_network(top, mapping),
        api=_parse_api(top, mapping),
        launcher=_parse_launcher(top, mapping, devices),
        model=_optional(top, mapping, "model", _nonblank_string),
        served_model_names=_optional(top, mapping, "served_model_names", _name_list, default=()),
        dtype=_optional(top, mapping, "dtype", _choice(DTYPES)),
        max_context=_optional(top, mapping, "max_context", _positive_int),
        max_batch=_optional(top, mapping, "max_batch", _positive_int),
        objective=_optional(top, mapping, "objective", _choice(OBJECTIVES)),
        prefill_chunk=_optional(top, mapping, "prefill_chunk", _positive_int),
        micro_batches=_optional(top, mapping, "micro_batches", _positive_int),
        max_queued=_optional(top, mapping, "max_queued", _positive_int),
        replan=_optional(top, mapping, "replan", _choice(REPLAN_MODES), default="manual"),
        source=source,
    )


def format_config_summary(cfg: ClusterConfig) -> str:
    """A few lines for a terminal: cluster name, discovery, then one line per device
    (hostname, roles, max_memory, max_cores, gpu), then the optional settings that are set."""
    lines = [f"cluster {cfg.cluster_name} ({cfg.source})",
             _network_line(cfg.network),
             f"devices ({len(cfg.devices)}):"]
    width = max(len(d.hostname) for d in cfg.devices) if cfg.devices else 0
    role_width = max(len(",".join(d.roles)) for d in cfg.devices) if cfg.devices else 0
    lines += [_device_line(d, width, role_width) for d in cfg.devices]
    settings = [f"{name} {value}" for name, value in (
        ("model", cfg.model), ("dtype", cfg.dtype), ("max_context", cfg.max_context),
        ("max_batch", cfg.max_batch), ("objective", cfg.objective)) if value is not None]
    if settings:
        lines.append("settings: " + ", ".join(settings))
    lines.append(f"api: {cfg.api.host}:{cfg.api.port}, {_api_key_text(cfg.api)}")
    if cfg.launcher.kind != "manual":
        lines.append(_launcher_line(cfg.launcher))
    return "\n".join(lines)


def _launcher_line(launcher: LauncherConfig) -> str:
    if launcher.kind == "slurm":
        settings = [f"{name} {value}" for name, value in (("partition", launcher.partition),
                    ("account", launcher.account), ("time", launcher.time)) if value]
        return f"launcher: slurm, {launcher.nodes} node(s)" + "".join(f", {s}" for s in settings)
    ssh = launcher.ssh
    where = f"{ssh.user + '@' if ssh.user else ''}PC:{ssh.port or 22}"
    return f"launcher: ssh ({where}, python {ssh.python or 'as here'}" + (
        f", {len(launcher.hosts)} PC override(s))" if launcher.hosts else ")")


def _api_key_text(api: ApiConfig) -> str:
    if api.api_key_env is not None:
        return f"key from environment variable {api.api_key_env}"
    if api.api_key_file is not None:
        return f"key from file {api.api_key_file}"
    return "no key required"


def _network_line(network: NetworkConfig) -> str:
    line = (f"discovery: {network.discovery}, ports {network.port_range_text} (service {network.service_port}, "
            f"controller {network.controller_ports.start}-{network.controller_ports.stop - 1})")
    if network.hop_latency_ms is not None:
        line += f", hop latency {network.hop_latency_ms:g} ms"
    if os.environ.get("EXO_LAB_SECRET"):     # exo_lab.security.load_secret: the environment wins
        line += ", secret from $EXO_LAB_SECRET"
    else:
        line += f", secret from {network.secret_file}" if network.secret_file else ", no shared secret"
    return line


def _device_line(device: DeviceConfig, width: int, role_width: int) -> str:
    memory = "no cap" if device.max_memory_bytes is None else format_bytes(device.max_memory_bytes)
    cores = "no cap" if device.max_cores is None else str(device.max_cores)
    line = (f"  {device.hostname:<{width}}  {','.join(device.roles):<{role_width}}  "
            f"max_memory {memory}  max_cores {cores}  gpu {'yes' if device.gpu else 'no'}")
    if device.engines != 1:
        line += f"  engines {device.engines}"
    if device.memory_bandwidth_bytes_per_s is not None:
        line += f"  bandwidth {format_bytes(round(device.memory_bandwidth_bytes_per_s))}/s"
    if device.address is not None:
        line += f"  address {device.address}"
    return line


# --------------------------------------------------------------------------- file and YAML

def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path} (absolute: {path.absolute()}); "
                          f"check the path, or start from examples/config.yaml") from exc
    except IsADirectoryError as exc:
        raise ConfigError(f"{path}: is a folder, not a config file; give the path of the "
                          f".yaml file") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from exc
    try:
        return raw.decode("utf-8-sig")   # -sig: Windows editors may write a byte-order mark
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start} is invalid); save the "
                          f"file as UTF-8") from exc


class _StrictSafeLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, plus an error on a key repeated in one mapping: plain PyYAML
    keeps the last value silently, which would hide e.g. a second ``max_memory`` line."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: set = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:
                    continue    # unhashable key: the base class reports it
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"found duplicate key {key!r}; each key may appear once per mapping",
                        key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str, source: str) -> object:
    try:
        return yaml.load(text, Loader=_StrictSafeLoader)   # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        raise ConfigError(_yaml_error_message(exc, source)) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {exc}") from exc


def _yaml_error_message(exc: yaml.MarkedYAMLError, source: str) -> str:
    mark = exc.problem_mark or exc.context_mark
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    message = f"{source}: invalid YAML{where}: {exc.problem or exc.context}"
    if exc.context and exc.problem and exc.context_mark is not None:
        message += f" ({exc.context} started at line {exc.context_mark.line + 1})"
    return message + "; check the indentation and quoting near that line"


def _resolve_paths(config: ClusterConfig, base: Path) -> ClusterConfig:
    """File names in the config, made absolute against the config file's folder."""
    if config.api.api_key_file is not None:
        config = replace(config, api=replace(config.api, api_key_file=_absolute(config.api.api_key_file, base)))
    if config.network.secret_file is not None:
        config = replace(config, network=replace(config.network,
                                                 secret_file=_absolute(config.network.secret_file, base)))
    launcher = config.launcher
    if launcher.ssh.identity_file is not None:
        launcher = replace(launcher, ssh=replace(launcher.ssh, identity_file=_absolute(launcher.ssh.identity_file, base)))
    launcher = replace(launcher, hosts=tuple(
        (name, replace(c, identity_file=_absolute(c.identity_file, base)) if c.identity_file else c)
        for name, c in launcher.hosts))
    return replace(config, launcher=launcher)


def _absolute(name: str, base: Path) -> str:
    resolved = Path(os.path.expanduser(name))
    return str(resolved if resolved.is_absolute() else (base / resolved).absolute())


# --------------------------------------------------------------------------- checking helpers

@dataclass(frozen=True)
class _Scope:
    """Where a value sits, for messages: the file, and the device or section."""

    source: str
    label: str | None          # "device 'system-b.local'", "devices[2]", "network", or None
    in_phrase: str             # used in "unknown key 'x' in <in_phrase>"

    def error(self, message: str) -> ConfigError:
        prefix = f"{self.source}: {self.label}: " if self.label else f"{self.source}: "
        return ConfigError(prefix + message)


def _require_mapping(scope: _Scope, value: object, name: str, fix: str) -> dict:
    if not isinstance(value, dict):
        raise scope.error(f"{name} must be a mapping of keys to values, got {describe_value(value)}; "
                          f"{fix}")
    return value


def _reject_unknown_keys(scope: _Scope, mapping: dict, allowed: tuple[str, ...]) -> None:
    for key in mapping:
        if key in allowed:
            continue
        close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'?" if close else "it is not a config key."
        raise ConfigError(f"{scope.source}: unknown key '{key}' in {scope.in_phrase}; {hint} "
                          f"Allowed keys: {', '.join(allowed)}")


def _require_keys(scope: _Scope, mapping: dict, required: tuple[str, ...]) -> None:
    for key in required:
        if key not in mapping:
            raise scope.error(f"missing required key '{key}' (required: {', '.join(required)})")


def _optional(scope: _Scope, mapping: dict, key: str, check, default=None):
    """The checked value of an optional key, or ``default`` when the key is absent."""
    if key not in mapping:
        return default
    value = mapping[key]
    if value is None:
        raise scope.error(f"'{key}' has no value; give one or delete the line to use the "
                          f"default")
    return check(scope, key, value)


def _positive_int(scope: _Scope, key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise scope.error(f"'{key}' must be a positive whole number, got {describe_value(value)}")
    if value <= 0:
        raise scope.error(f"'{key}' must be a positive whole number (1 or more), got {value}")
    return value


def _port(scope: _Scope, key: str, value: object) -> int:
    port = _positive_int(scope, key, value)
    if port > 65535:
        raise scope.error(f"'{key}' must be a TCP port from 1 to 65535, got {port}")
    return port


def _boolean(scope: _Scope, key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise scope.error(f"'{key}' must be true or false, got {describe_value(value)}; write "
                          f"{key}: true or {key}: false without quotes")
    return value


def _non_negative_float(scope: _Scope, key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise scope.error(f"'{key}' must be a number, got {describe_value(value)}")
    if not math.isfinite(value) or value < 0:
        raise scope.error(f"'{key}' must be a finite number, 0 or more, got {value}")
    return float(value)


def _nonblank_string(scope: _Scope, key: str, value: object) -> str:
    if not isinstance(value, str):
        raise scope.error(f"'{key}' must be a string, got {describe_value(value)}; put it in quotes")
    if not value.strip() or value != value.strip():
        raise scope.error(f"'{key}' must be a non-empty string without leading or trailing "
                          f"spaces, got {value!r}")
    return value


def _single_word(scope: _Scope, key: str, value: object) -> str:
    text = _nonblank_string(scope, key, value)
    if any(ch.isspace() for ch in text):
        raise scope.error(f"'{key}' must not contain spaces, got {text!r}")
    return text


def _choice(allowed: tuple[str, ...]):
    def check(scope: _Scope, key: str, value: object) -> str:
        if not isinstance(value, str) or value not in allowed:
            close = difflib.get_close_matches(str(value), allowed, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise scope.error(f"'{key}' must be one of {', '.join(allowed)}; got "
                              f"{describe_value(value)}{hint}")
        return value
    return check


def _size(scope: _Scope, key: str, value: object) -> int:
    try:
        size = parse_size(value, what=key)
    except ConfigError as exc:
        raise scope.error(str(exc)) from exc
    if size == 0:
        raise scope.error(f"'{key}' must be more than zero, got {value!r}; delete the line "
                          f"for no cap")
    return size


def _bandwidth(scope: _Scope, key: str, value: object) -> float:
    try:
        rate = parse_bandwidth(value, what=key)
    except ConfigError as exc:
        raise scope.error(f"{exc} (bytes per second, e.g. '20GB/s')") from exc
    if rate <= 0:
        raise scope.error(f"'{key}' must be more than zero, got {value!r}")
    return rate


# --------------------------------------------------------------------------- sections

def _parse_cluster_name(scope: _Scope, value: object) -> str:
    name = _nonblank_string(scope, "cluster_name", value)
    if not _CLUSTER_NAME_PATTERN.match(name):
        raise scope.error(f"'cluster_name' may contain only letters, digits, '.', '_' and '-' "
                          f"and must start with a letter or digit, got {name!r} "
                          f"(e.g. engineering_cluster)")
    return name


def _parse_devices(top: _Scope, value: object) -> tuple[DeviceConfig, ...]:
    if value is None or not isinstance(value, list):
        raise top.error(f"'devices' must be a list of devices (lines starting with '- "
                        f"hostname: ...'), got {describe_value(value)}")
    if not value:
        raise top.error("'devices' is empty; list the coordinator and at least one compute PC")
    return tuple(_parse_device(top.source, index, entry) for index, entry in enumerate(value))


def _device_scope(source: str, index: int, entry: object) -> _Scope:
    hostname = entry.get("hostname") if isinstance(entry, dict) else None
    if isinstance(hostname, str) and hostname.strip():
        label = f"device '{hostname}'"
    else:
        label = f"devices[{index}]"
    return _Scope(source, label, label)


def _parse_device(source: str, index: int, entry: object) -> DeviceConfig:
    scope = _device_scope(source, index, entry)
    mapping = _require_mapping(scope, entry, "a device",
                               "write each device as '- hostname: ...' with roles below it")
    _reject_unknown_keys(scope, mapping, _DEVICE_KEYS)
    _require_keys(scope, mapping, ("hostname", "roles"))
    hostname = _single_word(scope, "hostname", mapping["hostname"])
    roles = _parse_roles(scope, mapping["roles"])
    gpu = _optional(scope, mapping, "gpu", _boolean, default=False)
    # a GPU PC's second engine is a CPU stage in its RAM (planning/nodes.py: GPU first, then RAM)
    engines = _optional(scope, mapping, "engines", _positive_int, default=2 if gpu and "compute" in roles else 1)
    if "engines" in mapping and "compute" not in roles:
        raise scope.error("'engines' is set but the device has no 'compute' role; engines run "
                          "only on compute devices: add compute to roles or delete engines")
    return DeviceConfig(
        hostname=hostname,
        roles=roles,
        max_memory_bytes=_optional(scope, mapping, "max_memory", _size),
        max_cores=_optional(scope, mapping, "max_cores", _positive_int),
        gpu=gpu,
        memory_bandwidth_bytes_per_s=_optional(scope, mapping, "memory_bandwidth", _bandwidth),
        engines=engines,
        address=_optional(scope, mapping, "address", _single_word),
        gpu_memory_bytes=_optional(scope, mapping, "gpu_memory", _size),
    )


def _parse_roles(scope: _Scope, value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise scope.error(f"'roles' must be a list like [compute] or [coordinator, storage], "
                          f"got {describe_value(value)}")
    if not value:
        raise scope.error(f"'roles' is empty; give at least one of {', '.join(ROLES)}")
    roles: list[str] = []
    for role in value:
        if role not in ROLES:
            close = difflib.get_close_matches(str(role), ROLES, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else "."
            raise scope.error(f"unknown role {role!r} in 'roles'{hint} Allowed roles: "
                              f"{', '.join(ROLES)}")
        if role in roles:
            raise scope.error(f"'roles' lists {role!r} twice; list each role once")
        roles.append(role)
    return tuple(roles)


def _check_cluster(top: _Scope, devices: tuple[DeviceConfig, ...]) -> None:
    _check_unique_hostnames(top, devices)
    coordinators = [d.hostname for d in devices if d.is_coordinator]
    if not coordinators:
        raise top.error("no device has the 'coordinator' role; add coordinator to the roles of "
                        "the PC that runs the controller and the API (exactly one)")
    if len(coordinators) > 1:
        raise top.error(f"more than one coordinator: {', '.join(coordinators)}; exactly one "
                        f"device may have the 'coordinator' role")
    if not any(d.is_compute for d in devices):
        raise top.error("no device has the 'compute' role; add compute to the roles of at "
                        "least one PC (the coordinator may also be a compute device)")


def _check_unique_hostnames(top: _Scope, devices: tuple[DeviceConfig, ...]) -> None:
    # Host names are case-insensitive, so System-A.local and system-a.local are one PC.
    first_index: dict[str, int] = {}
    for index, device in enumerate(devices):
        key = device.hostname.lower()
        if key in first_index:
            raise top.error(f"duplicate hostname '{device.hostname}': devices[{first_index[key]}] "
                            f"and devices[{index}] name the same PC; list each PC once (use "
                            f"'engines' for several stages on one PC)")
        first_index[key] = index


def _parse_network(top: _Scope, mapping: dict) -> NetworkConfig:
    if "network" not in mapping:
        return NetworkConfig()
    scope = _Scope(top.source, "network", "network")
    section = _require_mapping(top, mapping["network"], "'network'",
                               "write e.g. 'network:' then '  discovery: manual' below it")
    _reject_unknown_keys(scope, section, _NETWORK_KEYS)
    first, last = _optional(scope, section, "port_range", _port_range, default=DEFAULT_PORT_RANGE)
    network = NetworkConfig(
        discovery=_optional(scope, section, "discovery", _choice(DISCOVERY_MODES),
                            default=NetworkConfig.discovery),
        port_range=(first, last),
        service_port=_optional(scope, section, "service_port", _port, default=first),
        controller_port=_optional(scope, section, "controller_port", _port, default=first + 1),
        hop_latency_ms=_optional(scope, section, "hop_latency_ms", _non_negative_float),
        secret_file=_optional(scope, section, "secret_file", _nonblank_string),
    )
    _check_ports_in_range(scope, network)
    return network


def _port_range(scope: _Scope, key: str, value: object) -> tuple[int, int]:
    text = value if isinstance(value, str) else None
    found = re.fullmatch(r"\s*(\d{1,5})\s*-\s*(\d{1,5})\s*", text or "")
    if found is None:
        raise scope.error(f"'{key}' must be two TCP ports joined by '-', like 10100-10199, got "
                          f"{describe_value(value)}")
    first, last = int(found.group(1)), int(found.group(2))
    if not 1 <= first <= last <= 65535:
        raise scope.error(f"'{key}' must run from a lower to a higher port within 1-65535, got {text.strip()}")
    if last - first + 1 < MIN_PORT_RANGE:
        raise scope.error(f"'{key}' {first}-{last} holds {last - first + 1} ports; exo-lab needs at least "
                          f"{MIN_PORT_RANGE} (the controller takes {CONTROLLER_PORT_SPAN}), e.g. "
                          f"{first}-{first + 99}")
    return first, last


def _check_ports_in_range(scope: _Scope, network: NetworkConfig) -> None:
    first, last = network.port_range
    where = f"network.port_range {network.port_range_text}"
    if not first <= network.service_port <= last:
        raise scope.error(f"'service_port' {network.service_port} is outside {where}; every port exo-lab "
                          f"listens on lies in the range (delete service_port to use {first})")
    controller = network.controller_ports
    if controller.start < first or controller.stop - 1 > last:
        raise scope.error(f"'controller_port' {network.controller_port} puts the controller's "
                          f"{CONTROLLER_PORT_SPAN} ports ({controller.start}-{controller.stop - 1}) outside "
                          f"{where} (delete controller_port to use {first + 1})")
    if network.service_port in controller:
        raise scope.error(f"'service_port' {network.service_port} is one of the controller's ports "
                          f"{controller.start}-{controller.stop - 1}; pick one outside them")
    if len(network.data_ports) < 2:
        raise scope.error(f"{where} leaves no ports for the data plane; widen it (e.g. {first}-{first + 99})")


def _parse_api(top: _Scope, mapping: dict) -> ApiConfig:
    if "api" not in mapping:
        return ApiConfig()
    scope = _Scope(top.source, "api", "api")
    section = _require_mapping(top, mapping["api"], "'api'",
                               "write e.g. 'api:' then '  port: 8000' below it")
    _reject_unknown_keys(scope, section, _API_KEYS)
    if "api_key_env" in section and "api_key_file" in section:
        raise scope.error("set only one of 'api_key_env' and 'api_key_file', not both")
    defaults = ApiConfig()
    max_connections = _optional(scope, section, "max_connections", _positive_int, default=defaults.max_connections)
    return ApiConfig(
        host=_optional(scope, section, "host", _single_word, default=defaults.host),
        port=_optional(scope, section, "port", _port, default=defaults.port),
        api_key_env=_optional(scope, section, "api_key_env", _env_name),
        api_key_file=_optional(scope, section, "api_key_file", _nonblank_string),
        max_connections=max_connections,
        allowed_hosts=_optional(scope, section, "allowed_hosts", _host_list, default=()),
        max_connections_per_client=_connections_per_client(scope, section, max_connections),
        max_running_per_client=_optional(scope, section, "max_running_per_client", _positive_int),
        max_queued_per_client=_optional(scope, section, "max_queued_per_client", _positive_int,
                                        default=defaults.max_queued_per_client),
    )


def _connections_per_client(scope: _Scope, section: dict, max_connections: int) -> int:
    """``max_connections_per_client``: at most ``max_connections``; default a quarter of it, so
    one client cannot fill the server's cap."""
    value = _optional(scope, section, "max_connections_per_client", _positive_int,
                      default=max(1, max_connections // 4))
    if value > max_connections:
        raise scope.error(f"'max_connections_per_client' is {value} but 'max_connections' is {max_connections}: "
                          f"one client cannot hold more than the server accepts; set it to at most "
                          f"{max_connections} (leave room for other clients, e.g. {max(1, max_connections // 4)})")
    return value


def _name_list(scope: _Scope, key: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise scope.error(f"'{key}' must be a list of names like [llama-70b, gpt-4o], got "
                          f"{describe_value(value)}")
    names = tuple(_single_word(scope, f"{key}[{index}]", name) for index, name in enumerate(value))
    if len(set(names)) != len(names):
        raise scope.error(f"'{key}' lists a name twice: {', '.join(names)}")
    return names


def _host_list(scope: _Scope, key: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise scope.error(f"'{key}' must be a list of host names like [llm.example.lan], got "
                          f"{describe_value(value)}")
    return tuple(_single_word(scope, f"{key}[{index}]", name) for index, name in enumerate(value))


def _env_name(scope: _Scope, key: str, value: object) -> str:
    name = _nonblank_string(scope, key, value)
    if not _ENV_NAME_PATTERN.match(name):
        # Usually the key itself was pasted here; it must not live in config.yaml.
        raise scope.error(f"'{key}' must be the NAME of an environment variable (letters, "
                          f"digits, '_'), e.g. EXO_LAB_API_KEY, not the key itself")
    return name


def _parse_launcher(top: _Scope, mapping: dict, devices: tuple[DeviceConfig, ...]) -> LauncherConfig:
    if "launcher" not in mapping:
        return LauncherConfig()
    scope = _Scope(top.source, "launcher", "launcher")
    section = mapping["launcher"]
    if isinstance(section, str):
        section = {"kind": section}          # `launcher: ssh` is `launcher: {kind: ssh}`
    section = _require_mapping(top, section, "'launcher'",
                               "write 'launcher: manual', or 'launcher:' then '  kind: ssh' below it")
    _reject_unknown_keys(scope, section, _LAUNCHER_KEYS)
    kind = _optional(scope, section, "kind", _choice(LAUNCHER_KINDS), default="manual")
    for other, keys in _LAUNCHER_ONLY.items():
        misplaced = [key for key in keys if key in section and kind != other]
        if misplaced:
            raise scope.error(f"'{misplaced[0]}' is a setting of the {other} launcher, but kind is "
                              f"{kind!r}; set kind: {other} or delete the line")
    return LauncherConfig(
        kind=kind,
        ssh=_parse_ssh_host(scope, section),
        hosts=_parse_ssh_hosts(scope, section, devices),
        options=_optional(scope, section, "options", _ssh_options, default=()),
        config=_optional(scope, section, "config", _nonblank_string),
        partition=_optional(scope, section, "partition", _single_word),
        time=_optional(scope, section, "time", _slurm_time),
        account=_optional(scope, section, "account", _single_word),
        nodes=_optional(scope, section, "nodes", _positive_int, default=1),
    )


def _parse_ssh_host(scope: _Scope, section: dict) -> SSHHostConfig:
    return SSHHostConfig(
        user=_optional(scope, section, "user", _single_word),
        port=_optional(scope, section, "port", _port),
        python=_optional(scope, section, "python", _nonblank_string),
        identity_file=_optional(scope, section, "identity_file", _nonblank_string),
        shell=_optional(scope, section, "shell", _choice(SSH_SHELLS)),
    )


def _parse_ssh_hosts(scope: _Scope, section: dict, devices) -> tuple[tuple[str, SSHHostConfig], ...]:
    if "devices" not in section:
        return ()
    hosts = _require_mapping(scope, section["devices"], "'launcher.devices'",
                             "write a compute hostname, then its user/port/python/identity_file below it")
    compute = [d.hostname for d in devices if d.is_compute and not d.is_coordinator]
    found = []
    for name, entry in hosts.items():
        if not any(same_host(str(name), host) for host in compute):
            raise scope.error(f"launcher.devices names {name!r}, which is not a compute PC of this "
                              f"file; use one of: {', '.join(compute) or '(none)'}")
        host_scope = _Scope(scope.source, f"launcher.devices.{name}", f"launcher.devices.{name}")
        entry = _require_mapping(host_scope, entry, f"launcher.devices.{name}",
                                 "give user, port, python or identity_file below it")
        _reject_unknown_keys(host_scope, entry, _SSH_HOST_KEYS)
        found.append((str(name), _parse_ssh_host(host_scope, entry)))
    return tuple(found)


def _ssh_options(scope: _Scope, key: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise scope.error(f"'{key}' must be a list of ssh -o settings like [StrictHostKeyChecking=accept-new], "
                          f"got {describe_value(value)}")
    options = tuple(_single_word(scope, f"{key}[{index}]", item) for index, item in enumerate(value))
    for option in options:
        if "=" not in option:
            raise scope.error(f"'{key}' entries are Name=value (as after `ssh -o`), got {option!r}")
    return options


_SLURM_TIME_PATTERN = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")


def _slurm_time(scope: _Scope, key: str, value: object) -> str:
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    text = _single_word(scope, key, text)
    if not _SLURM_TIME_PATTERN.match(text):
        raise scope.error(f"'{key}' must be a Slurm time limit like 30, 4:00:00 or 1-12:00:00 "
                          f"(minutes, hours:minutes:seconds, days-hours...), got {text!r}")
    return text
