"""The settings schema: every key of config.yaml and every load option, written once.

Each :class:`Setting` holds a key's kind (:mod:`exo_lab.settings_values`), default and help.
From this one table come:

- the checks of config.yaml (:func:`read_section`, used by :mod:`exo_lab.config`, which adds
  the rules that tie keys together: one coordinator, ports inside the range, ...);
- the load defaults (:mod:`exo_lab.planning.options` builds ``LoadOptions`` from
  :data:`LOAD_KEYS`);
- the flags of ``exo-lab plan``, ``exo-lab serve`` and ``python -m exo_lab.server``
  (:func:`add_flags`: help and defaults from here);
- the key table of docs/config.md (``python docs/make_config_doc.py``).

Why a table of our own and not pydantic v2 (measured on the 2-core dev machine, fresh process,
best of 5): importing pydantic and building models of these ~50 keys takes ~95 ms; importing
exo_lab.config with this table (yaml and units included) ~37 ms. pydantic's messages name a
location (``devices.1.max_cores``) and its own wording (``Input should be a valid integer``,
``Extra inputs are not permitted``), with no device hostname, no closest valid key and no fix;
keeping today's messages (file, device, key, fix) would take a custom validator per kind plus a
translation of every pydantic error back: this table again, behind a dependency exo-lab does not
otherwise need at run time (only openai, a test tool, brings it).
"""
from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import dataclass

from .errors import ConfigError
from .settings_values import (BANDWIDTH, BOOLEAN, CLUSTER_NAME, ENV_NAME, HOSTS, NAMES, NON_NEGATIVE,
                              POSITIVE_INT, PORT, SECTION, SIZE, SLURM_TIME, SSH_OPTIONS, TEXT, WORD, Kind,
                              Where, choice, closest, port_range, roles)
from .units import AUTO_DTYPE, DEFAULT_DTYPE, DTYPES

# --------------------------------------------------------------------------- defaults used in rules
ROLES = ("coordinator", "compute", "storage")
DISCOVERY_MODES = ("auto", "manual")
REPLAN_MODES = ("manual", "auto")
OBJECTIVES = ("latency", "throughput")
DRAFTERS = ("prompt_lookup", "draft_model")   # who drafts for speculative decoding
SPECULATION_MODES = ("off", *DRAFTERS)
LAUNCHER_KINDS = ("manual", "ssh", "slurm")
SSH_SHELLS = ("posix", "powershell")
DEFAULT_MAX_CONTEXT = 4096      # KV positions per slot, capped by the model's own max_position_embeddings
DEFAULT_HOP_MS = 0.5            # one stage-to-stage hop: a LAN round trip plus the activations
# the planner's speed figure of a stage's memory when memory_bandwidth is not given (decode is memory-bound)
DEFAULT_BANDWIDTH_BYTES_PER_S = {"cpu": 20e9, "cuda": 500e9, "mps": 100e9}
DEFAULT_PORT_RANGE = (10100, 10199)
CONTROLLER_PORT_SPAN = 30   # the ipyparallel controller listens on [controller_port, controller_port + span)
MIN_PORT_RANGE = CONTROLLER_PORT_SPAN + 1 + 4   # controller, service, and a few data-plane inboxes


@dataclass(frozen=True)
class Setting:
    """One key: what it may be, its default, and what it means (one text for --help and docs)."""

    key: str
    kind: Kind
    help: str
    default: object = None          # when absent; a callable gets the values read before it
    default_text: str | None = None  # how --help and the docs show the default, when not the value
    required: bool = False
    layered: bool = False           # a load option: flag, then config.yaml, then default (config keeps None)
    flag: str | None = None         # its command-line flag, when not --key-with-dashes
    in_config: bool = True          # False: a flag only

    @property
    def flag_name(self) -> str:
        return self.flag or "--" + self.key.replace("_", "-")

    def default_for(self, values: dict) -> object:
        """The value when the key is absent (None for a load option: the flag or default decides)."""
        if self.layered:
            return None
        return self.default(values) if callable(self.default) else self.default

    def shown_default(self) -> str:
        if self.default_text is not None:
            return self.default_text
        if self.default is None or self.default == ():
            return "none"
        return f"`{str(self.default).lower() if isinstance(self.default, bool) else self.default}`"


