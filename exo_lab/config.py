"""config.yaml: the cluster's description, read and checked in one place.

``load_config(path)`` is the only code in exo-lab that reads config.yaml. It returns a frozen
:class:`ClusterConfig` or raises :class:`~exo_lab.errors.ConfigError` with one message that
names the file, the device (its hostname, or ``devices[2]`` when it has none) and the key, says
what is wrong and what is allowed. Bad input is never replaced by a default: a typo in a key is
an error with the closest valid key suggested, a wrong type is an error, a size with an unknown
unit is an error.

Every key, its kind, default and meaning is declared once, in :mod:`exo_lab.settings`; the
table of keys is docs/config.md (generated from it). This module adds the rules that tie keys
together (exactly one coordinator, unique host names, ports inside ``port_range``, ...) and
builds the frozen value types.

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
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from . import envvars
from .errors import ConfigError
from .settings import (API, CONTROLLER_PORT_SPAN, DEFAULT_PORT_RANGE, DEVICE, DISCOVERY_MODES,  # noqa: F401
                       LAUNCHER, LAUNCHER_KINDS, MIN_PORT_RANGE, NETWORK, REPLAN_MODES, ROLES, SSH_HOST,
                       SSH_SHELLS, TOP, read_section)
from .settings_values import Where, require_mapping
from .units import describe_value, format_bytes

_SSH_HOST_KEYS = SSH_HOST.keys
# keys of one launcher kind only: set with another kind, they are an error rather than ignored
_LAUNCHER_ONLY = {"ssh": ("user", "port", "identity_file", "options", "devices"),
                  "slurm": ("partition", "time", "account", "nodes")}
# DeviceConfig names sizes with their unit
_DEVICE_FIELDS = {"max_memory": "max_memory_bytes", "memory_bandwidth": "memory_bandwidth_bytes_per_s",
                  "gpu_memory": "gpu_memory_bytes"}


def _defaults(section) -> dict:
    """The section's values when config.yaml leaves every key out."""
    return read_section(Where("<defaults>", None, section.name), {}, section)


_NETWORK = _defaults(NETWORK)
_API = _defaults(API)
_LAUNCHER = _defaults(LAUNCHER)

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


@dataclass(frozen=True)
class NetworkConfig:
    """How the PCs reach each other. Every TCP port exo-lab listens on, on every PC, lies in
    ``port_range`` (inclusive), so one firewall rule per PC is enough: ``service_port`` (join and
    model files), the controller's ``[controller_port, controller_port + CONTROLLER_PORT_SPAN)``
    on the coordinator, and the data-plane inboxes in the rest (:attr:`data_ports`). Only the
    API's ``api.port`` lies outside it; discovery is UDP 5353."""

    discovery: str = _NETWORK["discovery"]              # "auto" | "manual"
    controller_port: int = _NETWORK["controller_port"]  # ipyparallel's first port on the coordinator
    hop_latency_ms: float | None = None  # planner hint per stage-to-stage hop; None: the default
    secret_file: str | None = None      # cluster secret file (absolute once loaded from a file)
    service_port: int = _NETWORK["service_port"]   # HTTP: workers join here; the storage PC serves files here
    port_range: tuple[int, int] = _NETWORK["port_range"]   # (first, last), both included

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
    """The OpenAI-compatible API: where it listens, its key, and its caps (exo_lab.settings.API)."""

    host: str = _API["host"]
    port: int = _API["port"]
    api_key_env: str | None = None      # environment variable NAME holding the key
    api_key_file: str | None = None     # file holding the key (absolute once loaded from a file)
    max_connections: int = _API["max_connections"]  # open connections; past it a new one gets a 503
    allowed_hosts: tuple[str, ...] = ()  # extra names the API answers to in the Host header
    max_connections_per_client: int = _API["max_connections_per_client"]   # per client address
    max_running_per_client: int | None = None  # KV slots one client holds; None: fair share only
    max_queued_per_client: int = _API["max_queued_per_client"]   # requests one client has waiting


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

    kind: str = _LAUNCHER["kind"]       # "manual" | "ssh" | "slurm"
    ssh: SSHHostConfig = field(default_factory=SSHHostConfig)      # defaults for every PC
    hosts: tuple[tuple[str, SSHHostConfig], ...] = ()                # per-PC overrides
    options: tuple[str, ...] = ()       # extra `ssh -o` settings, e.g. StrictHostKeyChecking=accept-new
    config: str | None = None           # config.yaml path on the compute PCs; None: the same path
    partition: str | None = None        # slurm
    time: str | None = None             # slurm, e.g. "4:00:00"
    account: str | None = None          # slurm
    nodes: int = _LAUNCHER["nodes"]     # slurm: one worker (one engine) per node

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
    speculation: str | None = None      # "off" | "prompt_lookup" | "draft_model" | None
    draft_model: str | None = None      # speculation "draft_model": its model id; None = the served model
    draft_dtype: str | None = None
    objective: str | None = None        # "latency" | "throughput" | None
    replan: str = TOP["replan"].default  # "manual" | "auto": re-plan by itself when engines join
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
    top = Where(source, None, TOP.in_phrase)
    mapping = require_mapping(top, data, "the configuration",
                              "start the file with 'cluster_name: ...' and 'devices:'")
    values = read_section(top, mapping, TOP)
    devices = _parse_devices(top, mapping["devices"])
    _check_cluster(top, devices)
    return ClusterConfig(**values, devices=devices, network=_parse_network(top, mapping),
                         api=_parse_api(top, mapping), launcher=_parse_launcher(top, mapping, devices),
                         source=source)


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
    if os.environ.get(envvars.SECRET):     # exo_lab.security.load_secret: the environment wins
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

