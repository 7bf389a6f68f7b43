"""Loading a model onto the engines: resolve, profile, plan, load shards, wire the data plane.

:func:`load_pipeline` returns a :class:`Pipeline`: the plan, its stage engines in order, the
tokenizer and the scheduler that drives them. On any error every stage that did load is
unloaded again, so a failed load leaves the engines as they were: empty and usable.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..control_types import EngineState, LoadedStage, ShardSpec, received
from ..engine import worker as engine_worker
from ..errors import ClusterError, ExoLabError, ModelError
from ..model.profile import profile_from_config
from ..weights.gguf import tensor_table
from ..weights.resolve import read_model_config, resolve_model
from ..planning.options import LoadOptions
from ..planning.planner import Plan, PlanError, reprice
from . import balance
from .adapters import push as push_adapters
from .control import EngineControl, EngineInfo
from .loop import LoopThread
from .draft_model import DraftModel
from .schedule import Speculation
from .scheduler import Scheduler

logger = logging.getLogger(__name__)

LIVENESS_CHECK_S = 0.5     # how often a long load checks that its engines are still alive
LOAD_ATTEMPTS = 3          # plans tried when engines die while their shards load


@dataclass
class Pipeline:
    """A loaded model: its plan, the engine of each stage (pipeline order), the tokenizer and
    the scheduler that sends requests through the stages."""

    model_id: str
    model_dir: Path
    options: LoadOptions
    plan: Plan
    engines: list[EngineInfo]
    tokenizer: object
    context_length: int
    scheduler: Scheduler
    load_s: float
    profile: object = None                    # the ModelProfile planned with
    speed_factors: dict = field(default_factory=dict)   # node -> slowdown the plan assumed
    loaded_at: float = field(default_factory=time.monotonic)
    seen_factors: dict | None = None          # the slowdowns the last re-balance check saw
    addresses: list = field(default_factory=list)   # each stage's data-plane inbox (fine-tuning's upstream)

    def stage_of(self, engine_id: int) -> int | None:
        """The stage index an engine runs, or None."""
        return next((i for i, e in enumerate(self.engines) if e.engine_id == engine_id), None)

    def dead_engines(self, control: EngineControl) -> list[EngineInfo]:
        """The stage engines that are gone (left the controller, or their process died)."""
        return [info for info in self.engines if control.is_gone(info)]

    def dead_stage_message(self, control: EngineControl) -> str | None:
        """A message naming the first stage whose engine is gone, or None when all are up."""
        for index, info in enumerate(self.engines):
            if control.is_gone(info):
                stage = self.plan.stages[index]
                return (f"engine {info.engine_id} ({info.node}, stage {index}, layers "
                        f"[{stage.start_layer}, {stage.stop_layer})) stopped")
        return None

    def close(self, control: EngineControl, loop: LoopThread | None) -> None:
        """Stop the scheduler and free every stage (the engines stay up)."""
        if loop is not None:
            try:
                loop.run(self.scheduler.close(), timeout_s=10)
            except Exception:
                logger.exception("closing the scheduler failed")
        unload_engines(control, self.engines)


def load_pipeline(control: EngineControl, loop: LoopThread, options: LoadOptions, *,
                  check_alive, progress: bool, timeout_s: float, on_failure=None,
                  failover_from: Pipeline | None = None, keep_plan: bool = False, adapters=None) -> Pipeline:
    """Plan ``options.model`` over the live engines and load one shard per stage.

    ``failover_from``: the pipeline that lost an engine. The plan then uses the engines that
    answer (the survivors and any spares), a stage whose layers stay on the same engine keeps
    its weights, and the old pipeline's scheduler, with the requests it holds, goes on over the
    new stages; with ``keep_plan`` its plan and stage engines stay (shedding KV slots, or giving
    them back: only ``options.max_batch`` differs, and every stage keeps its weights).
    ``on_failure(reason)`` is what the scheduler calls when this pipeline is lost. ``adapters``
    (an AdapterRegistry): the LoRA adapters every stage gets before any request runs.
    An engine that dies while the shards load is left out and the model is planned again on
    the engines left, up to LOAD_ATTEMPTS times.
    Raises ModelError, PlanError or ClusterError; on error nothing stays loaded."""
    lost = {e.engine_id for e in failover_from.dead_engines(control)} if failover_from is not None else set()
    for attempt in range(1, LOAD_ATTEMPTS + 1):
        try:
            return _load_once(control, loop, options, check_alive=check_alive, progress=progress,
                              timeout_s=timeout_s, on_failure=on_failure, failover_from=failover_from,
                              lost=lost, survivors_only=failover_from is not None or attempt > 1,
                              keep_plan=keep_plan and not lost, adapters=adapters)
        except EngineLost as exc:
            if attempt == LOAD_ATTEMPTS:
                raise
            lost.add(exc.engine_id)
            logger.warning("%s; planning again on the engines left", exc)
    raise AssertionError("unreachable")


class EngineLost(ClusterError):
    """An engine died while its shard loaded (``engine_id``)."""

    def __init__(self, info: EngineInfo):
        super().__init__(f"engine {info.engine_id} ({info.node}) died while loading its shard")
        self.engine_id = info.engine_id


def _load_once(control: EngineControl, loop: LoopThread, options: LoadOptions, *, check_alive, progress: bool,
               timeout_s: float, on_failure, failover_from: Pipeline | None, lost: set[int],
               survivors_only: bool, keep_plan: bool = False, adapters=None) -> Pipeline:
    started = time.perf_counter()
    model_id = _portable_model_id(options.model)
    model_dir = resolve_model(model_id, need_weights=False)
    config = read_model_config(model_dir)
    profile = profile_from_config(config, dtype=options.dtype, model_id=model_id, tensors=tensor_table(model_dir))
    if keep_plan and failover_from is not None:
        plan, stage_engines = failover_from.plan, list(failover_from.engines)
        _check_engines_alive(control, stage_engines)
    else:
        engines = control.probe(survivors_only=survivors_only, exclude=lost)
        if not engines:
            raise ClusterError("no compute engine is available: start workers or Cluster.local(engines=N)")
        engines = control.measure_speeds(engines, config, options.dtype)
        if survivors_only:   # a spread asked for cannot outnumber the survivors
            options = dataclasses.replace(options, min_stages=min(options.min_stages, len(engines)))
        plan = options.plan(profile, control.node_specs(engines))
        by_node = {e.node: e for e in engines}
        stage_engines = [by_node[stage.node] for stage in plan.stages]
    tokenizer = _load_tokenizer(model_dir)
    context_length = options.context_length(profile.max_position_embeddings)
    draft = None
    if options.speculation == "draft_model" and failover_from is None:   # a failover keeps the scheduler's
        busy = sum(info.threads for info in stage_engines if info.local and info.kind == "cpu")
        draft = DraftModel.load(options.draft_model or model_id, dtype=options.draft_dtype,
                                context_length=context_length, tokenizer=tokenizer, served_dir=model_dir,
                                busy_threads=busy)
    try:
        addresses = _load_shards(control, model_id, profile.num_layers, options, context_length,
                                 plan, stage_engines, progress, timeout_s)
        if adapters is not None:        # before the scheduler replays a request that names one
            push_adapters(control, adapters.for_model(model_id), plan, stage_engines)
        settings = {**_scheduler_settings(tokenizer, config, context_length, options, stage_engines),
                    "draft_model": draft}
        scheduler = _connect(control, loop, addresses, stage_engines, check_alive,
                             {**settings, "on_failure": on_failure},
                             failover_from.scheduler if failover_from is not None else None)
    except BaseException:
        unload_engines(control, stage_engines)
        raise
    logger.info("loaded %s in %.1f s over %d stage(s)", model_id, time.perf_counter() - started,
                len(plan.stages))
    return Pipeline(model_id=model_id, model_dir=Path(model_dir), options=options, plan=plan,
                    engines=stage_engines, tokenizer=tokenizer, context_length=context_length,
                    scheduler=scheduler, load_s=time.perf_counter() - started, profile=profile, addresses=list(addresses),
                    speed_factors={info.node: control.speed_factors.get(info.node, 1.0) for info in stage_engines})


def propose_plan(control: EngineControl, options: LoadOptions) -> Plan:
    """The plan ``options`` would load on the engines registered now (probes them)."""
    model_id = _portable_model_id(options.model)
    model_dir = resolve_model(model_id, need_weights=False)
    config = read_model_config(model_dir)
    profile = profile_from_config(config, dtype=options.dtype, model_id=model_id, tensors=tensor_table(model_dir))
    engines = control.measure_speeds(control.probe(), config, options.dtype)   # as the plan in force was
    return options.plan(profile, control.node_specs(engines))


@dataclass(frozen=True)
class Rebalance:
    """A move worth making: the plan for the speeds seen now, the plan in force timed at them,
    and the slowdown of each node (control.speed_factors) to plan it with."""

    candidate: Plan
    current: Plan
    factors: dict

    def describe(self) -> str:
        slower = ", ".join(f"{node} x{factor:.2f}" for node, factor in sorted(self.factors.items()))
        return (f"stage times now: {slower}; {self.current.predicted_ms_per_token:.1f} -> "
                f"{self.candidate.predicted_ms_per_token:.1f} ms/token, slowest stage "
                f"{self.current.bottleneck_ms:.1f} -> {self.candidate.bottleneck_ms:.1f} ms")


def propose_rebalance(control: EngineControl, pipeline: Pipeline, ratios: tuple[float, ...] | None,
                      now: float | None = None) -> Rebalance | None:
    """A re-balance when ``ratios`` (each stage's recent decode step time over its time when the
    pipeline began: balance.StageClock) say a stage's PC runs slower or faster than when the plan
    began by more than balance.REBALANCE_DRIFT, and the plan for the speeds seen now beats the
    plan in force, timed at those speeds, by the re-plan margin (:func:`is_better`). Nothing is
    sent to the engines: the planner runs on the engines as last probed."""
    now = time.monotonic() if now is None else now
    if (ratios is None or len(pipeline.plan.stages) < 2 or pipeline.profile is None
            or now - pipeline.loaded_at < balance.REBALANCE_INTERVAL_S):
        return None
    nodes = [stage.node for stage in pipeline.plan.stages]
    seen = balance.slowdowns(nodes, ratios, pipeline.speed_factors)
    before, pipeline.seen_factors = pipeline.seen_factors, seen
    if seen is None or not balance.drifted(seen, pipeline.speed_factors) or not balance.steady(seen, before):
        return None
    factors = {**control.speed_factors, **seen}
    engines = [info for info in control.infos.values() if not control.is_gone(info)]
    specs = control.node_specs(sorted(engines, key=lambda info: info.engine_id), factors)
    try:
        candidate = pipeline.options.plan(pipeline.profile, specs)
        current = reprice(pipeline.plan, pipeline.profile, specs)
    except PlanError:
        return None
    move = Rebalance(candidate, current, factors)
    if not is_better(candidate, current):
        logger.debug("stages drifted but no plan is better enough: %s", move.describe())
        return None
    return move


# A re-plan loads a new plan only when it predicts at least this much better, by both measures:
# measured speeds vary by a few percent from one measure to the next (and by more on a model
# whose layers take microseconds: benchmarks/bench_prediction.py), and a reload pauses every
# stream for seconds.
REPLAN_MARGIN = 0.10
REPLAN_MIN_GAIN_MS = 1.0


def is_better(candidate: Plan, current: Plan, margin: float = REPLAN_MARGIN,
              min_gain_ms: float = REPLAN_MIN_GAIN_MS) -> bool:
    """Whether ``candidate`` beats ``current`` by more than ``margin`` and ``min_gain_ms`` on
    the objective (latency: ms per token; throughput: the slowest stage, then ms per token)."""
    def cost(plan: Plan) -> tuple[float, ...]:
        if plan.objective == "throughput":
            return (plan.bottleneck_ms, plan.predicted_ms_per_token)
        return (plan.predicted_ms_per_token,)

    for new, old in zip(cost(candidate), cost(current)):
        if new < old * (1 - margin) and old - new >= min_gain_ms:
            return True
        if new > old * (1 + margin):
            return False
    return False


def _portable_model_id(model: str) -> str:
    """Local folders travel to the engines as absolute paths; hub ids and "demo" as they are."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def _load_tokenizer(model_dir):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as exc:  # transformers raises OSError/ValueError/... for a missing tokenizer
        raise ModelError(f"cannot load the tokenizer from {model_dir}: {exc}; the folder needs "
                         "tokenizer.json (or the tokenizer files of its model)") from exc