@dataclass(frozen=True)
class Section:
    """A mapping of config.yaml (the top level, a device, network, ...): its keys in order."""

    name: str                       # "" (the top level), "devices[i]", "network", ...
    in_phrase: str                  # "unknown key 'x' in <in_phrase>"
    settings: tuple[Setting, ...]
    title: str = ""                 # the docs table's heading row; default **name**

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(s.key for s in self.settings)

    def __getitem__(self, key: str) -> Setting:
        return next(s for s in self.settings if s.key == key)


# --------------------------------------------------------------------------- the schema
TOP = Section("", "the top level of the file", (
    Setting("cluster_name", CLUSTER_NAME, "name of the cluster: letters, digits, `.`, `_`, `-` (it may end "
            "up in file names)", required=True),
    Setting("devices", SECTION, "list of the PCs, one mapping each (below)", required=True),
    Setting("network", SECTION, "mapping, keys below", default_text="see below"),
    Setting("api", SECTION, "mapping, keys below", default_text="see below"),
    Setting("model", TEXT, "model to load: a local folder, a Hugging Face hub id in the local cache, "
            "'smollm2' or 'demo'", default="demo", layered=True),
    Setting("served_model_names", NAMES, "names the API answers to (/v1/models lists them, the first "
            "first; any is accepted as 'model')", default=(), default_text="the model id",
            flag="--served-model-name"),
    Setting("dtype", choice((*DTYPES, AUTO_DTYPE)), "weights dtype: " + " | ".join((*DTYPES, AUTO_DTYPE)) +
            " (int8, int4: weight-only, bfloat16 activations; gguf: a GGUF model's own formats; auto: "
            "gguf for a GGUF model, else float32)", default=DEFAULT_DTYPE, layered=True),
    Setting("max_context", POSITIVE_INT, "tokens per request the KV cache is sized for",
            default_text=f"min(the model's max positions, {DEFAULT_MAX_CONTEXT})", layered=True),
    Setting("max_batch", POSITIVE_INT, "KV slots: requests decoded at once; the KV cache is sized for "
            "them, more wait in the queue", default=8, layered=True),
    Setting("objective", choice(OBJECTIVES), "planner objective: latency (fastest single stream) | "
            "throughput (balance the slowest stage)", default="latency", layered=True),
    Setting("replan", choice(REPLAN_MODES), "`manual`: a worker that joins after load stays a spare until "
            "`cluster.replan()`; `auto`: the coordinator re-plans by itself when engines join (or after a "
            "failure) and loads the better plan, and moves layers while serving when a PC's stage runs slower "
            "or faster than planned (a PC got busier or freer; streams go on)", default="manual"),
    Setting("prefill_chunk", POSITIVE_INT, "prompt tokens fed per step, between decode steps (the "
            "planner's workspace follows it)", default=256, layered=True),
    Setting("micro_batches", POSITIVE_INT, "steps in flight at once (one per stage keeps every PC busy; "
            "1 when stages sharing a PC have more threads than it has cores)",
            default_text="one per stage", layered=True),
    Setting("max_queued", POSITIVE_INT, "requests waiting for a KV slot; past it the API answers 429",
            default=64, layered=True),
    Setting("speculation", choice(SPECULATION_MODES), "speculative decoding, drafted tokens checked in one "
            "trip through the pipeline (same tokens; only while at most 2 requests run): `prompt_lookup` "
            "drafts from the request's own prompt and output (faster when the answer repeats its context), "
            "`draft_model` with a small model on the coordinator (`draft_model`, `draft_dtype`) | `off`",
            default="off", layered=True),
    Setting("draft_model", TEXT, "the model that drafts with `speculation: draft_model`, run whole on the "
            "coordinator: a smaller model with the same tokenizer, or the served model itself at fewer bits",
            default_text="the served model", layered=True),
    Setting("draft_dtype", choice(DTYPES), "the draft model's weights dtype", default="int8", layered=True),
    Setting("launcher", SECTION, "who starts the compute PCs' workers: `manual` or a mapping, keys below",
            default_text="`manual`"),
))

