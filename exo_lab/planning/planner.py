"""Pure, exact, memory-aware pipeline planner: numbers in, a frozen :class:`Plan` out.

Conventions
-----------
* A stage is a contiguous half-open layer range ``[start_layer, stop_layer)``; stages cover
  ``[0, num_layers)`` in pipeline order. :func:`format_plan` shows them inclusive ("0-39").
* Nodes are used in the order given (config order = pipeline order). A plan uses a subsequence
  of them, one stage per used node; the first used node also holds the embeddings, the last
  holds the final norm and lm_head (and samples). Every stage holds at least one layer.

Cost model
----------
Memory of a stage (must be <= ``node.budget_bytes``)::

    weights    = layers x layer_bytes
                 + embedding_bytes                      (first stage)
                 + final_norm_bytes + lm_head_bytes     (last stage; a single stage of a tied
                                                          model shares the matrix: counted once)
    kv_cache   = layers x kv_bytes_per_token_per_layer x max_context x max_batch   (the KV slots)
    workspace  = activation_bytes_per_token x max(prefill_chunk, max_batch)  (one step's tokens)
                 + kv_bytes_per_token_per_layer x max_context x max_batch      (one layer's keys and
                                                                               values, gathered)
                 + vocab_size x 4 x max_batch                              (float32 logits, last stage)
    overhead   = node.overhead_bytes, or DEFAULT_OVERHEAD_BYTES[node.kind]
                 (the bare engine process with torch imported, plus the CUDA/MPS context)

Time of a stage per token (one stream, decode, memory-bound) = bytes it reads per token /
``node.bandwidth_bytes_per_s``: its layers, plus final norm + lm_head on the last stage (an
embedding lookup reads one row, so embeddings cost ~0). Where the engine measured this model at
this dtype (``node.measured_ms``, :mod:`exo_lab.engine.speed`): layers x its ms per layer, plus
its ms for the head on the last stage. Stage times are rounded to whole
picoseconds, so sums and ties are exact integers. Each hop between stages costs ``hop_ms``
(default ``DEFAULT_HOP_MS`` = 0.5 ms: a loopback/LAN round trip plus the activation transfer).
``DEFAULT_BANDWIDTH_BYTES_PER_S`` gives per-kind speed figures for callers building nodes (both
declared in exo_lab.settings, with every other default).

    predicted_ms_per_token = sum of stage ms + (stages - 1) x hop_ms      (both objectives)
    bottleneck_ms          = the slowest stage's ms

Objectives (each plan is the exact optimum, found by dynamic programming):

* ``latency`` (default): minimise predicted_ms_per_token; it uses no more stages than pay off.
* ``throughput``: minimise bottleneck_ms, then predicted_ms_per_token.
* ``min_stages=N`` (either objective) forces at least N stages.

Remaining ties go, in order, to: fewer stages; earlier nodes (smaller sum of node positions);
more even layer counts (smaller sum of squared stage sizes); then the first candidate the search
meets (deterministic).

Search: dynamic programming over (node position, layers placed, stages used capped at
min_stages), vectorised with numpy over (start layer, stop layer): O(N x L^2 x min_stages).
Throughput runs a min-max pass for the best bottleneck first, then the latency pass restricted
to stages no slower than it. 128 nodes x 128 layers plan in milliseconds (see
benchmarks/bench_planner.py).
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field, replace

import numpy as np

from ..errors import PlanError
from ..model.profile import ModelProfile
from ..units import format_bytes
from ..settings import DEFAULT_BANDWIDTH_BYTES_PER_S, DEFAULT_HOP_MS, OBJECTIVES, load_default  # noqa: F401 - callers take the bandwidths from here

logger = logging.getLogger(__name__)

DEFAULT_PREFILL_CHUNK = load_default("prefill_chunk")
DEFAULT_OVERHEAD_BYTES = {"cpu": 600_000_000, "cuda": 1_500_000_000, "mps": 1_000_000_000}
LOGITS_BYTES_PER_VOCAB_ENTRY = 4    # logits are sampled in float32 whatever the weights' dtype

_PS_PER_MS = 10**9
_INF = np.int64(2**62)              # "unreachable"; stays far from int64 overflow when added to


@dataclass(frozen=True)
class NodeSpec:
    """One place a stage can run (one engine)."""

    name: str                       # "system-b.local", "system-b.local/cpu" (planning.nodes), "engine-3" (local)
    budget_bytes: int               # free RAM or VRAM, capped by max_memory or gpu_memory (planning.nodes)
    bandwidth_bytes_per_s: float    # effective memory bandwidth: the speed figure (decode is memory-bound)
    kind: str = "cpu"               # "cpu" | "cuda" | "mps"
    overhead_bytes: int | None = None   # engine runtime overhead; None -> default for kind
    note: str | None = None         # shown with the kind, e.g. "gpu: true but torch has no CUDA"
    # measured on the engine for this model and dtype (exo_lab.engine.speed): (ms per decoder
    # layer, ms for the final norm + head) per token; when given, the stage times come from it
    # and not from the bandwidth
    measured_ms: tuple[float, float] | None = None

    @property
    def runtime_overhead_bytes(self) -> int:
        """The overhead the planner charges this node: ``overhead_bytes`` or the kind's default."""
        if self.overhead_bytes is not None:
            return self.overhead_bytes
        return DEFAULT_OVERHEAD_BYTES[self.kind]


