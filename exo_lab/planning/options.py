"""Load options: flags, then config.yaml, then defaults, settled in one place.

``exo-lab plan``, ``Cluster.load`` and ``exo-lab serve`` / ``python -m exo_lab.server`` all call
:func:`resolve_load_options` and plan with :meth:`LoadOptions.plan`, so the plan printed is the
plan loaded for the same inputs.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..units import DEFAULT_DTYPE, check_dtype

OBJECTIVES = ("latency", "throughput")
DEFAULT_OBJECTIVE = "latency"
DEFAULT_MODEL = "demo"
DEFAULT_MAX_CONTEXT = 4096      # capped by the model's own max_position_embeddings
DEFAULT_MAX_BATCH = 8           # KV slots: requests decoded together; more wait in the queue
DEFAULT_MAX_QUEUED = 64         # requests waiting for a slot; past this the API answers 429
DEFAULT_PREFILL_CHUNK = 256     # prompt tokens fed per step, between decode steps
DEFAULT_HOP_MS = 0.5            # one stage-to-stage hop: a LAN round trip plus the activations


@dataclass(frozen=True)
class LoadOptions:
    """Everything that decides a plan besides the model's shape and the nodes.

    ``max_context`` None means min(the model's max positions, DEFAULT_MAX_CONTEXT);
    ``micro_batches`` None means one per stage (every PC busy at once)."""

    model: str = DEFAULT_MODEL
    dtype: str = DEFAULT_DTYPE
    max_context: int | None = None
    max_batch: int = DEFAULT_MAX_BATCH
    objective: str = DEFAULT_OBJECTIVE
    min_stages: int = 1
    hop_ms: float = DEFAULT_HOP_MS
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    micro_batches: int | None = None
    max_queued: int = DEFAULT_MAX_QUEUED

    def __post_init__(self) -> None:
        check_dtype(self.dtype)
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective {self.objective!r} is not one of {', '.join(OBJECTIVES)}")
        optional = tuple(n for n in ("max_context", "micro_batches") if getattr(self, n) is not None)
        for name in ("max_batch", "min_stages", "prefill_chunk") + optional:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a whole number >= 1, got {value!r}")
        if not isinstance(self.max_queued, int) or isinstance(self.max_queued, bool) or self.max_queued < 0:
            raise ConfigError(f"max_queued must be a whole number >= 0, got {self.max_queued!r}")
        if not isinstance(self.model, str) or not self.model.strip():
            raise ConfigError(f"model must be a folder, a hub id or 'demo', got {self.model!r}")

    def context_length(self, max_position_embeddings: int) -> int:
        """Tokens per request the KV cache is sized for, for a model with this many positions."""
        return min(self.max_context or DEFAULT_MAX_CONTEXT, max_position_embeddings)

    def plan(self, profile, nodes):
        """The planner's exact plan of ``profile`` over ``nodes`` with these options."""
        from .planner import plan_layers

        return plan_layers(profile, nodes, max_context=self.context_length(profile.max_position_embeddings),
                           max_batch=self.max_batch, objective=self.objective,
                           min_stages=self.min_stages, hop_ms=self.hop_ms, prefill_chunk=self.prefill_chunk)


def resolve_load_options(config=None, *, model: str | None = None, dtype: str | None = None,
                         max_context: int | None = None, max_batch: int | None = None,
                         objective: str | None = None, min_stages: int | None = None,
                         prefill_chunk: int | None = None, micro_batches: int | None = None,
                         max_queued: int | None = None) -> LoadOptions:
    """LoadOptions from explicit values (flags, arguments) first, then ``config`` (a
    ClusterConfig, or None), then the defaults. Raises ConfigError for a bad value."""
    def pick(value, key, default):
        if value is not None:
            return value
        from_config = getattr(config, key, None) if config is not None else None
        return from_config if from_config is not None else default

    hop_ms = config.network.hop_latency_ms if config is not None else None
    return LoadOptions(
        model=pick(model, "model", DEFAULT_MODEL), dtype=pick(dtype, "dtype", DEFAULT_DTYPE),
        max_context=pick(max_context, "max_context", None),
        max_batch=pick(max_batch, "max_batch", DEFAULT_MAX_BATCH),
        objective=pick(objective, "objective", DEFAULT_OBJECTIVE), min_stages=min_stages or 1,
        hop_ms=DEFAULT_HOP_MS if hop_ms is None else hop_ms,
        prefill_chunk=pick(prefill_chunk, "prefill_chunk", DEFAULT_PREFILL_CHUNK),
        micro_batches=pick(micro_batches, "micro_batches", None),
        max_queued=pick(max_queued, "max_queued", DEFAULT_MAX_QUEUED))
