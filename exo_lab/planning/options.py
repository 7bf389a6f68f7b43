"""Load options: flags, then config.yaml, then defaults, settled in one place.

``exo-lab plan``, ``Cluster.load`` and ``exo-lab serve`` / ``python -m exo_lab.server`` all call
:func:`resolve_load_options` and plan with :meth:`LoadOptions.plan`, so the plan printed is the
plan loaded for the same inputs. The options, their checks and defaults are those of
:mod:`exo_lab.settings` (``LOAD_KEYS``).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from ..settings import DEFAULT_HOP_MS, DEFAULT_MAX_CONTEXT, LOAD_KEYS, OBJECTIVES, load_default, setting  # noqa: F401
from ..settings_values import Where
from ..units import AUTO_DTYPE
from ..weights.resolve import auto_dtype, check_dtype_for

_WHERE = Where("load options", None, "the load options")
_SETTING_OF = {"hop_ms": "network.hop_latency_ms"}


@dataclass(frozen=True)
class LoadOptions:
    """Everything that decides a plan besides the model's shape and the nodes.

    ``max_context`` None means min(the model's max positions, DEFAULT_MAX_CONTEXT);
    ``micro_batches`` None means one per stage (every PC busy at once)."""

    model: str = load_default("model")
    dtype: str = load_default("dtype")
    max_context: int | None = load_default("max_context")
    max_batch: int = load_default("max_batch")
    objective: str = load_default("objective")
    min_stages: int = load_default("min_stages")
    hop_ms: float = load_default("hop_ms")
    prefill_chunk: int = load_default("prefill_chunk")
    micro_batches: int | None = load_default("micro_batches")
    max_queued: int = load_default("max_queued")
    speculation: str = load_default("speculation")
    draft_model: str | None = load_default("draft_model")     # None: the served model
    draft_dtype: str = load_default("draft_dtype")

    def __post_init__(self) -> None:
        """Each option checked as its config.yaml key is: a ConfigError naming it. dtype "auto"
        becomes the model's own ("gguf" for a GGUF model, else "float32")."""
        for item in fields(self):
            value = getattr(self, item.name)
            if value is None and load_default(item.name) is None:
                continue            # max_context, micro_batches: None is settled at load
            setting(_SETTING_OF.get(item.name, item.name)).kind.check(_WHERE, item.name, value)
        if self.dtype == AUTO_DTYPE:
            object.__setattr__(self, "dtype", auto_dtype(self.model))
        check_dtype_for(self.model, self.dtype)

    def context_length(self, max_position_embeddings: int) -> int:
        """Tokens per request the KV cache is sized for, for a model with this many positions."""
        return min(self.max_context or DEFAULT_MAX_CONTEXT, max_position_embeddings)

    def plan(self, profile, nodes):
        """The planner's exact plan of ``profile`` over ``nodes`` with these options."""
        from .planner import plan_layers        # numpy: loaded only when planning

        return plan_layers(profile, nodes, max_context=self.context_length(profile.max_position_embeddings),
                           max_batch=self.max_batch, objective=self.objective,
                           min_stages=self.min_stages, hop_ms=self.hop_ms, prefill_chunk=self.prefill_chunk)


def resolve_load_options(config=None, **given) -> LoadOptions:
    """LoadOptions from explicit values (flags, arguments: the keywords of ``LOAD_KEYS``, None =
    not given) first, then ``config`` (a ClusterConfig, or None), then the defaults of
    exo_lab.settings. Raises ConfigError for a bad value, TypeError for an unknown keyword."""
    unknown = set(given) - set(LOAD_KEYS)
    if unknown:
        raise TypeError(f"resolve_load_options() got unknown options {sorted(unknown)}; known: {', '.join(LOAD_KEYS)}")
    picked = {}
    for key in LOAD_KEYS:
        value = given.get(key)
        if value is None and config is not None:
            value = getattr(config, key, None)
        picked[key] = load_default(key) if value is None else value
    hop_ms = config.network.hop_latency_ms if config is not None else None
    return LoadOptions(**picked, hop_ms=load_default("hop_ms") if hop_ms is None else hop_ms)