@dataclass(frozen=True)
class StagePlan:
    node: str
    start_layer: int
    stop_layer: int                 # exclusive
    has_embeddings: bool
    has_head: bool                  # final norm + lm_head
    weights_bytes: int
    kv_cache_bytes: int
    workspace_bytes: int
    overhead_bytes: int
    total_bytes: int
    budget_bytes: int
    ms_per_token: float             # this stage alone, without hops
    kind: str = "cpu"               # the node's kind: "cpu" | "cuda" | "mps"
    note: str | None = None         # the node's note (why a gpu: true PC runs as a CPU)


@dataclass(frozen=True)
class UnusedNode:
    node: str
    reason: str


@dataclass(frozen=True)
class Plan:
    model: str
    dtype: str
    objective: str
    max_context: int
    max_batch: int
    predicted_ms_per_token: float   # one stream: stage times + hops, for both objectives
    stages: tuple[StagePlan, ...]
    unused_nodes: tuple[UnusedNode, ...] = field(default_factory=tuple)
    bottleneck_ms: float = 0.0      # slowest stage; what the throughput objective minimises
    hop_ms: float = DEFAULT_HOP_MS
    min_stages: int = 1

    @property
    def tokens_per_s(self) -> float:
        """Predicted decode speed of one stream."""
        return 1000.0 / self.predicted_ms_per_token if self.predicted_ms_per_token > 0 else float("inf")

    def to_json(self) -> dict:
        """A JSON-ready dict (the ``exo-lab plan --json`` output)."""
        return {
            "model": self.model, "dtype": self.dtype, "objective": self.objective,
            "max_context": self.max_context, "max_batch": self.max_batch,
            "predicted_ms_per_token": self.predicted_ms_per_token,
            "bottleneck_ms": self.bottleneck_ms,
            "stages": [_stage_json(stage) for stage in self.stages],
            "unused_nodes": [{"node": u.node, "reason": u.reason} for u in self.unused_nodes],
        }


def _stage_json(stage: StagePlan) -> dict:
    keys = ("node", "kind", "start_layer", "stop_layer", "weights_bytes", "kv_cache_bytes",
            "total_bytes", "budget_bytes", "ms_per_token", "note")
    return {key: getattr(stage, key) for key in keys}


# ----------------------------------------------------------------------------- the cost model

