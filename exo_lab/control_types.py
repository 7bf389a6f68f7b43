"""The control plane's vocabulary: what the coordinator and the engines say to each other.

Frozen dataclasses that ipyparallel pickles as they are: :class:`ShardSpec` (which part of which
model a stage holds: the coordinator builds it, ``engine.worker.load_stage`` receives it),
:class:`Probe` (what ``engine.probe.probe_resources`` reports), :class:`LoadedStage` (what a
load returns), :class:`StageStatus` / :class:`EngineStatus` (what ``engine.worker.worker_status``
reports) and :class:`EngineState`. Each checks its own fields on construction and raises an error
naming the field, so a bad spec fails on the coordinator before anything is sent; the side that
receives one checks it again with :func:`received` (unpickling skips the checks).

It lives beside errors.py and units.py, not in engine/: model/ (ShardSpec), engine/, coordinator/
and notebook/ all import it, and it imports nothing heavy (no torch, no transformers), so the
coordinator, the CLI and a widget pay nothing for it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar

from .errors import ClusterError, ModelError
from .units import DTYPES


class EngineState(StrEnum):
    """What an engine is doing, as status rows, the dashboard and the widget show it."""

    IDLE = "idle"               # up, and either holds no stage or its stage has no live request
    LOADING = "loading"         # building its shard
    GENERATING = "generating"   # its stage holds a live request's KV slot
    BUSY = "busy"               # missed the status call but is working through a queue (%%px)
    FAILED = "failed"           # did not answer, left the controller, or failed to load
    STOPPED = "stopped"         # the cluster stopped
    SPARE = "spare"             # idle and holding no stage of the loaded model (cluster.replan())


def engine_state(value: object) -> EngineState:
    """``value`` ("idle", or an EngineState) as an EngineState; ClusterError naming the choices."""
    try:
        return EngineState(value)
    except ValueError:
        raise ClusterError(f"engine state {value!r} is not one of {', '.join(EngineState)}") from None


# ----------------------------------------------------------------------------- field checks

def _check_type(owner: str, name: str, value: Any, kinds: tuple[type, ...], error: type[Exception]) -> None:
    # bool is an int to Python, never a count or an index here
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        wanted = " or ".join("None" if kind is type(None) else kind.__name__ for kind in kinds)
        raise error(f"{owner}.{name} must be {wanted}, got {value!r} ({type(value).__name__})")


def _field(*kinds: type, minimum: float | None = None, **options) -> Any:
    """A dataclass field whose value must be one of ``kinds`` and, when a number, >= ``minimum``."""
    return dataclasses.field(metadata={"kinds": kinds, "minimum": minimum}, **options)


class _Checked:
    """Base of the types here: on construction every field is checked against the kinds and the
    minimum its :func:`_field` names; a bad one raises ``_error`` naming it."""

    _error: ClassVar[type[Exception]] = ClusterError

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            _check_type(owner, field.name, value, field.metadata["kinds"], self._error)
            minimum = field.metadata["minimum"]
            if minimum is not None and value is not None and value < minimum:
                raise self._error(f"{owner}.{field.name} must be >= {minimum}, got {value!r}")


def _from_dict(cls, values: dict, error: type[Exception]):
    """``cls(**values)``, with unknown or missing keys named in ``error``."""
    names = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise error(f"{cls.__name__} has no field(s) {', '.join(unknown)}; its fields: {', '.join(sorted(names))}")
    try:
        return cls(**values)
    except TypeError as exc:   # a required field missing
        raise error(f"{cls.__name__}: {exc}") from None


_NONE = type(None)


# ----------------------------------------------------------------------------- shard spec

@dataclass(frozen=True)
class ShardSpec(_Checked):
    """Which part of which model one stage holds.

    ``[start_layer, stop_layer)`` is half-open, over ``num_layers`` decoder layers in total.
    ``model_dir`` is the model's folder; in the spec the coordinator sends it is the model as the
    coordinator names it (a folder's absolute path, a hub id or "demo"), which the engine
    resolves to its own folder (exo_lab.engine.fetch.open_model) before it builds the stage.
    ``dtype`` is one of exo_lab.units.DTYPES ("int8" is weight-only: exo_lab.model.quant);
    ``device`` a torch device string ("cpu", "cuda", "cuda:1"). ``max_batch`` KV slots of
    ``max_context`` positions each are allocated at load (None: min(the model's max positions,
    exo_lab.settings.DEFAULT_MAX_CONTEXT)). Raises ModelError naming a bad field.
    """

    model_dir: str = _field(str)
    start_layer: int = _field(int, minimum=0)
    stop_layer: int = _field(int, minimum=1)
    num_layers: int = _field(int, minimum=1)
    dtype: str = _field(str, default="float32")
    device: str = _field(str, default="cpu")
    max_context: int | None = _field(int, _NONE, minimum=1, default=None)   # the plan's tokens per request
    max_batch: int = _field(int, minimum=1, default=1)      # the plan's sequences at once: the stage's KV slots

    _error = ModelError

    def with_batch(self, max_batch: int) -> "ShardSpec":
        """This spec with ``max_batch`` KV slots (shedding slots, or giving them back)."""
        return dataclasses.replace(self, max_batch=max_batch)

    def same_layers(self, other: "ShardSpec") -> bool:
        """Whether ``other`` holds the same weights (it may hold another number of KV slots)."""
        return self.with_batch(1) == other.with_batch(1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.model_dir:
            raise ModelError("ShardSpec.model_dir is empty; name the model's folder (or its id)")
        if not self.device:
            raise ModelError('ShardSpec.device is empty; use a torch device such as "cpu" or "cuda:0"')
        if not self.start_layer < self.stop_layer <= self.num_layers:
            raise ModelError(
                f"layer range [{self.start_layer}, {self.stop_layer}) is not a non-empty part of "
                f"the model's {self.num_layers} layers; use 0 <= start_layer < stop_layer <= "
                f"{self.num_layers}"
            )
        if self.dtype not in DTYPES:
            raise ModelError(f"ShardSpec.dtype {self.dtype!r} is not supported; use one of {', '.join(DTYPES)}")

    @property
    def is_first(self) -> bool:
        return self.start_layer == 0

    @property
    def is_last(self) -> bool:
        return self.stop_layer == self.num_layers


@dataclass(frozen=True)
class LoadedStage(_Checked):
    """What an engine answers once its stage is loaded: its data-plane inbox and the cost."""

    address: str = _field(str)              # the stage's inbox, "tcp://host:port"
    load_s: float = _field(float, int, minimum=0)
    reused: bool = _field(bool)             # the same layers were loaded already: weights kept
    parameter_bytes: int = _field(int, minimum=0)
    rss_bytes: int = _field(int, minimum=0)
    peak_rss_bytes: int = _field(int, minimum=0)


# ----------------------------------------------------------------------------- probe

@dataclass(frozen=True)
class GpuProbe(_Checked):
    """One CUDA device an engine sees (torch's index)."""

    index: int = _field(int, minimum=0)
    name: str = _field(str)
    total_bytes: int = _field(int, minimum=0)
    free_bytes: int = _field(int, minimum=0)


@dataclass(frozen=True)
class Probe(_Checked):
    """What an engine's machine has: memory, cores, accelerators, identity. Raises ClusterError
    naming a bad field."""

    hostname: str = _field(str)
    device_name: str | None = _field(str, _NONE)     # the config hostname a worker joined as
    advertise_host: str | None = _field(str, _NONE)  # its LAN address, learnt on joining
    pid: int = _field(int, minimum=1)
    memory_total_bytes: int = _field(int, minimum=0)
    memory_free_bytes: int = _field(int, minimum=0)
    cores: int = _field(int, minimum=1)
    torch_threads: int = _field(int, minimum=1)
    gpus: tuple[GpuProbe, ...] = _field(tuple)
    mps: bool = _field(bool)
    torch_version: str = _field(str)
    torch_cuda: str | None = _field(str, _NONE)      # None: a CPU-only torch build
    rss_bytes: int = _field(int, minimum=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        for gpu in self.gpus:
            _check_type("Probe", "gpus[]", gpu, (GpuProbe,), ClusterError)

    def to_dict(self) -> dict:
        """Plain JSON-able values (``gpus`` as a list of dicts)."""
        return {**dataclasses.asdict(self), "gpus": [dataclasses.asdict(gpu) for gpu in self.gpus]}

    @classmethod
    def from_dict(cls, values: dict) -> Probe:
        gpus = tuple(_from_dict(GpuProbe, dict(gpu), ClusterError) for gpu in values.get("gpus", ()))
        return _from_dict(cls, {**values, "gpus": gpus}, ClusterError)


# ----------------------------------------------------------------------------- status

@dataclass(frozen=True)
class StageStatus(_Checked):
    """One loaded stage's layers, counters and memory, as its engine reports them."""

    stage_index: int = _field(int, minimum=0)
    start_layer: int = _field(int, minimum=0)
    stop_layer: int = _field(int, minimum=1)
    dtype: str = _field(str)
    device: str = _field(str)
    state: EngineState = _field(EngineState)
    messages: int = _field(int, minimum=0)
    tokens: int = _field(int, minimum=0)
    errors: int = _field(int, minimum=0)
    dropped_messages: int = _field(int, minimum=0)       # malformed messages the inbox refused
    busy_s: float = _field(float, int, minimum=0)
    last_forward_ms: float = _field(float, int, minimum=0)
    active_requests: int = _field(int, minimum=0)
    kv_slots: int = _field(int, minimum=1)
    kv_cache_bytes: int = _field(int, minimum=0)
    parameter_bytes: int = _field(int, minimum=0)
    refused_steps: int = _field(int, minimum=0, default=0)   # steps refused: the PC was short of memory

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.start_layer >= self.stop_layer:
            raise ClusterError(f"StageStatus layer range [{self.start_layer}, {self.stop_layer}) is empty")


@dataclass(frozen=True)
class EngineStatus(_Checked):
    """What an engine's status call reports: its memory, and its stage when one is loaded."""

    rss_bytes: int = _field(int, minimum=0)
    peak_rss_bytes: int = _field(int, minimum=0)
    stage: StageStatus | None = _field(StageStatus, _NONE, default=None)

    @property
    def loaded(self) -> bool:
        return self.stage is not None

    def to_dict(self) -> dict:
        """The flat JSON-able row ``cluster.status()["engines"]`` is built from: ``loaded``,
        the memory, and the stage's fields (``state`` as its string) when one is loaded."""
        row = {"loaded": self.loaded, "rss_bytes": self.rss_bytes, "peak_rss_bytes": self.peak_rss_bytes}
        if self.stage is not None:
            row.update(dataclasses.asdict(self.stage), state=self.stage.state.value)
        return row

    @classmethod
    def from_dict(cls, row: dict) -> EngineStatus:
        """The inverse of :meth:`to_dict`. Raises ClusterError naming an unknown or bad field."""
        values = dict(row)
        loaded = values.pop("loaded", False)
        memory = {name: values.pop(name, None) for name in ("rss_bytes", "peak_rss_bytes")}
        if not loaded:
            return _from_dict(cls, {**memory, **values}, ClusterError)
        stage = _from_dict(StageStatus, {**values, "state": engine_state(values.get("state"))}, ClusterError)
        return cls(**memory, stage=stage)


@dataclass(frozen=True)
class MemoryReport(_Checked):
    """A stage engine's memory now, for the coordinator's memory watch (coordinator/memory.py):
    its PC's free memory (the OS's, and its cgroup's where it has one), its cgroup limit (0:
    none), its KV slots and the bytes each holds, and the most a step allocates: with 1, 2, ...
    decode rows (``decode_bytes[s - 1]``), and for a prefill chunk of each of ``prefill_chunks``
    tokens (``prefill_bytes``, spread over as many rows as embeddings may be)."""

    free_bytes: int = _field(int, minimum=0)
    limit_bytes: int = _field(int, minimum=0)
    slots: int = _field(int, minimum=1)
    kv_slot_bytes: int = _field(int, minimum=0)
    decode_bytes: tuple = _field(tuple)
    prefill_chunks: tuple = _field(tuple)
    prefill_bytes: tuple = _field(tuple)


# ----------------------------------------------------------------------------- receiving

# The linears a LoRA may target in the Llama family's decoder layers (peft's names).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSettings:
    """An adapter's shape: rank ``r``, ``alpha`` (scaling alpha / r), ``dropout`` on the
    adapter's input while training, and the target modules (peft's names)."""

    _error: ClassVar = ModelError

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or not 1 <= self.r <= 1024:
            raise ModelError(f"LoRA rank r must be an integer in [1, 1024], got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ModelError(f"LoRA alpha must be a number > 0, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ModelError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        unknown = [t for t in targets if t not in LORA_TARGETS]
        if unknown or not targets:
            raise ModelError(f"LoRA target modules {unknown or '(none)'} are not linears of a decoder layer; "
                             f"pick from {', '.join(LORA_TARGETS)}")
        object.__setattr__(self, "targets", tuple(dict.fromkeys(targets)))

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


@dataclass(frozen=True)
class TrainSetup:
    """What a stage needs to train (``engine.training.start_training``): the adapter id it
    trains, its LoRA settings, the job's seed, AdamW's settings, whether to recompute the
    forward at backward time (activation recomputation: keeps only each micro-batch's input),
    and ``upstream``: the previous stage's inbox address (None on the first stage), where the
    gradients go."""

    _error: ClassVar = ModelError

    adapter: int
    lora: LoraSettings
    seed: int = 0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    recompute: bool = False
    upstream: str | None = None
    floor: int = 0             # batch ids below this are an earlier attempt's: dropped

    def __post_init__(self) -> None:
        if not isinstance(self.adapter, int) or not 1 <= self.adapter < 2**16:
            raise ModelError(f"adapter must be an id in [1, 65535], got {self.adapter!r}")
        if not isinstance(self.lora, LoraSettings):
            raise ModelError(f"lora must be a LoraSettings, got {type(self.lora).__name__}")
        if not (len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas)) or not self.eps > 0 \
                or not self.weight_decay >= 0:
            raise ModelError(f"AdamW needs betas in [0, 1), eps > 0 and weight_decay >= 0; got {self.betas}, "
                             f"{self.eps}, {self.weight_decay}")


def received(value: object, cls: type, sender: str):
    """``value``, checked again after its trip through pickle (which skips ``__post_init__``):
    it must be a ``cls``, and every field, nested ones too, is checked as on construction.
    Raises ModelError (a ShardSpec) or ClusterError naming ``sender`` and what it sent instead."""
    if not isinstance(value, cls):
        raise cls._error(f"{sender} sent a {type(value).__name__} where an exo_lab.control_types.{cls.__name__} "
                    "belongs; are the coordinator and the engines running the same exo-lab?")
    return _rebuilt(value)


def _rebuilt(value):
    if isinstance(value, tuple):
        return tuple(_rebuilt(item) for item in value)
    if not dataclasses.is_dataclass(value):
        return value
    return dataclasses.replace(value, **{field.name: _rebuilt(getattr(value, field.name))
                                         for field in dataclasses.fields(value)})
