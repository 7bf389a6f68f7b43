"""The supervisor: the one owner of the cluster's life.

One state machine (:class:`State`, its moves listed once in :data:`TRANSITIONS`) and one thread of
its own decide everything that happens to the loaded model: load, unload, re-plan, failover and
stop. The others only ask or report, through one queue:

- user calls (:class:`Load`, :class:`Replan`, :class:`Unload`) are typed commands; the caller
  waits for the result and gets the error the work raised (ConfigError, ModelError, PlanError,
  ClusterError);
- the scheduler reports a lost pipeline through its ``on_failure(reason)`` (on the loop thread,
  once it has suspended itself) and is then told what to do: go on over new stages (``rewire``,
  which the failover load does) or end every request (``abort``);
- membership is a tick of the same queue every MEMBERSHIP_CHECK_S (:class:`CheckMembership`).

Failover: serving -> suspended -> replanning -> serving, the scheduler replaying its requests on
the survivors (spares included); or -> failed when they cannot hold the model: every request
ends with the reason, /health says it, and the model loads again by itself once the registered
engines change. With ``replan: auto`` a change of engines re-plans a serving model at a moment
no request runs, and the same tick re-balances a serving model whose stages run slower or faster
than planned (a PC got busier or freer: :mod:`.balance`): serving -> replanning -> serving, the
layers moved by the failover path while every stage is up (streams replayed, identical tokens;
a stage whose layers stay keeps its weights).

What the supervisor does to the world goes through a :class:`Runtime`: :class:`EngineRuntime` on
real engines, a fake in tests (tests/test_supervisor.py), so the machine runs in one process.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import enum
import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ..engine import worker as engine_worker
from ..errors import ClusterError, ExoLabError
from ..planning.options import LoadOptions
from ..planning.planner import Plan
from . import memory
from .adapters import AdapterRegistry
from .control import EngineControl
from .loop import LoopThread
from .pipeline import Pipeline, Rebalance, is_better, load_pipeline, propose_plan, propose_rebalance, unload_engines

logger = logging.getLogger(__name__)

DEFAULT_LOAD_TIMEOUT_S = 1800.0
MEMBERSHIP_CHECK_S = 2.0     # how often the registered engines (and their PCs' memory) are looked at
MEMORY_REPORT_S = 5.0        # how long the stage engines get to report their memory
MEMORY_RETRY_S = 10.0        # failed for want of memory: how often loading is tried again
# The stages' memory is asked for at every tick while it is tight, else every MEMORY_RELAXED_S:
# each stage engine's own check before every step (it refuses a step that would not fit) keeps
# a PC whose memory drops between two looks safe, so looking often only matters near the edge.
MEMORY_RELAXED_S = 15.0
RELAXED_STEPS = 4            # "tight": less than this many worst steps spare on some stage
STOP_WAIT_S = 15.0           # stop(): the most it waits for an idle supervisor to close the pipeline
STOP_UNLOAD_S = 1.0          # stop(): how long other processes' engines get to free their stages


class State(enum.Enum):
    """Where the cluster is in its life. STOPPED and IDLE are the two resting states besides
    SERVING and FAILED: a cluster not started (or stopped), and one started with no model."""

    STOPPED = "stopped"
    STARTING = "starting"
    IDLE = "idle"
    LOADING = "loading"
    SERVING = "serving"
    SUSPENDED = "suspended"      # the scheduler lost its pipeline; its requests wait
    REPLANNING = "replanning"    # planning again over the engines there are (failover or replan)
    FAILED = "failed"            # the engines cannot hold the model; it loads again when they change
    STOPPING = "stopping"


_S = State
TRANSITIONS: dict[State, frozenset[State]] = {
    _S.STOPPED: frozenset({_S.STARTING}),
    _S.STARTING: frozenset({_S.IDLE, _S.STOPPING}),               # started, or the start failed
    _S.IDLE: frozenset({_S.LOADING, _S.STOPPING}),
    _S.LOADING: frozenset({_S.SERVING,
                           _S.IDLE,                               # the load failed
                           _S.FAILED,                             # ... while a failure was in force
                           _S.STOPPING}),
    _S.SERVING: frozenset({_S.LOADING,                            # another load()
                           _S.REPLANNING,                         # replan(), or replan: auto
                           _S.SUSPENDED,                          # the scheduler lost the pipeline
                           _S.IDLE,                               # unload()
                           _S.STOPPING}),
    _S.SUSPENDED: frozenset({_S.REPLANNING, _S.STOPPING}),
    _S.REPLANNING: frozenset({_S.SERVING,                         # failed over, or re-planned
                              _S.FAILED,                          # the engines cannot hold the model
                              _S.IDLE,                            # a re-planned load failed
                              _S.STOPPING}),
    _S.FAILED: frozenset({_S.LOADING,                             # load(), or the engines changed
                          _S.REPLANNING,                          # replan()
                          _S.IDLE,                                # unload()
                          _S.STOPPING}),
    _S.STOPPING: frozenset({_S.STOPPED}),
}


class TransitionError(RuntimeError):
    """A move the transition table does not list: a bug in the supervisor, never a user error."""


def check_transition(old: State, new: State) -> None:
    """Raise TransitionError unless TRANSITIONS allows ``old`` -> ``new``."""
    if new not in TRANSITIONS[old]:
        raise TransitionError(f"the supervisor cannot go from {old.value} to {new.value} "
                              f"(allowed: {sorted(s.value for s in TRANSITIONS[old])})")


class _Stopping(BaseException):
    """A stop was asked: the work under way ends at its next move (BaseException, so that no
    ``except Exception`` in a handler swallows it)."""


# ---------------------------------------------------------------------------- commands and reports
@dataclass(frozen=True)
class Load:
    """Unload what is loaded, then plan and load ``options``."""
    options: LoadOptions
    progress: bool = True
    timeout_s: float = DEFAULT_LOAD_TIMEOUT_S


@dataclass(frozen=True)
class Replan:
    """Plan the model in force again over the engines registered now; load it when better."""
    progress: bool = True
    timeout_s: float = DEFAULT_LOAD_TIMEOUT_S


@dataclass(frozen=True)
class Unload:
    """Free every stage (the engines stay up)."""


@dataclass(frozen=True)
class CheckMembership:
    """Look at the registered engines (the thread makes one every tick; tests ask for one)."""


@dataclass(frozen=True)
class Settle:
    """Nothing: answered once everything queued before it is handled."""


@dataclass(frozen=True)
class PipelineLost:
    """The scheduler of load number ``generation`` lost its pipeline (a report, not a command)."""
    generation: int
    reason: str


@dataclass(frozen=True)
class MemoryShort:
    """A stage of load number ``generation`` refused a step for want of memory; its scheduler
    suspended itself (a report, not a command)."""
    generation: int
    reason: str


COMMANDS = (Load, Replan, Unload, CheckMembership, Settle)


# ---------------------------------------------------------------------------- the hands
class Runtime(Protocol):
    """What the supervisor does to the world (:class:`EngineRuntime`; a fake in tests)."""

    def engine_ids(self) -> frozenset[int]: ...
    def load(self, options, *, check_alive, on_failure, progress: bool, timeout_s: float,
             failover_from=None, keep_plan: bool = False) -> Pipeline: ...
    def release_moved(self, old: Pipeline, new: Pipeline) -> None: ...
    def unload(self, pipeline: Pipeline) -> None: ...
    def close(self, pipeline: Pipeline) -> None: ...
    def propose_plan(self, options) -> Plan: ...
    def is_better(self, candidate: Plan, current: Plan) -> bool: ...
    def dead_stage(self, pipeline: Pipeline) -> str | None: ...
    def busy(self, pipeline: Pipeline) -> bool: ...
    def abort(self, pipeline: Pipeline, error: BaseException) -> None: ...
    def propose_rebalance(self, pipeline: Pipeline) -> Rebalance | None: ...
    def suspend(self, pipeline: Pipeline, reason: str, why: str = "rebalance") -> None: ...
    def set_speed_factors(self, factors: dict[str, float]) -> dict[str, float]: ...
    def memory_reports(self, pipeline: Pipeline, planned: memory.Setting) -> list[memory.StageMemory]: ...
    def set_prefill_chunk(self, pipeline: Pipeline, chunk: int) -> None: ...


class EngineRuntime:
    """The supervisor's hands on real engines: EngineControl, the cluster's loop (``loop``, set
    while the cluster runs) and coordinator/pipeline.py."""

    def __init__(self, control: EngineControl):
        self.control = control
        self.loop: LoopThread | None = None
        self.adapters = AdapterRegistry()      # the LoRA adapters served (every load gives them to the stages)

    def engine_ids(self) -> frozenset[int]:
        return frozenset(self.control.ids)

    def load(self, options: LoadOptions, *, check_alive, on_failure, progress: bool, timeout_s: float,
             failover_from: Pipeline | None = None, keep_plan: bool = False) -> Pipeline:
        """load_pipeline (raises ModelError, PlanError or ClusterError; nothing stays loaded)."""
        return load_pipeline(self.control, self.loop, options, check_alive=check_alive, progress=progress,
                             timeout_s=timeout_s, on_failure=on_failure, failover_from=failover_from,
                             keep_plan=keep_plan, adapters=self.adapters)

    def release_moved(self, old: Pipeline, new: Pipeline) -> None:
        """After a failover: free the stages of the old engines that are up but hold none now."""
        kept = {info.engine_id for info in new.engines}
        unload_engines(self.control, [info for info in old.engines
                                      if info.engine_id not in kept and not self.control.is_gone(info)])

    def unload(self, pipeline: Pipeline) -> None:
        pipeline.close(self.control, self.loop)

    def close(self, pipeline: Pipeline) -> None:
        """stop()'s unload: end the scheduler; engines the control plane's stop ends are not asked
        to unload (that only delays their exit), the others (a worker's) get STOP_UNLOAD_S."""
        try:
            self.loop.run(pipeline.scheduler.close(), timeout_s=10)
        except Exception as exc:       # stopping goes on whatever the scheduler says
            logger.warning("closing the scheduler failed: %r", exc)
        registered = set(self.control.ids)
        others = [info.engine_id for info in pipeline.engines
                  if info.engine_id in registered and not self.control.ends_on_stop(info)]
        results = self.control.gather(others, engine_worker.unload_stage, timeout_s=STOP_UNLOAD_S,
                                      what="unloading")
        for result in results.values():
            if isinstance(result, ExoLabError):
                logger.info("on stop, an engine did not unload: %s", result)

    def propose_plan(self, options: LoadOptions) -> Plan:
        return propose_plan(self.control, options)

    def is_better(self, candidate: Plan, current: Plan) -> bool:
        return is_better(candidate, current)

    def dead_stage(self, pipeline: Pipeline) -> str | None:
        return pipeline.dead_stage_message(self.control)

    def busy(self, pipeline: Pipeline) -> bool:
        return pipeline.scheduler.active_requests > 0

    def abort(self, pipeline: Pipeline, error: BaseException) -> None:
        """End every request with ``error``, on the loop (which owns the scheduler's state)."""
        self.loop.run(_call(pipeline.scheduler.abort, error))

    def propose_rebalance(self, pipeline: Pipeline) -> Rebalance | None:
        return propose_rebalance(self.control, pipeline, self.loop.run(_call(pipeline.scheduler.stage_clock.ratios)))

    def suspend(self, pipeline: Pipeline, reason: str, why: str = "rebalance") -> None:
        """Stop the scheduler sending steps (its requests wait to be replayed) for a move, or
        (``why`` "memory") to shed KV slots."""
        self.loop.run(_call(functools.partial(pipeline.scheduler.suspend, reason, why=why)))

    def memory_reports(self, pipeline: Pipeline, planned: memory.Setting) -> list[memory.StageMemory]:
        """Each stage engine's MemoryReport (engine.worker.memory_report), steps counted up to
        the ``planned`` slots and for its chunks. Raises ClusterError when an engine does not answer."""
        from ..control_types import MemoryReport, received

        ids = [info.engine_id for info in pipeline.engines]
        answers = self.control.gather(ids, engine_worker.memory_report, memory.chunks(planned.chunk), planned.slots,
                                      timeout_s=MEMORY_REPORT_S, what="reporting its memory")
        reports = []
        for info in pipeline.engines:
            answer = answers[info.engine_id]
            if isinstance(answer, ExoLabError):
                raise answer
            reports.append(memory.StageMemory(info.node, received(answer, MemoryReport, f"engine {info.engine_id}")))
        return reports

    def set_prefill_chunk(self, pipeline: Pipeline, chunk: int) -> None:
        """Feed prompts in chunks of ``chunk`` tokens from the next step on (nothing pauses)."""
        self.loop.run(_call(functools.partial(setattr, pipeline.scheduler, "prefill_chunk", chunk)))

    def set_speed_factors(self, factors: dict[str, float]) -> dict[str, float]:
        """Plan with ``factors`` from now on; returns the ones in force before."""
        previous, self.control.speed_factors = self.control.speed_factors, dict(factors)
        return previous


async def _call(function, *args):
    return function(*args)


# ---------------------------------------------------------------------------- the supervisor
class Supervisor:
    """Owns the cluster's state, the loaded pipeline and every decision about them.

    ``state``, ``pipeline``, ``failure`` (why the model cannot be served, while FAILED or a load
    after it runs) and ``recovering`` (a lost pipeline reported and not yet failed over) may be
    read from any thread; only the supervisor's thread changes them (the caller's, during
    :meth:`start`). ``on_state(old, new)`` is called at every move (tests record them).
    """

    def __init__(self, runtime: Runtime, *, replan_auto: bool = False,
                 tick_s: float | None = MEMBERSHIP_CHECK_S,
                 on_state: Callable[[State, State], None] | None = None):
        self.runtime = runtime
        self.replan_auto = replan_auto
        self.tick_s = tick_s                   # None: no ticks of its own (tests send CheckMembership)
        self.on_state = on_state
        self.state = State.STOPPED
        self.pipeline: Pipeline | None = None
        self.options: LoadOptions | None = None     # the model to serve: kept through a failure
        self.failure: str | None = None
        self.recovering: str | None = None
        self.memory_note: str | None = None    # serving fewer KV slots than planned, and why
        self._slots_changed_at = 0.0
        self._memory_checked_at = 0.0
        self._memory_relaxed = False           # the last look found every stage far from its edge
        self._memory_failed_at: float | None = None   # failed for want of memory: retried by the clock
        self._generation = 0                   # loads so far: a report names the load it is about
        self._known_ids: frozenset[int] = frozenset()
        self._events: collections.deque[tuple[object, concurrent.futures.Future | None]] = collections.deque()
        self._wakeup = threading.Condition()
        self._stop_asked = False
        self._working = False
        self._next_tick = 0.0
        self._thread: threading.Thread | None = None
        self._handlers = {Load: self._load, Replan: self._replan, Unload: self._unload,
                          CheckMembership: self._check_membership, Settle: lambda command: None,
                          PipelineLost: self._fail_over, MemoryShort: self._memory_short}

    # ------------------------------------------------------------ asking
    def submit(self, command) -> concurrent.futures.Future:
        """Queue a command; the Future gets what its handler returns or raises. Raises
        ClusterError when the supervisor is not running (not started, or stopping)."""
        if not isinstance(command, COMMANDS):
            raise TypeError(f"not a supervisor command: {command!r}")
        future = concurrent.futures.Future()
        if not self._put(command, future):
            raise ClusterError("the cluster is not started (or is stopping): call cluster.start() "
                               "(or use `with cluster:`)")
        return future

    def ask(self, command):
        """Queue a command and wait for its result (raising its error). An interrupted wait does
        not cancel the work: the supervisor finishes it."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("the supervisor's own thread cannot wait for a command (it would wait forever)")
        return self.submit(command).result()

    def settle(self) -> None:
        """Wait until everything queued before this call (reports included) is handled."""
        self.ask(Settle())

    def _report_short(self, generation: int, reason: str) -> None:
        """The scheduler's ``on_memory_short`` (on the loop thread, once it suspended itself)."""
        self._put(MemoryShort(generation, reason), None)

    def _report_lost(self, generation: int, reason: str) -> None:
        """The scheduler's ``on_failure`` (on the loop thread, once it suspended itself)."""
        if generation == self._generation:
            self.recovering = reason
        self._put(PipelineLost(generation, reason), None)

    def _put(self, event, future) -> bool:
        with self._wakeup:
            if self._stop_asked or self._thread is None or not self._thread.is_alive():
                return False
            self._events.append((event, future))
            self._wakeup.notify()
            return True

    # ------------------------------------------------------------ start / stop
    def start(self, start_engines: Callable[[], None]) -> None:
        """stopped -> starting -> idle: run ``start_engines`` (in the caller's thread, so Ctrl-C
        interrupts it as it does any blocking call), then the supervisor's thread. When
        ``start_engines`` raises: -> stopping -> stopped, and the error goes on."""
        if self._thread is not None and self._thread.is_alive():
            raise ClusterError("the cluster's previous stop is still finishing its work; call "
                               "cluster.stop() again, then start()")
        self._stop_asked = False
        self._enter(State.STARTING)
        try:
            start_engines()
        except BaseException:
            self._enter(State.STOPPING)
            self._enter(State.STOPPED)
            raise
        self._known_ids = self.runtime.engine_ids()
        self._enter(State.IDLE)
        self._next_tick = time.monotonic() + (self.tick_s or 0.0)
        self._thread = threading.Thread(target=self._run, name="exo-lab-supervisor", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = STOP_WAIT_S) -> bool:
        """-> stopping -> stopped: close the pipeline (every request ends) and end the thread;
        commands still queued get ClusterError. Returns True once stopped (at most timeout_s).
        A load, re-plan or failover under way is not interrupted: stop() then returns False at
        once, and the supervisor stops when that work ends (ending the engines ends it; then
        :meth:`join`)."""
        with self._wakeup:
            if self._thread is None or not self._thread.is_alive():
                return True
            self._stop_asked = True
            working = self._working
            self._wakeup.notify()
        return False if working else self.join(timeout_s)

    def join(self, timeout_s: float | None) -> bool:
        """Wait for the thread to end after stop(); True when it has."""
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)
        return thread is None or not thread.is_alive()

    # ------------------------------------------------------------ the thread
    def _run(self) -> None:
        try:
            while (event := self._next_event()) is not None:
                self._handle(*event)
        except _Stopping:
            pass
        self._stop()

    def _next_event(self):
        """The next (event, future), a membership tick when one is due, or None once a stop
        was asked (a stop goes before whatever is queued)."""
        with self._wakeup:
            self._working = False
            while not self._stop_asked and not self._events:
                left = None if self.tick_s is None else self._next_tick - time.monotonic()
                if left is not None and left <= 0:
                    self._next_tick = time.monotonic() + self.tick_s
                    self._working = True
                    return CheckMembership(), None
                self._wakeup.wait(left)
            self._working = True
            return None if self._stop_asked else self._events.popleft()

    def _handle(self, event, future: concurrent.futures.Future | None) -> None:
        try:
            value = self._handlers[type(event)](event)
        except _Stopping:
            if future is not None:
                future.set_exception(ClusterError(f"the cluster was stopped before {_name(event)} finished"))
            raise
        except BaseException as exc:
            if future is not None:
                future.set_exception(exc)
            elif not self._stop_asked:
                logger.exception("the supervisor's %s failed", _name(event))
        else:
            if future is not None:
                future.set_result(value)

    def _stop(self) -> None:
        self._enter(State.STOPPING)
        pipeline, self.pipeline = self.pipeline, None
        if pipeline is not None:
            try:
                self.runtime.close(pipeline)
            except Exception:
                logger.exception("closing the pipeline on stop failed")
        self.options = self.failure = self.recovering = None
        with self._wakeup:
            left, self._events = list(self._events), collections.deque()
        for event, future in left:
            if future is not None:
                future.set_exception(ClusterError(f"the cluster was stopped before {_name(event)} ran"))
        self._enter(State.STOPPED)

    def _enter(self, state: State) -> None:
        """Move to ``state``: TransitionError when the table does not allow it (a bug);
        _Stopping instead of any move but stopping once a stop was asked."""
        check_transition(self.state, state)
        if self._stop_asked and state not in (State.STOPPING, State.STOPPED):
            raise _Stopping
        old, self.state = self.state, state
        logger.debug("cluster: %s -> %s", old.value, state.value)
        if self.on_state is not None:
            self.on_state(old, state)

    # ------------------------------------------------------------ load / unload
    def _load(self, command: Load) -> Plan:
        """-> loading -> serving; on error -> idle (or -> failed while a failure is in force)."""
        self._enter(State.LOADING)
        return self._reload(command.options, command.progress, command.timeout_s)

    def _reload(self, options: LoadOptions, progress: bool, timeout_s: float) -> Plan:
        """Unload what is loaded, load ``options`` and serve it. A failure stays in force (and
        /health says it) until the new pipeline is up. On error nothing stays loaded."""
        self._drop_pipeline()
        self._generation += 1
        try:
            pipeline = self.runtime.load(options, check_alive=self.check_alive,
                                         on_failure=functools.partial(self._report_lost, self._generation),
                                         progress=progress, timeout_s=timeout_s)
        except BaseException:
            if self.failure is None:
                self.options = None
                self._enter(State.IDLE)
            else:
                self._fail(self.failure)
            raise
        self._serve(pipeline)
        return pipeline.plan

    def _serve(self, pipeline: Pipeline) -> None:
        self.pipeline, self.options, self.failure = pipeline, pipeline.options, None
        self.memory_note = self._memory_failed_at = None
        self._watch(pipeline)
        self._known_ids = self.runtime.engine_ids()
        self._enter(State.SERVING)

    def _watch(self, pipeline: Pipeline) -> None:
        """Have ``pipeline``'s scheduler report a stage's refused step (short of memory)."""
        scheduler = getattr(pipeline, "scheduler", None)
        if scheduler is not None:
            scheduler.on_memory_short = functools.partial(self._report_short, self._generation)

    def _drop_pipeline(self) -> None:
        pipeline, self.pipeline = self.pipeline, None
        if pipeline is not None:
            self.runtime.unload(pipeline)

    def _unload(self, command: Unload) -> None:
        if self.state is State.IDLE:
            return
        self._drop_pipeline()
        self.options = self.failure = None
        self._enter(State.IDLE)

    # ------------------------------------------------------------ re-plan
    def _replan(self, command: Replan) -> Plan:
        """-> replanning -> serving with the plan in force when no better one exists, or with
        the better one loaded (-> idle when that load fails); after a failure (or with a stage
        engine gone) the model is loaded again whatever the plan (-> failed when it cannot)."""
        if self.options is None:
            raise ClusterError("no model is loaded: call cluster.load(...) first; replan() re-plans "
                               "the loaded one")
        pipeline = self.pipeline
        failure = self.failure or (self.runtime.dead_stage(pipeline) if pipeline is not None else None)
        self._enter(State.REPLANNING)
        try:
            candidate = self.runtime.propose_plan(self.options)
        except BaseException:
            if failure:
                self._fail(failure)
            else:
                self._enter(State.SERVING)
            raise
        if failure is None and not self.runtime.is_better(candidate, pipeline.plan):
            self._enter(State.SERVING)
            return pipeline.plan
        before = f"{pipeline.plan.predicted_ms_per_token:.2f}" if pipeline is not None else "-"
        logger.info("re-planning %s: %s -> %.2f ms/token predicted%s", self.options.model, before,
                    candidate.predicted_ms_per_token, " (after a failure)" if failure else "")
        self.failure = failure
        return self._reload(self.options, command.progress, command.timeout_s)

    def _check_membership(self, command: CheckMembership) -> None:
        """When the registered engines changed: load a failed model again (engines are back),
        or with ``replan: auto`` re-plan a serving one, at a moment no request runs. Else, with
        ``replan: auto``, re-balance a serving model whose stage times drifted."""
        ids = self.runtime.engine_ids()
        if ids == self._known_ids:
            if (self.state is State.FAILED and self._memory_failed_at is not None
                    and time.monotonic() - self._memory_failed_at >= MEMORY_RETRY_S):
                self._memory_failed_at = time.monotonic()
                self._load_after_failure()
            if self.state is State.SERVING:
                self._check_memory()
            if self.state is State.SERVING and self.replan_auto:
                self._check_balance()
            return
        if self.state is State.FAILED:
            self._known_ids = ids
            self._load_after_failure()
        elif self.state is State.SERVING and self.replan_auto and not self.runtime.busy(self.pipeline):
            self._known_ids = ids
            try:
                self._replan(Replan(progress=False))
            except ExoLabError as exc:
                logger.warning("automatic re-plan failed: %s", exc)

    def _check_balance(self) -> None:
        try:
            move = self.runtime.propose_rebalance(self.pipeline)
        except ExoLabError as exc:
            logger.warning("could not time the stages for a re-balance: %s", exc)
            return
        if move is not None:
            self._rebalance(move)

    def _rebalance(self, move: Rebalance) -> None:
        """serving -> replanning -> serving: the scheduler stops sending and its requests wait;
        the model loads on the plan for the speeds seen (the failover path: a stage whose layers
        stay keeps its weights, the scheduler rewired, its requests replayed). When that load
        fails, the speeds before and the engines there are; when that fails too -> failed."""
        old = self.pipeline
        self._enter(State.REPLANNING)
        logger.warning("re-balancing %s while serving: %s", old.options.model, move.describe())
        self.runtime.suspend(old, "re-balancing: " + move.describe())
        previous = self.runtime.set_speed_factors(move.factors)
        try:
            new = self._load_over(old)
        except Exception as exc:
            if self._stop_asked:
                raise _Stopping from None
            logger.warning("re-balancing failed (%s); loading the plan for the speeds before", exc)
            self.runtime.set_speed_factors(previous)
            try:
                new = self._load_over(old)
            except Exception as again:
                if self._stop_asked:
                    raise _Stopping from None
                self._fail(f"re-balancing failed ({exc}) and so did loading the model again ({again}); it "
                           "loads again by itself once the registered engines change")
                return
        self.pipeline = new
        self.runtime.release_moved(old, new)
        self._enter(State.SERVING)

    def _load_over(self, old: Pipeline, options: LoadOptions | None = None, keep_plan: bool = False) -> Pipeline:
        """The failover load: ``old``'s scheduler and requests go on over the new stages
        (``options``: default ``old``'s; ``keep_plan``: the same stages, only the KV slots change)."""
        new = self.runtime.load(options or old.options, check_alive=self.check_alive,
                                on_failure=functools.partial(self._report_lost, self._generation),
                                progress=False, timeout_s=DEFAULT_LOAD_TIMEOUT_S, failover_from=old,
                                keep_plan=keep_plan)
        self._watch(new)
        return new

    def _load_after_failure(self) -> None:
        self._enter(State.LOADING)
        try:
            self._reload(self.options, progress=False, timeout_s=DEFAULT_LOAD_TIMEOUT_S)
        except ExoLabError as exc:
            logger.warning("still cannot load %s: %s", self.options.model, exc)
            return
        logger.warning("%s loaded again", self.options.model)

    # ------------------------------------------------------------ memory
    def _check_memory(self, refused: bool = False) -> None:
        """Feed smaller prefill chunks, shed KV slots, move layers away or give them back as the
        stage PCs' free memory says (:mod:`.memory`). ``refused``: a stage refused a step and the
        scheduler waits, so the pipeline loads again whatever the reports say."""
        if not refused and self._memory_relaxed and time.monotonic() - self._memory_checked_at < MEMORY_RELAXED_S:
            return
        self._memory_checked_at = time.monotonic()
        pipeline = self.pipeline
        planned = memory.Setting(self.options.max_batch, self.options.prefill_chunk)
        now = memory.Setting(pipeline.options.max_batch, pipeline.options.prefill_chunk)
        try:
            stages = self.runtime.memory_reports(pipeline, planned)
        except ExoLabError as exc:
            if not refused:
                logger.warning("could not read the stages' memory: %s", exc)
                return
            stages = []
        self._memory_relaxed = bool(stages) and now == planned and memory.relaxed(stages, now, RELAXED_STEPS)
        change = memory.decide(stages, now=now, planned=planned, refused=refused,
                               since_change_s=time.monotonic() - self._slots_changed_at)
        if change is None and refused:
            lower = next((s for s in memory.candidates(now.slots, planned.chunk) if memory.below(s, now)), now)
            change = memory.Change(lower, "a stage refused a step and its memory could not be read")
        if change is not None:
            self._change_memory(change, planned, refused)

    def _memory_short(self, report: MemoryShort) -> None:
        if report.generation != self._generation or self.state is not State.SERVING:
            return          # a load under way, or done since, rewires the scheduler
        self._check_memory(refused=True)

    def _change_memory(self, change: memory.Change, planned: memory.Setting, refused: bool) -> None:
        """Serve with ``change.setting``. Only the prefill chunk changes: the scheduler takes it
        at its next step. Else serving -> replanning -> serving: the scheduler's requests wait,
        the model loads again by the failover path (the same stages, each keeping its weights and
        reallocating only its KV cache; with ``change.replan`` planned again on fresh probes, so
        a PC that cannot hold its layers gives them up), and the requests replay. -> failed when
        the engines cannot hold the model with the memory they have (tried again by the clock)."""
        old, setting = self.pipeline, change.setting
        options = dataclasses.replace(old.options, max_batch=setting.slots, prefill_chunk=setting.chunk)
        message = f"{change.reason}; serving with {setting.describe(planned)}"
        logger.warning("%s", message)
        if setting.slots == old.options.max_batch and not change.replan and not refused:
            self.runtime.set_prefill_chunk(old, setting.chunk)
            old.options = options
        else:
            self._enter(State.REPLANNING)
            self.runtime.suspend(old, message, why="memory")
            try:
                new = self._load_over(old, options, keep_plan=not change.replan)
            except Exception as exc:
                if self._stop_asked:
                    raise _Stopping from None
                self._fail(f"{change.reason}; the PCs cannot hold the model with the memory they have now ({exc}); "
                           f"it loads again by itself once they can (tried every {MEMORY_RETRY_S:.0f} s): free "
                           "memory on them, add a PC, or lower max_context or max_batch")
                self._memory_failed_at = time.monotonic()
                return
            self.pipeline = new
            self.runtime.release_moved(old, new)
            self._enter(State.SERVING)
        self._slots_changed_at = time.monotonic()
        self.memory_note = None if setting == planned else message

    # ------------------------------------------------------------ failover
    def _fail_over(self, report: PipelineLost) -> None:
        """serving -> suspended -> replanning -> serving on the survivors (spares first; a stage
        whose layers stay keeps its weights), the scheduler rewired and replaying its requests;
        or -> failed when the survivors cannot hold the model. A report about a pipeline since
        replaced, or after the failure was handled, is dropped."""
        try:
            if report.generation != self._generation or self.state is not State.SERVING:
                return
            old = self.pipeline
            self._enter(State.SUSPENDED)
            self._enter(State.REPLANNING)
            try:
                new = self._load_over(old)
            except Exception as exc:
                if self._stop_asked:
                    raise _Stopping from None
                if not isinstance(exc, ExoLabError):
                    logger.error("failover failed unexpectedly", exc_info=exc)
                self._fail(f"{report.reason}; the engines left cannot serve the model ({exc}); it loads "
                           f"again by itself once enough engines are back")
                return
            self.pipeline = new
            self.runtime.release_moved(old, new)
            logger.warning("failed over to %d stage(s) after: %s", len(new.plan.stages), report.reason)
            self._enter(State.SERVING)
        finally:
            if self.recovering == report.reason:
                self.recovering = None

    def _fail(self, message: str) -> None:
        """-> failed: every request ends with ``message``, /health says it, and the model loads
        again by itself once the registered engines change."""
        if message != self.failure:
            logger.error("%s", message)
        self.failure = message
        self._known_ids = self.runtime.engine_ids()
        self._enter(State.FAILED)
        if self.pipeline is not None:
            self.runtime.abort(self.pipeline, ClusterError(message))

    # ------------------------------------------------------------ health (any thread)
    def check_alive(self) -> str | None:
        """A message naming the dead stage engine, or None when every stage engine is up. The
        scheduler calls it on the loop thread: it only reads engine ids and pids, never sends."""
        pipeline = self.pipeline
        if pipeline is None or self.state in (State.STOPPING, State.STOPPED):
            return "the cluster was stopped"
        return self.runtime.dead_stage(pipeline)

    async def health(self) -> tuple[bool, str]:
        """(True, "ok") when a model is loaded and every stage answers a ping through the pipe,
        else (False, why). Runs on the cluster's loop."""
        pipeline, failure = self.pipeline, self.failure
        if pipeline is None or failure:
            return False, failure or "no model is loaded"
        problem = self.recovering or self.check_alive()
        if problem:
            pipeline.scheduler.lost(problem)       # no request may have noticed yet
            return False, f"recovering: {problem}"
        ok = await pipeline.scheduler.ping(timeout_s=5.0)
        return (True, "ok") if ok else (False, "a stage did not answer a data-plane ping within 5 s")


def _name(event) -> str:
    return type(event).__name__.lower()