@dataclass(frozen=True)
class _Sizes:
    """The profile's byte counts at one max_context x max_batch, as plain ints."""

    num_layers: int
    layer_bytes: int
    kv_layer_bytes: int             # one layer's KV cache for max_context x max_batch tokens
    embedding_bytes: int
    head_bytes: int                 # final norm + lm_head
    shared_head_bytes: int          # saved by a single stage of a tied model
    prefill_bytes: int              # activation workspace of every stage (one step)
    logits_bytes: int               # extra workspace of the last stage

    @classmethod
    def of(cls, profile: ModelProfile, max_context: int, max_batch: int, prefill_chunk: int) -> _Sizes:
        tokens = max_context * max_batch
        step_tokens = max(min(prefill_chunk, max_context), max_batch)   # prompts are fed in chunks
        return cls(
            num_layers=profile.num_layers, layer_bytes=profile.layer_bytes,
            kv_layer_bytes=profile.kv_bytes_per_token_per_layer * tokens,
            embedding_bytes=profile.embedding_bytes,
            head_bytes=profile.final_norm_bytes + profile.lm_head_bytes,
            shared_head_bytes=profile.lm_head_bytes if profile.tied_embeddings else 0,
            prefill_bytes=(profile.activation_bytes_per_token * step_tokens
                           + profile.kv_bytes_per_token_per_layer * tokens),
            logits_bytes=profile.vocab_size * LOGITS_BYTES_PER_VOCAB_ENTRY * max_batch,
        )


def _stage_bytes(sizes: _Sizes, start, stop):
    """(weights, kv_cache, workspace) bytes of stage [start, stop); ints or numpy arrays."""
    first, last = (start == 0), (stop == sizes.num_layers)
    layers = stop - start
    weights = (layers * sizes.layer_bytes + first * sizes.embedding_bytes
               + last * sizes.head_bytes - (first & last) * sizes.shared_head_bytes)
    workspace = sizes.prefill_bytes + last * sizes.logits_bytes
    return weights, layers * sizes.kv_layer_bytes, workspace


def _read_bytes_e12(sizes: _Sizes, start, stop) -> np.ndarray:
    """Weight bytes stage [start, stop) reads per token, x 1e12 (so / bandwidth gives ps)."""
    read_bytes = (stop - start) * sizes.layer_bytes + (stop == sizes.num_layers) * sizes.head_bytes
    return np.asarray(read_bytes, dtype=np.float64) * 1e12


def _stage_ps(read_bytes_e12: np.ndarray, bandwidth_bytes_per_s: float) -> np.ndarray:
    """Whole picoseconds per token; the one rounding every caller shares, so ties stay exact."""
    return np.rint(read_bytes_e12 / bandwidth_bytes_per_s).astype(np.int64)


def _node_ps(sizes: _Sizes, node: NodeSpec, start, stop) -> np.ndarray:
    """Stage [start, stop)'s picoseconds per token on ``node``: its measured times per layer and
    head where the engine measured them, else the bytes it reads over the node's bandwidth."""
    if node.measured_ms is None:
        return _stage_ps(_read_bytes_e12(sizes, start, stop), node.bandwidth_bytes_per_s)
    # whole picoseconds per layer and for the head first, so that splits of equal time tie exactly
    layer_ps, head_ps = (int(round(ms * _PS_PER_MS)) for ms in node.measured_ms)
    layers = np.asarray(stop, dtype=np.int64) - np.asarray(start, dtype=np.int64)
    return layers * layer_ps + (np.asarray(stop) == sizes.num_layers).astype(np.int64) * head_ps


@dataclass(frozen=True)
class _NodeTable:
    """Every stage [start, stop) on one node, as (L+1) x (L+1) arrays indexed [start, stop]."""

    ps: np.ndarray                  # int64 stage time
    fits: np.ndarray                # bool: a real stage (start < stop) within the budget
    tie: np.ndarray                 # int64 tie-break weight (see _tie_radices)


def _layer_grid(num_layers: int) -> tuple[np.ndarray, np.ndarray]:
    index = np.arange(num_layers + 1, dtype=np.int64)
    return index[:, None], index[None, :]