DEVICE = Section("devices[i]", "a device", (
    Setting("hostname", WORD, "the PC's host name; unique (`system-b` and `System-B.local` are one PC)",
            required=True),
    Setting("roles", roles(ROLES), "list of " + " | ".join(f"`{r}`" for r in ROLES) + "; exactly one device "
            "in the cluster is the coordinator and at least one is compute", required=True),
    Setting("max_memory", SIZE, "cap on the RAM the planner gives this PC (shared by its CPU stages): a "
            "size, see below. Without it the PC's free RAM, or its memory cgroup's limit less what it "
            "holds when it runs in a container or a limited systemd slice", default_text="none (no cap)"),
    Setting("max_cores", POSITIVE_INT, "cap on the CPU threads torch uses here (positive whole number)",
            default_text="none (no cap)"),
    Setting("gpu", BOOLEAN, "use this PC's GPU: `true` | `false` (a real boolean, not the string \"yes\")",
            default=False),
    Setting("gpu_memory", SIZE, "cap on the GPU memory (VRAM) a GPU stage of this PC gets: a size; "
            "`max_memory` caps its RAM (a CPU stage there)", default_text="probed free VRAM"),
    Setting("memory_bandwidth", BANDWIDTH, "speed hint for the planner: effective memory bandwidth of "
            "this PC's RAM (its CPU stages), a size with an optional `/s`, e.g. `20GB/s` (decode is "
            "memory-bound); given, it wins over the speed measured at load. A GPU stage is planned at "
            f"{DEFAULT_BANDWIDTH_BYTES_PER_S['cuda'] / 1e9:g} GB/s",
            default_text=f"measured at load (`exo-lab plan`: {DEFAULT_BANDWIDTH_BYTES_PER_S['cpu'] / 1e9:g} GB/s)"),
    # a GPU PC's second engine is a CPU stage in its RAM (planning/nodes.py: GPU first, then RAM)
    Setting("engines", POSITIVE_INT, "ipyparallel engines (pipeline stages) this PC runs; only on compute "
            "devices. A GPU PC gives one to each GPU and the rest are CPU stages in its RAM, so by default "
            "it holds a GPU stage and a CPU stage (the planner uses the CPU one only where it pays)",
            default=lambda values: 2 if values["gpu"] and "compute" in values["roles"] else 1,
            default_text="1; 2 with `gpu: true`"),
    Setting("address", WORD, "host name or IP to connect to, when `hostname` does not resolve",
            default_text="hostname"),
))

NETWORK = Section("network", "network", (
    Setting("discovery", choice(DISCOVERY_MODES), "`auto`: the coordinator advertises the cluster on the "
            "LAN (mDNS, with a proof of the secret), workers find it with nothing but this file, and engines "
            "of PCs not listed are used too; `manual`: workers join the coordinator's `address` (or "
            "hostname) and only the devices listed are used", default="manual"),
    Setting("port_range", port_range(MIN_PORT_RANGE, f"the controller takes {CONTROLLER_PORT_SPAN}"),
            "every TCP port exo-lab listens on, on every PC, lies in it (one firewall rule per PC): the "
            f"service port, the controller's {CONTROLLER_PORT_SPAN} ports and the data-plane inboxes; only "
            f"`api.port` is outside it, and discovery is UDP 5353 (at least {MIN_PORT_RANGE} ports)",
            default=DEFAULT_PORT_RANGE, default_text="`{}-{}`".format(*DEFAULT_PORT_RANGE)),
    Setting("controller_port", PORT, f"the first of the controller's {CONTROLLER_PORT_SPAN} ports on the "
            "coordinator (inside `port_range`)", default=lambda values: values["port_range"][0] + 1,
            default_text="range start + 1"),
    Setting("hop_latency_ms", NON_NEGATIVE, "planner hint: milliseconds one stage-to-stage hop costs (>= 0)",
            default=DEFAULT_HOP_MS, layered=True),
    Setting("service_port", PORT, "the coordinator's HTTP port where workers join, and the storage PC's "
            "port where it serves model files (inside `port_range`)",
            default=lambda values: values["port_range"][0], default_text="range start"),
    Setting("secret_file", TEXT, "file holding the cluster secret, the same on every PC (`$EXO_LAB_SECRET` "
            "wins over it); a relative path is relative to config.yaml's folder; the file must be private "
            "to its owner (`chmod 600`; on Windows `exo-lab secret` restricts it with icacls and its ACL is "
            "not checked when read). None = no shared secret: the controller and the data plane bind "
            "127.0.0.1 only (see exo_lab.security), so a config that lists other PCs is refused without "
            "one (`exo-lab secret secret.txt` makes one)"),
))