# --------------------------------------------------------------------------- sections

def _section(top: Where, mapping: dict, key: str, example: str) -> tuple[Where, dict] | None:
    """The mapping under ``key`` and where it sits; None when the key is absent."""
    if key not in mapping:
        return None
    section = require_mapping(top, mapping[key], f"'{key}'", f"write e.g. '{key}:' then '  {example}' below it")
    return Where(top.source, key, key), section


def _parse_devices(top: Where, value: object) -> tuple[DeviceConfig, ...]:
    if value is None or not isinstance(value, list):
        raise top.error(f"'devices' must be a list of devices (lines starting with '- "
                        f"hostname: ...'), got {describe_value(value)}")
    if not value:
        raise top.error("'devices' is empty; list the coordinator and at least one compute PC")
    return tuple(_parse_device(top.source, index, entry) for index, entry in enumerate(value))


def _device_where(source: str, index: int, entry: object) -> Where:
    hostname = entry.get("hostname") if isinstance(entry, dict) else None
    label = f"device '{hostname}'" if isinstance(hostname, str) and hostname.strip() else f"devices[{index}]"
    return Where(source, label, label)


def _parse_device(source: str, index: int, entry: object) -> DeviceConfig:
    where = _device_where(source, index, entry)
    mapping = require_mapping(where, entry, "a device", "write each device as '- hostname: ...' with roles below it")
    values = read_section(where, mapping, DEVICE)
    if "engines" in mapping and "compute" not in values["roles"]:
        raise where.error("'engines' is set but the device has no 'compute' role; engines run "
                          "only on compute devices: add compute to roles or delete engines")
    return DeviceConfig(**{_DEVICE_FIELDS.get(key, key): value for key, value in values.items()})


def _check_cluster(top: Where, devices: tuple[DeviceConfig, ...]) -> None:
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


def _check_unique_hostnames(top: Where, devices: tuple[DeviceConfig, ...]) -> None:
    # same_host: System-A.local, system-a.local and system-a are one PC
    for index, device in enumerate(devices):
        first = next(i for i, other in enumerate(devices) if same_host(other.hostname, device.hostname))
        if first != index:
            raise top.error(f"duplicate hostname '{device.hostname}': devices[{first}] and devices[{index}] "
                            f"name the same PC; list each PC once (use 'engines' for several stages on one PC)")


def _parse_network(top: Where, mapping: dict) -> NetworkConfig:
    found = _section(top, mapping, "network", "discovery: manual")
    if found is None:
        return NetworkConfig()
    where, section = found
    network = NetworkConfig(**read_section(where, section, NETWORK))
    _check_ports_in_range(where, network)
    return network