def _node_tables(sizes: _Sizes, nodes: list[NodeSpec]) -> list[_NodeTable]:
    start, stop = _layer_grid(sizes.num_layers)
    need = sum(_stage_bytes(sizes, start, stop))
    real = start < stop
    radix_stages, radix_position = _tie_radices(len(nodes), sizes.num_layers)
    sizes_squared = np.where(real, (stop - start) ** 2, 0)
    return [
        _NodeTable(
            ps=_node_ps(sizes, node, start, stop),
            fits=real & (need + node.runtime_overhead_bytes <= node.budget_bytes),
            tie=radix_stages + position * radix_position + sizes_squared,
        )
        for position, node in enumerate(nodes)
    ]


def _tie_radices(num_nodes: int, num_layers: int) -> tuple[int, int]:
    """Mixed radices that make one additive int compare as (stages, sum of node positions,
    sum of squared stage sizes): each digit's largest total stays below the next radix."""
    radix_position = num_layers**2 + 1
    radix_stages = (num_nodes * (num_nodes - 1) // 2 + 1) * radix_position
    return radix_stages, radix_position


# ----------------------------------------------------------------------------- the search

def _lexmin(primary: np.ndarray, secondary: np.ndarray):
    """Per column: the row of the smallest (primary, secondary); the first such row on ties."""
    best_primary = primary.min(axis=0)
    masked = np.where(primary == best_primary, secondary, _INF)
    rows = masked.argmin(axis=0)
    return rows, best_primary, masked[rows, np.arange(primary.shape[1])]


def _min_bottleneck(tables: list[_NodeTable], num_layers: int, stages_cap: int) -> int:
    """The smallest possible slowest-stage time (ps) of any feasible plan; _INF if none."""
    bottleneck = np.full((stages_cap + 1, num_layers + 1), _INF, dtype=np.int64)
    bottleneck[0, 0] = 0
    for table in tables:
        merged = bottleneck.copy()
        for used in range(stages_cap + 1):
            rows = np.flatnonzero(bottleneck[used] < _INF)
            slowest = np.maximum(bottleneck[used, rows, None], table.ps[rows])
            reached = np.where(table.fits[rows], slowest, _INF).min(axis=0, initial=_INF)
            target = min(used + 1, stages_cap)
            merged[target] = np.minimum(merged[target], reached)
        bottleneck = merged
    return int(bottleneck[stages_cap, num_layers])


def _search(tables, num_layers, stages_cap, hop_ps, limit_ps):
    """Lexicographic-min (time, tie) DP. State: stages used (capped) x layers placed.
    Returns (time_ps incl. one hop per stage, [(node position, start, stop), ...]) or None."""
    shape = (stages_cap + 1, num_layers + 1)
    time, tie = np.full(shape, _INF, dtype=np.int64), np.full(shape, _INF, dtype=np.int64)
    time[0, 0] = tie[0, 0] = 0
    choices = []
    for table in tables:
        allowed = table.fits if limit_ps is None else table.fits & (table.ps <= limit_ps)
        time, tie, choice = _add_node(time, tie, table, allowed, hop_ps)
        choices.append(choice)
    if time[stages_cap, num_layers] >= _INF:
        return None
    return int(time[stages_cap, num_layers]), _walk_back(choices, stages_cap, num_layers)


def _add_node(time, tie, table, allowed, hop_ps):
    """One DP step: skip the node (kept on ties, so earlier nodes win) or give it a stage."""
    new_time, new_tie = time.copy(), tie.copy()
    from_start = np.full(time.shape, -1, dtype=np.int64)
    from_used = np.full(time.shape, -1, dtype=np.int64)
    stages_cap = time.shape[0] - 1
    for used in range(stages_cap + 1):
        rows = np.flatnonzero(time[used] < _INF)
        if rows.size == 0:
            continue
        ok = allowed[rows]
        cand_time = np.where(ok, time[used, rows, None] + table.ps[rows] + hop_ps, _INF)
        cand_tie = np.where(ok, tie[used, rows, None] + table.tie[rows], _INF)
        best_row, best_time, best_tie = _lexmin(cand_time, cand_tie)
        target = min(used + 1, stages_cap)
        better = (best_time < new_time[target]) | (
            (best_time == new_time[target]) & (best_tie < new_tie[target]))
        new_time[target] = np.where(better, best_time, new_time[target])
        new_tie[target] = np.where(better, best_tie, new_tie[target])
        from_start[target] = np.where(better, rows[best_row], from_start[target])
        from_used[target] = np.where(better, used, from_used[target])
    return new_time, new_tie, (from_start, from_used)


def _walk_back(choices, used, stop):
    stages = []
    for position in reversed(range(len(choices))):
        from_start, from_used = choices[position]
        start = int(from_start[used, stop])
        if start >= 0:
            stages.append((position, start, stop))
            used, stop = int(from_used[used, stop]), start
    assert stop == 0 and used == 0, "DP walk-back must end at the empty prefix"
    return stages[::-1]


# ----------------------------------------------------------------------------- public API

def plan_layers(profile: ModelProfile, nodes: list[NodeSpec], *, max_context: int = 2048,
                max_batch: int = 1, objective: str = "latency", min_stages: int = 1,
                hop_ms: float | None = None, prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> Plan:
    """Split ``profile``'s layers over ``nodes`` (in pipeline order) as well as the cost model
    allows; the module docstring defines the model, the objectives and the tie-breaking.

    Parameters: ``max_context`` x ``max_batch`` tokens of KV cache are reserved on every stage,
    and workspace for a step of ``max(prefill_chunk, max_batch)`` tokens; ``objective`` is "latency" or "throughput"; ``min_stages`` forces at least that
    many stages; ``hop_ms`` is the cost of one hop between stages (None: DEFAULT_HOP_MS).

    Raises PlanError for invalid arguments, or when no split fits in the nodes' memory (the
    message gives the numbers and what would help).
    """
    hop_ms = DEFAULT_HOP_MS if hop_ms is None else hop_ms
    _validate(profile, nodes, max_context, max_batch, objective, min_stages, hop_ms)
    max_context, max_batch, min_stages = int(max_context), int(max_batch), int(min_stages)
    sizes = _Sizes.of(profile, max_context, max_batch, int(prefill_chunk))
    tables = _node_tables(sizes, nodes)
    hop_ps = int(round(hop_ms * _PS_PER_MS))
    limit_ps = None
    if objective == "throughput":
        limit_ps = _min_bottleneck(tables, sizes.num_layers, min_stages)
        if limit_ps >= _INF:
            raise PlanError(_no_fit_message(profile, sizes, nodes, max_context, max_batch, min_stages))
    found = _search(tables, sizes.num_layers, min_stages, hop_ps, limit_ps)
    if found is None:
        raise PlanError(_no_fit_message(profile, sizes, nodes, max_context, max_batch, min_stages))
    time_ps, placement = found
    stages = tuple(_stage_plan(sizes, nodes[p], start, stop) for p, start, stop in placement)
    plan = Plan(
        model=profile.model_id, dtype=profile.dtype, objective=objective,
        max_context=max_context, max_batch=max_batch,
        predicted_ms_per_token=(time_ps - hop_ps) / _PS_PER_MS, stages=stages,
        bottleneck_ms=max(stage.ms_per_token for stage in stages), hop_ms=hop_ms,
        min_stages=min_stages,
    )
    logger.debug("planned %s over %d of %d nodes: %.3f ms/token (%s)", profile.model_id,
                 len(stages), len(nodes), plan.predicted_ms_per_token, objective)
    return _with_unused_reasons(plan, sizes, nodes)


def slowed(node: NodeSpec, factor: float) -> NodeSpec:
    """``node`` running ``factor`` times slower than its measured (or configured) speed: a PC
    busier than when it was measured (``factor`` > 1), as seen by the stage times while serving
    (exo_lab.coordinator.balance)."""
    if factor == 1.0:
        return node
    if node.measured_ms is not None:
        return replace(node, measured_ms=(node.measured_ms[0] * factor, node.measured_ms[1] * factor))
    return replace(node, bandwidth_bytes_per_s=node.bandwidth_bytes_per_s / factor)


def reprice(plan: Plan, profile: ModelProfile, nodes: list[NodeSpec]) -> Plan:
    """``plan``'s stages as they are, timed on ``nodes`` (found by name) at their speeds now:
    what the plan in force costs, to compare with a new plan for the same speeds. Memory figures
    stay the plan's. Raises PlanError when a stage's node is not among ``nodes``."""
    by_name = {node.name: node for node in nodes}
    missing = [stage.node for stage in plan.stages if stage.node not in by_name]
    if missing:
        raise PlanError(f"cannot time the plan in force: no speed for node(s) {missing}")
    sizes = _Sizes.of(profile, plan.max_context, plan.max_batch, DEFAULT_PREFILL_CHUNK)
    stages = tuple(replace(stage, ms_per_token=_stage_ms(sizes, by_name[stage.node], stage.start_layer,
                                                         stage.stop_layer))
                   for stage in plan.stages)
    return replace(plan, stages=stages, predicted_ms_per_token=sum(s.ms_per_token for s in stages)
                   + (len(stages) - 1) * plan.hop_ms, bottleneck_ms=max(s.ms_per_token for s in stages))


def _stage_ms(sizes: _Sizes, node: NodeSpec, start: int, stop: int) -> float:
    """Stage [start, stop)'s ms per token on ``node`` (from its whole picoseconds)."""
    return int(_node_ps(sizes, node, start, stop)) / _PS_PER_MS


def _stage_plan(sizes: _Sizes, node: NodeSpec, start: int, stop: int) -> StagePlan:
    weights, kv_cache, workspace = (int(b) for b in _stage_bytes(sizes, start, stop))
    overhead = node.runtime_overhead_bytes
    return StagePlan(
        node=node.name, start_layer=start, stop_layer=stop, has_embeddings=start == 0,
        has_head=stop == sizes.num_layers, weights_bytes=weights, kv_cache_bytes=kv_cache,
        workspace_bytes=workspace, overhead_bytes=overhead,
        total_bytes=weights + kv_cache + workspace + overhead, budget_bytes=node.budget_bytes,
        ms_per_token=_stage_ms(sizes, node, start, stop),
        kind=node.kind, note=node.note,
    )


def _validate(profile, nodes, max_context, max_batch, objective, min_stages, hop_ms) -> None:
    if objective not in OBJECTIVES:
        raise PlanError(f"objective {objective!r} is not one of {', '.join(OBJECTIVES)}")
    if not nodes:
        raise PlanError("no compute nodes to plan on: give at least one node "
                        "(a device with the compute role, or engines >= 1)")
    if profile.num_layers < 1:
        raise PlanError(f"model {profile.model_id} has {profile.num_layers} layers; need >= 1")
    for name, value in (("max_context", max_context), ("max_batch", max_batch)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise PlanError(f"{name} must be an integer >= 1, got {value!r}")
    if not 0 <= hop_ms < math.inf:
        raise PlanError(f"hop_ms must be a finite number >= 0, got {hop_ms!r}")
    most = min(len(nodes), profile.num_layers)
    if not isinstance(min_stages, (int, np.integer)) or not 1 <= min_stages <= most:
        raise PlanError(f"min_stages must be an integer from 1 to {most} (one stage per node, at "
                        f"least one layer each: {len(nodes)} nodes, {profile.num_layers} layers), "
                        f"got {min_stages!r}")
    _validate_nodes(nodes)


def _validate_nodes(nodes: list[NodeSpec]) -> None:
    seen = set()
    for node in nodes:
        if node.name in seen:
            raise PlanError(f"node name {node.name!r} appears twice; node names must be unique")
        seen.add(node.name)
        if node.kind not in DEFAULT_OVERHEAD_BYTES:
            raise PlanError(f"node {node.name}: kind {node.kind!r} is not one of "
                            f"{', '.join(DEFAULT_OVERHEAD_BYTES)}")
        if not node.bandwidth_bytes_per_s > 0:
            raise PlanError(f"node {node.name}: bandwidth_bytes_per_s must be > 0, "
                            f"got {node.bandwidth_bytes_per_s!r}")
        if node.budget_bytes < 0 or (node.overhead_bytes is not None and node.overhead_bytes < 0):
            raise PlanError(f"node {node.name}: budget_bytes and overhead_bytes must be >= 0")


# ----------------------------------------------------------------------------- explanations

def _single_layer_need(sizes: _Sizes, node: NodeSpec) -> tuple[int, tuple[int, int, int]]:
    """Bytes of this node's cheapest one-layer stage (over all positions) and its breakdown."""
    parts = _cheapest_single_layer(sizes)
    return sum(parts) + node.runtime_overhead_bytes, parts


@functools.lru_cache(maxsize=16)
def _cheapest_single_layer(sizes: _Sizes) -> tuple[int, int, int]:
    start = np.arange(sizes.num_layers, dtype=np.int64)
    parts = [np.broadcast_to(b, start.shape) for b in _stage_bytes(sizes, start, start + 1)]
    cheapest = int(np.argmin(sum(parts)))
    return tuple(int(b[cheapest]) for b in parts)


def _with_unused_reasons(plan: Plan, sizes: _Sizes, nodes: list[NodeSpec]) -> Plan:
    used = {stage.node for stage in plan.stages}
    slowest_used = min(n.bandwidth_bytes_per_s for n in nodes if n.name in used)
    unused = tuple(UnusedNode(n.name, _unused_reason(plan, sizes, n, slowest_used))
                   for n in nodes if n.name not in used)
    return replace(plan, unused_nodes=unused)


def _unused_reason(plan: Plan, sizes: _Sizes, node: NodeSpec, slowest_used: float) -> str:
    need, (weights, kv_cache, workspace) = _single_layer_need(sizes, node)
    if need > node.budget_bytes:
        return (f"too little memory: budget {format_bytes(node.budget_bytes)} < {format_bytes(need)} "
                f"for a single layer + overhead (weights {format_bytes(weights)} + KV cache "
                f"{format_bytes(kv_cache)} + workspace {format_bytes(workspace)} + overhead "
                f"{format_bytes(node.runtime_overhead_bytes)})")
    stages = f"plan uses {_count(len(plan.stages), 'stage')}"
    if node.bandwidth_bytes_per_s < slowest_used:
        return (f"not needed: slower than every node in the plan "
                f"({_format_rate(node.bandwidth_bytes_per_s)} < {_format_rate(slowest_used)}; {stages})")
    if plan.objective == "throughput":
        return (f"not needed: no plan using it has a lower bottleneck than {plan.bottleneck_ms:.3f} "
                f"ms/token, or that bottleneck at lower latency ({stages})")
    return (f"not needed: fewer hops are faster - no plan using it beats "
            f"{plan.predicted_ms_per_token:.3f} ms/token ({stages}; each hop adds {plan.hop_ms:g} ms)")


def _format_rate(bytes_per_s: float) -> str:
    return f"{format_bytes(int(bytes_per_s))}/s"


def _no_fit_message(profile, sizes, nodes, max_context, max_batch, min_stages) -> str:
    weights = profile.total_parameter_bytes
    kv_cache = sizes.num_layers * sizes.kv_layer_bytes
    workspace = sizes.prefill_bytes + sizes.logits_bytes
    overhead = min(n.runtime_overhead_bytes for n in nodes)
    need = weights + kv_cache + workspace + overhead
    offered = sum(n.budget_bytes for n in nodes)
    budgets = ", ".join(f"{n.name} {format_bytes(n.budget_bytes)}" for n in nodes)
    head = f"model {profile.model_id} ({profile.dtype}, {sizes.num_layers} layers) does not fit: "
    if offered < need:
        detail = (f"it needs at least {format_bytes(need)} (weights {format_bytes(weights)} + KV cache "
                  f"{format_bytes(kv_cache)} at max_context {max_context} x max_batch {max_batch} + "
                  f"workspace {format_bytes(workspace)} + one engine's overhead {format_bytes(overhead)}) "
                  f"but the compute nodes offer only {format_bytes(offered)} in total ({budgets}).")
    else:
        detail = (f"the nodes offer {format_bytes(offered)} in total, but no split into contiguous "
                  f"stages fits{_min_stages_note(min_stages)}: "
                  + "; ".join(_capacity_note(sizes, n) for n in nodes) + ".")
    return head + detail + " " + _help(profile, nodes, max_context, max_batch)


def _min_stages_note(min_stages: int) -> str:
    return f" with at least {min_stages} stages" if min_stages > 1 else ""


def _capacity_note(sizes: _Sizes, node: NodeSpec) -> str:
    need, _ = _single_layer_need(sizes, node)
    if need > node.budget_bytes:
        return (f"{node.name} (budget {format_bytes(node.budget_bytes)}) cannot hold a single layer "
                f"({format_bytes(need)} with overhead)")
    start, stop = _layer_grid(sizes.num_layers)
    fits = (start < stop) & (sum(_stage_bytes(sizes, start, stop)) + node.runtime_overhead_bytes
                             <= node.budget_bytes)
    layers = np.where(fits, stop - start, 0)
    return (f"{node.name} (budget {format_bytes(node.budget_bytes)}) holds at most "
            f"{_count(int(layers[1:, 1:-1].max(initial=0)), 'layer')} mid-pipeline, "
            f"{int(layers[0].max())} with the embeddings, {int(layers[:, -1].max())} with the head")


def _device_text(stage: StagePlan) -> str:
    return f"{stage.kind} ({stage.note})" if stage.note else stage.kind


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _help(profile: ModelProfile, nodes: list[NodeSpec], max_context: int, max_batch: int) -> str:
    tips = ["add compute nodes", "raise max_memory"]
    names = {node.name for node in nodes}
    if any(node.kind == "cuda" and f"{node.name.split('#')[0]}/cpu" not in names for node in nodes):
        tips.append("give a GPU PC one more engine than it has GPUs (engines:) so its RAM holds a CPU "
                    "stage too (and set gpu_memory to its GPU's free memory, for exo-lab plan)")
    elif any(node.kind == "cuda" for node in nodes):
        tips.append("set gpu_memory to each GPU's real free memory where exo-lab plan assumed it")
    tips.append(f"lower max_context ({max_context}) or max_batch ({max_batch})")
    if profile.dtype == "float32":
        tips.append("use a smaller dtype such as bfloat16 (half the bytes of float32)")
    if profile.dtype in ("bfloat16", "float16"):
        tips.append("use dtype int8 (weight-only: about half the bytes of bfloat16)")
    return "What would help: " + "; ".join(tips) + "."


# ----------------------------------------------------------------------------- display

def format_plan(plan: Plan) -> str:
    """A readable table of the plan: one row per stage, the prediction, and unused nodes."""
    rows = [("stage", "node", "device", "layers", "weights", "KV cache", "total / budget", "ms/token")]
    for index, stage in enumerate(plan.stages):
        rows.append((str(index), stage.node, _device_text(stage), f"{stage.start_layer}-{stage.stop_layer - 1}",
                     format_bytes(stage.weights_bytes), format_bytes(stage.kv_cache_bytes),
                     f"{format_bytes(stage.total_bytes)} / {format_bytes(stage.budget_bytes)}",
                     f"{stage.ms_per_token:.3f}"))
    widths = [max(len(row[col]) for row in rows) for col in range(len(rows[0]))]
    lines = [f"Plan for {plan.model} ({plan.dtype}), objective {plan.objective}, "
             f"max_context {plan.max_context} x max_batch {plan.max_batch}",
             "(layers inclusive: 0-39 is [0, 40); total = weights + KV cache + workspace + overhead)"]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    hops = len(plan.stages) - 1
    lines.append(f"predicted: {plan.predicted_ms_per_token:.3f} ms/token ({plan.tokens_per_s:.1f} "
                 f"tokens/s) incl. {_count(hops, 'hop')} x {plan.hop_ms:g} ms; "
                 f"bottleneck {plan.bottleneck_ms:.3f} ms/token")
    if plan.unused_nodes:
        lines.append("unused nodes:")
        lines += [f"  {unused.node}: {unused.reason}" for unused in plan.unused_nodes]
    return "\n".join(lines)