API = Section("api", "api", (
    Setting("host", WORD, "interface the OpenAI-compatible API binds (0.0.0.0 for every PC of the LAN)",
            default="127.0.0.1"),
    Setting("port", PORT, "the API's port (1-65535; a flag may say 0: a free one)", default=8000),
    Setting("api_key_env", ENV_NAME, "name of the environment variable holding the API key (the name, "
            "never the key)"),
    Setting("api_key_file", TEXT, "file holding the API key; a relative path is relative to config.yaml's "
            "folder. Set at most one of the two; none of them = no key required"),
    Setting("max_connections", POSITIVE_INT, "open connections the API accepts; past it a new one gets a "
            "503 and is closed", default=256),
    Setting("allowed_hosts", HOSTS, "list of extra names the API answers to in the `Host` header; on a "
            "loopback `host` only localhost, 127.0.0.1 and [::1] are answered otherwise (DNS rebinding "
            "defence)", default=()),
    Setting("max_connections_per_client", POSITIVE_INT, "open connections one client address may hold (at "
            "most `max_connections`); past it the client's new ones get a 429 while other clients still "
            "get in", default=lambda values: max(1, values["max_connections"] // 4),
            default_text="a quarter of `max_connections`"),
    Setting("max_running_per_client", POSITIVE_INT, "KV slots one client's requests may hold at once; "
            "without a cap a client may use every free slot, and when another client waits the scheduler "
            "takes slots back until they hold about as many each (fair share)",
            default_text="none (all slots)"),
    Setting("max_queued_per_client", POSITIVE_INT, "requests one client may have waiting for a KV slot; "
            "past it that client gets a 429 naming this limit (`max_queued` caps all clients together, but "
            "a client's first waiting request always fits). A client is its address plus the API key it "
            "sent; prompts are reused as cached prefixes only within one client (and its `user` / "
            "`X-Exo-Lab-Isolation`, see exo_lab.api.tenants)", default=16),
))

SSH_HOST = Section("launcher.devices.<hostname>", "launcher.devices", (
    Setting("user", WORD, "ssh: login name on the compute PCs", default_text="yours"),
    Setting("port", PORT, "ssh: sshd port (1-65535)", default_text="`22`"),
    Setting("python", TEXT, "ssh, slurm: the Python (with exo-lab) on the compute PCs",
            default_text="this process's interpreter path"),
    Setting("identity_file", TEXT, "ssh: private key file (`ssh -i`)", default_text="ssh's own"),
    Setting("shell", choice(SSH_SHELLS), "ssh: the PC's login shell, `posix` (sh, bash) or `powershell` "
            "(Windows OpenSSH)", default_text="`posix`"),
))

LAUNCHER = Section("launcher", "launcher", (
    Setting("kind", choice(LAUNCHER_KINDS), "`manual`: workers are started by hand or as a service; `ssh`: "
            "the coordinator starts `python -m exo_lab.worker` on each compute PC over SSH (ipyparallel's "
            "SSHEngineSetLauncher); `slurm`: the workers run as one Slurm job (SlurmEngineSetLauncher). ssh "
            "and slurm need a shared secret; slurm reads it from `network.secret_file` and needs "
            "`discovery: auto`", default="manual"),
    *SSH_HOST.settings,
    Setting("options", SSH_OPTIONS, "ssh: list of extra `ssh -o` settings, e.g. "
            "`[StrictHostKeyChecking=accept-new]`", default=()),
    Setting("config", TEXT, "the config.yaml path on the compute PCs", default_text="this file's absolute "
            "path (as on a shared folder)"),
    Setting("devices", SECTION, "ssh: per-PC overrides, a mapping from a compute hostname to "
            + ", ".join(f"`{key}`" for key in SSH_HOST.keys)),
    Setting("partition", WORD, "slurm: `#SBATCH --partition`", default_text="site's"),
    Setting("time", SLURM_TIME, "slurm: `#SBATCH --time` (e.g. `4:00:00`)", default_text="site's"),
    Setting("account", WORD, "slurm: `#SBATCH --account`"),
    Setting("nodes", POSITIVE_INT, "slurm: nodes (one worker, one engine each)", default=1),
), title="**launcher** (`launcher: manual` | a mapping; see exo_lab.membership.launchers)")

# flags with no key in config.yaml
COMMAND_LINE = Section("", "the command line", (
    Setting("min_stages", POSITIVE_INT, "spread over at least this many engines (experiments)",
            default=1, in_config=False),
    Setting("api_key", Kind(None), "require this Bearer key", in_config=False,
            default_text="the config's api.api_key_env / api_key_file, else $EXO_LAB_API_KEY"),
))

SCHEMA = (TOP, DEVICE, NETWORK, API, LAUNCHER)       # config.yaml, in the docs' order

# What Cluster.load, `exo-lab plan` and the server settle (exo_lab.planning.options): flag, then
# config.yaml, then the default here. network.hop_latency_ms joins them as hop_ms.
LOAD_KEYS = ("model", "dtype", "max_context", "max_batch", "objective", "min_stages", "prefill_chunk",
             "micro_batches", "max_queued", "speculation", "draft_model", "draft_dtype")
_PLAN_FLAGS = ("model", "dtype", "max_context", "max_batch", "objective", "min_stages", "prefill_chunk")
# the flags each command line takes, by setting (``section.key`` outside the top level), in --help's order
COMMAND_FLAGS = {
    "plan": _PLAN_FLAGS,
    "server": _PLAN_FLAGS + ("micro_batches", "max_queued", "speculation", "draft_model", "draft_dtype", "api.host", "api.port", "api_key",
                             "served_model_names"),
}


def setting(path: str) -> Setting:
    """The setting at ``path``: ``max_batch``, ``api.host``, ``network.hop_latency_ms``, ``min_stages``."""
    section_name, _, key = path.rpartition(".")
    for section in (*SCHEMA, COMMAND_LINE):
        if section.name == section_name and key in section.keys:
            return section[key]
    raise KeyError(f"no setting {path!r} in exo_lab.settings")


def load_default(key: str) -> object:
    """The default of a load option (``LOAD_KEYS``, or ``hop_ms``)."""
    return setting("network.hop_latency_ms" if key == "hop_ms" else key).default


def read_flags(args: argparse.Namespace, command: str) -> dict[str, object]:
    """The flags of ``command`` that were given, by setting key (left out: None, not listed)."""
    keys = (setting(path).key for path in COMMAND_FLAGS[command])
    return {key: getattr(args, key) for key in keys if getattr(args, key, None) is not None}


# --------------------------------------------------------------------------- reading config.yaml

def read_section(where: Where, mapping: dict, section: Section) -> dict[str, object]:
    """Every key of ``section`` but its sub-sections (kind SECTION): the checked value, or the
    default when absent (None for a load option). Raises ConfigError for an unknown key (with the
    closest valid one), a missing required key, a key with no value, or a bad value."""
    _reject_unknown_keys(where, mapping, section.keys)
    required = tuple(s.key for s in section.settings if s.required)
    for key in required:
        if key not in mapping:
            raise where.error(f"missing required key '{key}' (required: {', '.join(required)})")
    values: dict[str, object] = {}
    for item in section.settings:
        if item.kind.check is None:
            continue
        if item.key not in mapping:
            values[item.key] = item.default_for(values)
        elif mapping[item.key] is None:
            raise where.error(f"'{item.key}' has no value; give one or delete the line to use the default")
        else:
            values[item.key] = item.kind.check(where, item.key, mapping[item.key])
    return values


def _reject_unknown_keys(where: Where, mapping: dict, allowed: tuple[str, ...]) -> None:
    for key in mapping:
        if key not in allowed:
            close = closest(key, allowed)
            hint = f"did you mean '{close}'?" if close else "it is not a config key."
            # no device or section prefix: in_phrase names it
            raise ConfigError(f"{where.source}: unknown key '{key}' in {where.in_phrase}; {hint} "
                              f"Allowed keys: {', '.join(allowed)}")


# --------------------------------------------------------------------------- command-line flags

def add_flags(parser: argparse.ArgumentParser, command: str) -> None:
    """Declare the flags of ``command`` (a key of :data:`COMMAND_FLAGS`) on ``parser``: each one's
    type, choices and help from its setting. Every flag defaults to None: not given, so the value
    comes from config.yaml, else the setting's default (the help says which)."""
    for path in COMMAND_FLAGS[command]:
        item = setting(path)
        extra = {"action": "extend", "nargs": "+", "metavar": "NAME"} if item.kind.many else {
            "type": item.kind.flag_type, "choices": item.kind.choices}
        parser.add_argument(item.flag_name, dest=item.key, default=None, help=flag_help(path), **extra)


def flag_help(path: str) -> str:
    """A flag's --help text: the setting's help and where its value comes from when left out."""
    item = setting(path)
    default = item.shown_default().replace("`", "")
    where = f"the config's {path}, else " if item.in_config else ""
    return f"{item.help} (default: {where}{default})".replace("%", "%%")


def iter_settings() -> Iterator[tuple[Section, Setting]]:
    """Every config.yaml setting, section by section, in the docs' order."""
    for section in SCHEMA:
        for item in section.settings:
            yield section, item