def _load_shards(control: EngineControl, model_id, num_layers, options: LoadOptions, context_length, plan,
                 stage_engines, progress, timeout_s) -> list[str]:
    """Load every stage in parallel; returns their inbox addresses in pipeline order. Every
    stage's ShardSpec is built (and so checked) before the first is sent."""
    from tqdm.auto import tqdm

    specs = shard_specs(model_id, num_layers, options, context_length, plan, stage_engines)
    pending = {}
    for index, (spec, info) in enumerate(zip(specs, stage_engines)):
        control.set_state(info.engine_id, EngineState.LOADING)
        future = control.submit(info.engine_id, engine_worker.load_stage, spec, index, len(plan.stages),
                                *control.inbox_hosts(info, stage_engines), ports=control.inbox_ports)
        pending[future] = index
    results = {}
    deadline = time.monotonic() + timeout_s
    with tqdm(total=num_layers, desc=f"loading {model_id}", unit="layer", leave=False, disable=None if progress else True) as bar:
        while pending:
            done, _ = concurrent.futures.wait(list(pending), timeout=LIVENESS_CHECK_S,
                                              return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                index = pending.pop(future)
                results[index] = _stage_loaded(control, future, stage_engines[index])
                bar.update(plan.stages[index].stop_layer - plan.stages[index].start_layer)
            _check_engines_alive(control, stage_engines)
            if time.monotonic() > deadline:
                raise ClusterError(f"loading did not finish within {timeout_s:.0f} s (stages still loading: "
                                   f"{sorted(pending.values())}); raise timeout_s for very large models")
    return [results[i].address for i in range(len(plan.stages))]


def shard_specs(model_id: str, num_layers: int, options: LoadOptions, context_length: int, plan: Plan,
                stage_engines: list[EngineInfo]) -> list[ShardSpec]:
    """The ShardSpec of each stage of ``plan`` (pipeline order); ``model_id`` as the engines
    resolve it. Raises ModelError naming a bad field, before anything is sent."""
    return [ShardSpec(model_dir=model_id, start_layer=stage.start_layer, stop_layer=stage.stop_layer,
                      num_layers=num_layers, dtype=options.dtype, device=info.device,
                      max_context=context_length, max_batch=options.max_batch)
            for stage, info in zip(plan.stages, stage_engines)]


def _stage_loaded(control: EngineControl, future, info: EngineInfo) -> LoadedStage:
    try:
        result = control.result(info.engine_id, future, f"loading its shard on {info.node}")
        loaded = received(result, LoadedStage, f"engine {info.engine_id}")
    except ExoLabError as exc:
        control.set_state(info.engine_id, EngineState.FAILED)
        if control.is_gone(info):
            raise EngineLost(info) from exc
        raise
    control.set_state(info.engine_id, EngineState.IDLE)
    return loaded


def _check_engines_alive(control: EngineControl, stage_engines: list[EngineInfo]) -> None:
    for info in stage_engines:
        if control.is_gone(info):
            control.set_state(info.engine_id, EngineState.FAILED)
            raise EngineLost(info)


def unload_engines(control: EngineControl, engines: list[EngineInfo]) -> None:
    """Free the stages of those of ``engines`` still registered (a failure is logged, not raised)."""
    alive = [info.engine_id for info in engines if info.engine_id in set(control.ids)]
    results = control.gather(alive, engine_worker.unload_stage, timeout_s=30, what="unloading")
    for engine_id, result in results.items():
        if isinstance(result, ExoLabError):
            logger.warning("could not unload engine %d: %s", engine_id, result)


def _scheduler_settings(tokenizer, config, context_length, options: LoadOptions,
                        stage_engines: list[EngineInfo]) -> dict:
    return dict(tokenizer=tokenizer, eos_token_ids=eos_token_ids(tokenizer, config), context_length=context_length,
                max_batch=options.max_batch,
                micro_batches=options.micro_batches or default_micro_batches(stage_engines),
                prefill_chunk=options.prefill_chunk, max_queued=options.max_queued,
                speculation=speculation_of(options.speculation), vocab_size=_vocab_size(config))


def _vocab_size(config: dict) -> int | None:
    value = config.get("vocab_size")
    return value if isinstance(value, int) and value > 0 else None


def speculation_of(mode: str) -> Speculation:
    """The scheduling core's Speculation for the ``speculation`` setting."""
    return Speculation(drafter=mode)


def default_micro_batches(stage_engines: list[EngineInfo]) -> int:
    """One micro-batch per stage, so that with K stages on K PCs every PC computes at once;
    but one in all when the CPU stages sharing a PC have more torch threads together than it has
    cores. They then take turns, each with all its threads: OpenMP teams computing at once on
    too few cores wait on each other's barriers (SmolLM2, 2 engines x 2 threads on 2 cores, 8
    streams: 19 tokens/s with 2 micro-batches, 69 with 1)."""
    threads: dict[str, int] = {}
    cores: dict[str, int] = {}
    for info in stage_engines:
        if info.kind == "cpu":
            threads[info.hostname] = threads.get(info.hostname, 0) + info.threads
            cores[info.hostname] = info.probe.cores
    if any(threads[host] > cores[host] for host in threads):
        return 1
    return len(stage_engines)


def _connect(control: EngineControl, loop: LoopThread, addresses, stage_engines, check_alive,
             settings: dict, scheduler: Scheduler | None = None) -> Scheduler:
    """Chain coordinator -> stage 0 -> ... -> last stage -> coordinator and start serving: a
    new scheduler, or ``scheduler`` (after a failover) rewired to the new stages.

    The coordinator's sockets live on the loop; the ipyparallel calls that start the stage
    workers run here, in the caller's thread, so the loop (and an API server on it) never
    waits on the control plane."""
    bind, advertise = control.coordinator_inbox_hosts(stage_engines)
    inbox, outbox = loop.run(_make_sockets(bind, advertise, control.inbox_ports, addresses[0],
                                           control.data_plane_key))
    try:
        for info, next_address in zip(stage_engines, addresses[1:] + [inbox.address]):
            control.call(info.engine_id, engine_worker.start_worker, next_address,
                         what="starting the stage worker")
    except BaseException:
        inbox.close()
        outbox.close()
        raise
    if scheduler is not None:
        loop.run(scheduler.rewire(inbox, outbox, settings["micro_batches"], settings["max_batch"],
                                  settings["prefill_chunk"]))
        return scheduler
    scheduler = loop.run(_make_scheduler(inbox, outbox, check_alive, settings))
    loop.run(_start(scheduler))
    return scheduler


async def _make_sockets(bind, advertise, ports, first_address, key: bytes):
    from ..wire import AsyncInbox, AsyncOutbox

    return (AsyncInbox(host=bind, port=ports or 0, advertise_host=advertise, key=key),
            AsyncOutbox(None, first_address, key=key))


async def _make_scheduler(inbox, outbox, check_alive, settings: dict) -> Scheduler:
    return Scheduler(inbox=inbox, outbox=outbox, check_alive=check_alive, **settings)


async def _start(scheduler: Scheduler) -> None:
    scheduler.start()


def eos_token_ids(tokenizer, config: dict) -> set[int]:
    """Every end-of-sequence id the model's config, tokenizer and generation config name."""
    ids = set()
    for value in (config.get("eos_token_id"), tokenizer.eos_token_id, _generation_eos(tokenizer)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def _generation_eos(tokenizer):
    path = Path(tokenizer.name_or_path) / "generation_config.json"
    try:
        return json.loads(path.read_text()).get("eos_token_id")
    except (OSError, ValueError):
        return None