def _check_ports_in_range(where: Where, network: NetworkConfig) -> None:
    first, last = network.port_range
    span = f"network.port_range {network.port_range_text}"
    if not first <= network.service_port <= last:
        raise where.error(f"'service_port' {network.service_port} is outside {span}; every port exo-lab "
                          f"listens on lies in the range (delete service_port to use {first})")
    controller = network.controller_ports
    if controller.start < first or controller.stop - 1 > last:
        raise where.error(f"'controller_port' {network.controller_port} puts the controller's "
                          f"{CONTROLLER_PORT_SPAN} ports ({controller.start}-{controller.stop - 1}) outside "
                          f"{span} (delete controller_port to use {first + 1})")
    if network.service_port in controller:
        raise where.error(f"'service_port' {network.service_port} is one of the controller's ports "
                          f"{controller.start}-{controller.stop - 1}; pick one outside them")
    if len(network.data_ports) < 2:
        raise where.error(f"{span} leaves no ports for the data plane; widen it (e.g. {first}-{first + 99})")



def _parse_api(top: Where, mapping: dict) -> ApiConfig:
    found = _section(top, mapping, "api", "port: 8000")
    if found is None:
        return ApiConfig()
    where, section = found
    values = read_section(where, section, API)
    if values["api_key_env"] is not None and values["api_key_file"] is not None:
        raise where.error("set only one of 'api_key_env' and 'api_key_file', not both")
    value, most = values["max_connections_per_client"], values["max_connections"]
    if value > most:
        # one client must not fill the server's cap
        raise where.error(f"'max_connections_per_client' is {value} but 'max_connections' is {most}: "
                          f"one client cannot hold more than the server accepts; set it to at most "
                          f"{most} (leave room for other clients, e.g. {max(1, most // 4)})")
    return ApiConfig(**values)


def _parse_launcher(top: Where, mapping: dict, devices: tuple[DeviceConfig, ...]) -> LauncherConfig:
    if "launcher" not in mapping:
        return LauncherConfig()
    where = Where(top.source, "launcher", "launcher")
    section = mapping["launcher"]
    if isinstance(section, str):
        section = {"kind": section}          # `launcher: ssh` is `launcher: {kind: ssh}`
    section = require_mapping(top, section, "'launcher'",
                              "write 'launcher: manual', or 'launcher:' then '  kind: ssh' below it")
    values = read_section(where, section, LAUNCHER)
    kind = values["kind"]
    for other, keys in _LAUNCHER_ONLY.items():
        misplaced = [key for key in keys if key in section and kind != other]
        if misplaced:
            raise where.error(f"'{misplaced[0]}' is a setting of the {other} launcher, but kind is "
                              f"{kind!r}; set kind: {other} or delete the line")
    ssh = SSHHostConfig(**{key: values.pop(key) for key in _SSH_HOST_KEYS})
    return LauncherConfig(**values, ssh=ssh, hosts=_parse_ssh_hosts(where, section, devices))


def _parse_ssh_hosts(where: Where, section: dict, devices) -> tuple[tuple[str, SSHHostConfig], ...]:
    if "devices" not in section:
        return ()
    hosts = require_mapping(where, section["devices"], "'launcher.devices'",
                            "write a compute hostname, then its user/port/python/identity_file below it")
    compute = [d.hostname for d in devices if d.is_compute and not d.is_coordinator]
    found = []
    for name, entry in hosts.items():
        if not any(same_host(str(name), host) for host in compute):
            raise where.error(f"launcher.devices names {name!r}, which is not a compute PC of this "
                              f"file; use one of: {', '.join(compute) or '(none)'}")
        host_where = Where(where.source, f"launcher.devices.{name}", f"launcher.devices.{name}")
        entry = require_mapping(host_where, entry, f"launcher.devices.{name}",
                                "give user, port, python or identity_file below it")
        found.append((str(name), SSHHostConfig(**read_section(host_where, entry, SSH_HOST))))
    return tuple(found)
