"""The supervisor's state machine in one process: no engines, no sockets, no sleeps.

A FakeRuntime stands in for the engines (which of them are registered, which died, how many the
model needs) and hands out FakeSchedulers that behave like the real one towards the supervisor:
``lost(reason)`` suspends itself and calls ``on_failure``; ``rewire`` and ``abort`` are recorded.
Every wait is on an event the test sets or on :meth:`Supervisor.settle` (answered once what was
queued before it is handled), so each run takes the same path.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import pytest

from exo_lab.control_types import MemoryReport
from exo_lab.coordinator import memory, supervisor as supervisor_module
from exo_lab.coordinator.supervisor import (
    TRANSITIONS, CheckMembership, Load, Replan, State, Supervisor, TransitionError, Unload, check_transition)
from exo_lab.errors import ClusterError, ModelError, PlanError


@dataclass(frozen=True)
class FakeOptions:
    model: str = "demo"
    max_batch: int = 4
    prefill_chunk: int = 256


@dataclass(frozen=True)
class FakePlan:
    stages: tuple[int, ...]
    predicted_ms_per_token: float = 10.0


class FakeScheduler:
    def __init__(self, on_failure):
        self.on_failure = on_failure
        self.active_requests = 0
        self.suspended = False
        self.failure: str | None = None
        self.calls: list[tuple] = []

    def lost(self, reason: str) -> None:
        """As Scheduler.lost: once per failure, suspend and report."""
        if self.suspended or self.failure:
            return
        self.suspended = True
        self.calls.append(("suspend", reason))
        self.on_failure(reason)

    def short_of_memory(self, reason: str) -> None:
        """As Scheduler._short_of_memory: suspend and report."""
        self.suspended = True
        self.calls.append(("suspend", reason))
        self.on_memory_short(reason)

    def rewire(self, stages: tuple[int, ...]) -> None:
        self.suspended = False
        self.calls.append(("rewire", stages))

    def abort(self, error: BaseException) -> None:
        self.failure = str(error)
        self.calls.append(("abort", str(error)))

    async def ping(self, timeout_s: float) -> bool:
        return True


@dataclass(eq=False)
class FakePipeline:
    options: FakeOptions
    plan: FakePlan
    scheduler: FakeScheduler

    @property
    def engines(self) -> tuple[int, ...]:
        return self.plan.stages


@dataclass(eq=False)
class FakeRuntime:
    """Engines 0..3 registered; the model needs ``need`` of them (one stage each)."""

    registered: set[int] = field(default_factory=lambda: {0, 1, 2, 3})
    need: int = 2
    better: bool = False                    # what is_better answers
    fail_load: Exception | None = None      # the next load raises this
    gate: threading.Event | None = None     # a load waits for it
    entered: threading.Event = field(default_factory=threading.Event)   # a load began
    loads: list = field(default_factory=list)
    unloaded: list = field(default_factory=list)
    closed: list = field(default_factory=list)
    released: list = field(default_factory=list)
    move: object = None                     # what the next propose_rebalance answers (once)
    factors: dict = field(default_factory=dict)   # the speed factors set
    inside: int = 0                         # runtime calls under way now
    most_inside: int = 0
    threads: set = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    memory: list = field(default_factory=list)    # what memory_reports answers (StageMemory)
    suspended_for: list = field(default_factory=list)
    kept_plans: list = field(default_factory=list)   # each load's keep_plan
    chunks: list = field(default_factory=list)       # prefill chunks set while serving

    def kill(self, engine_id: int) -> None:
        self.registered.discard(engine_id)

    def engine_ids(self) -> frozenset[int]:
        return frozenset(self.registered)

    def load(self, options, *, check_alive, on_failure, progress, timeout_s, failover_from=None, keep_plan=False):
        self._enter()
        self.kept_plans.append(keep_plan)
        self.entered.set()
        try:
            if self.gate is not None:
                assert self.gate.wait(10), "the test never opened the gate"
            if self.fail_load is not None:
                error, self.fail_load = self.fail_load, None
                raise error
            alive = sorted(self.registered)
            if len(alive) < self.need:
                raise PlanError(f"{len(alive)} engine(s) cannot hold {options.model}: it needs {self.need}")
            stages = tuple(alive[:self.need])
            if failover_from is not None:         # as load_pipeline: the old scheduler goes on
                scheduler = failover_from.scheduler
                scheduler.rewire(stages)
            else:
                scheduler = FakeScheduler(on_failure)
            pipeline = FakePipeline(options, FakePlan(stages), scheduler)
            self.loads.append((pipeline, failover_from))
            return pipeline
        finally:
            self._leave()

    def _enter(self) -> None:
        with self.lock:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
            self.threads.add(threading.current_thread().name)

    def _leave(self) -> None:
        with self.lock:
            self.inside -= 1

    def release_moved(self, old, new) -> None:
        self.released.append(set(old.engines) - set(new.engines))

    def unload(self, pipeline) -> None:
        self.unloaded.append(pipeline)

    def close(self, pipeline) -> None:
        self.closed.append(pipeline)

    def propose_plan(self, options) -> FakePlan:
        alive = sorted(self.registered)
        if len(alive) < self.need:
            raise PlanError(f"{len(alive)} engine(s) cannot hold {options.model}")
        return FakePlan(tuple(alive[:self.need]), 5.0)

    def is_better(self, candidate, current) -> bool:
        return self.better

    def dead_stage(self, pipeline) -> str | None:
        dead = [e for e in pipeline.engines if e not in self.registered]
        return f"engine {dead[0]} stopped" if dead else None

    def busy(self, pipeline) -> bool:
        return pipeline.scheduler.active_requests > 0

    def abort(self, pipeline, error) -> None:
        pipeline.scheduler.abort(error)

    def propose_rebalance(self, pipeline):
        move, self.move = self.move, None
        return move

    def suspend(self, pipeline, reason, why="rebalance") -> None:
        pipeline.scheduler.suspended = True
        pipeline.scheduler.calls.append(("suspend", reason))
        self.suspended_for.append(why)

    def memory_reports(self, pipeline, planned):
        return list(self.memory)

    def set_prefill_chunk(self, pipeline, chunk) -> None:
        self.chunks.append(chunk)

    def set_speed_factors(self, factors) -> dict:
        previous, self.factors = self.factors, dict(factors)
        return previous


@dataclass(frozen=True)
class FakeMove:
    """A re-balance worth making (pipeline.Rebalance without plans)."""

    factors: dict

    def describe(self) -> str:
        return f"factors {self.factors}"


class Moves(list):
    """Every (old, new) state move, in order."""

    def __call__(self, old: State, new: State) -> None:
        self.append((old, new))

    def states(self) -> list[State]:
        return [new for _, new in self]


def supervisor_for(runtime: FakeRuntime, moves: Moves | None = None, **kwargs) -> Supervisor:
    supervisor = Supervisor(runtime, tick_s=None, on_state=moves, **kwargs)
    supervisor.start(lambda: None)
    return supervisor


@pytest.fixture
def runtime():
    return FakeRuntime()


@pytest.fixture
def moves():
    return Moves()


@pytest.fixture
def supervisor(runtime, moves):
    supervisor = supervisor_for(runtime, moves)
    yield supervisor
    supervisor.stop()
    assert supervisor.join(5)


def serving(supervisor: Supervisor) -> FakePipeline:
    supervisor.ask(Load(FakeOptions()))
    assert supervisor.state is State.SERVING
    return supervisor.pipeline


# ---------------------------------------------------------------------------- load
def test_load_serves_the_pipeline_it_loaded(supervisor, runtime, moves):
    plan = supervisor.ask(Load(FakeOptions()))
    assert moves.states() == [State.STARTING, State.IDLE, State.LOADING, State.SERVING]
    assert plan == FakePlan((0, 1)) and supervisor.pipeline.plan is plan
    assert supervisor.failure is None and supervisor.check_alive() is None


def test_a_failed_load_raises_its_error_and_leaves_nothing_loaded(supervisor, runtime, moves):
    first = serving(supervisor)
    runtime.fail_load = ModelError("no-such-folder is not a model folder")
    with pytest.raises(ModelError, match="no-such-folder"):
        supervisor.ask(Load(FakeOptions("no-such-folder")))
    assert supervisor.state is State.IDLE and supervisor.pipeline is None
    assert runtime.unloaded == [first]                 # the old model went before the new one came
    with pytest.raises(ClusterError, match="no model is loaded"):
        supervisor.ask(Replan())


# ---------------------------------------------------------------------------- failover
def test_a_lost_pipeline_fails_over_and_the_scheduler_is_rewired(supervisor, runtime, moves):
    old = serving(supervisor)
    runtime.kill(1)
    old.scheduler.lost("engine 1 stopped")             # what the scheduler does on the loop thread
    assert supervisor.recovering == "engine 1 stopped"
    supervisor.settle()
    assert moves.states()[-3:] == [State.SUSPENDED, State.REPLANNING, State.SERVING]
    new, failover_from = runtime.loads[-1]
    assert failover_from is old and supervisor.pipeline is new and new.scheduler is old.scheduler
    assert old.scheduler.calls == [("suspend", "engine 1 stopped"), ("rewire", (0, 2))]
    assert runtime.released == [{1}] and runtime.unloaded == []
    assert supervisor.recovering is None and supervisor.failure is None
    # the rewired scheduler's next loss is a failover again
    runtime.kill(2)
    new.scheduler.lost("engine 2 stopped")
    supervisor.settle()
    assert supervisor.state is State.SERVING and supervisor.pipeline.engines == (0, 3)


def test_a_report_about_a_replaced_pipeline_is_dropped(supervisor, runtime, moves):
    old = serving(supervisor)
    supervisor.ask(Load(FakeOptions()))                 # a new load replaced it
    old.scheduler.lost("engine 1 stopped")
    assert supervisor.recovering is None               # /health does not show a stale report
    supervisor.settle()
    assert supervisor.state is State.SERVING and State.SUSPENDED not in moves.states()


def test_when_the_survivors_cannot_hold_the_model_requests_end_and_it_reloads_when_engines_return(
        supervisor, runtime, moves):
    old = serving(supervisor)
    for engine_id in (1, 2, 3):
        runtime.kill(engine_id)
    old.scheduler.lost("engine 1 stopped")
    supervisor.settle()
    assert moves.states()[-3:] == [State.SUSPENDED, State.REPLANNING, State.FAILED]
    assert "cannot serve the model" in supervisor.failure and "engine 1 stopped" in supervisor.failure
    assert old.scheduler.calls[-1] == ("abort", supervisor.failure)   # every request ends with it
    assert supervisor.recovering is None and supervisor.pipeline is old
    supervisor.ask(CheckMembership())                   # nothing changed: no attempt
    assert supervisor.state is State.FAILED and len(runtime.loads) == 1
    runtime.registered.add(4)                           # a PC comes back
    supervisor.ask(CheckMembership())
    assert moves.states()[-2:] == [State.LOADING, State.SERVING]
    assert supervisor.failure is None and supervisor.pipeline.engines == (0, 4)
    assert runtime.unloaded == [old]


def test_a_reload_that_fails_again_stays_failed_and_tries_at_the_next_change(supervisor, runtime, moves):
    old = serving(supervisor)
    runtime.need = 3
    for engine_id in (1, 2, 3):
        runtime.kill(engine_id)
    old.scheduler.lost("engine 1 stopped")
    supervisor.settle()
    failure = supervisor.failure
    runtime.registered.add(4)                           # one back: still too few
    supervisor.ask(CheckMembership())
    assert moves.states()[-2:] == [State.LOADING, State.FAILED] and supervisor.failure == failure
    runtime.registered.add(5)
    supervisor.ask(CheckMembership())
    assert supervisor.state is State.SERVING and supervisor.pipeline.engines == (0, 4, 5)


# ---------------------------------------------------------------------------- replan
def test_replan_loads_a_better_plan(supervisor, runtime, moves):
    old = serving(supervisor)
    runtime.better = True
    plan = supervisor.ask(Replan())
    assert moves.states()[-2:] == [State.REPLANNING, State.SERVING]
    assert runtime.unloaded == [old] and supervisor.pipeline is not old and supervisor.pipeline.plan is plan


def test_replan_keeps_the_plan_in_force_when_none_is_better(supervisor, runtime, moves):
    old = serving(supervisor)
    assert supervisor.ask(Replan()) is old.plan
    assert moves.states()[-2:] == [State.REPLANNING, State.SERVING]
    assert supervisor.pipeline is old and runtime.unloaded == [] and len(runtime.loads) == 1


def test_replan_after_a_stage_engine_died_loads_again_whatever_the_plan(supervisor, runtime):
    old = serving(supervisor)
    runtime.kill(0)
    supervisor.ask(Replan())
    assert supervisor.pipeline is not old and supervisor.pipeline.engines == (1, 2)


def test_replan_auto_waits_while_requests_run(runtime, moves):
    supervisor = supervisor_for(runtime, moves, replan_auto=True)
    try:
        old = serving(supervisor)
        runtime.better = True
        old.scheduler.active_requests = 2
        runtime.registered.add(4)                       # a PC joins
        supervisor.ask(CheckMembership())
        assert supervisor.pipeline is old and State.REPLANNING not in moves.states()
        old.scheduler.active_requests = 0
        supervisor.ask(CheckMembership())
        assert moves.states()[-2:] == [State.REPLANNING, State.SERVING] and supervisor.pipeline is not old
    finally:
        supervisor.stop()


# ---------------------------------------------------------------------------- re-balancing
@pytest.fixture
def auto(runtime, moves):
    supervisor = supervisor_for(runtime, moves, replan_auto=True)
    yield supervisor
    supervisor.stop()
    assert supervisor.join(5)


def test_a_drifted_stage_moves_layers_while_requests_run_and_they_go_on(auto, runtime, moves):
    old = serving(auto)
    old.scheduler.active_requests = 3                 # busy: a move does not wait for a quiet moment
    runtime.factors = {"a": 1.0}
    runtime.move = FakeMove({"a": 1.9, "b": 1.0})
    auto.ask(CheckMembership())
    assert moves.states()[-2:] == [State.REPLANNING, State.SERVING]
    new = auto.pipeline
    assert new is not old and runtime.loads[-1][1] is old          # the failover path: replayed
    assert new.scheduler is old.scheduler and [c[0] for c in old.scheduler.calls] == ["suspend", "rewire"]
    assert runtime.factors == {"a": 1.9, "b": 1.0} and runtime.released[-1] == set()
    auto.ask(CheckMembership())                       # nothing drifted since: nothing moves
    assert auto.pipeline is new and len(runtime.loads) == 2


def test_without_replan_auto_a_drift_moves_nothing(supervisor, runtime, moves):
    old = serving(supervisor)
    runtime.move = FakeMove({"a": 1.9})
    supervisor.ask(CheckMembership())
    assert supervisor.pipeline is old and State.REPLANNING not in moves.states() and runtime.move is not None


def test_a_failed_move_loads_again_at_the_speeds_before(auto, runtime, moves):
    old = serving(auto)
    runtime.factors = {"a": 1.0}
    runtime.move = FakeMove({"a": 1.9})
    runtime.fail_load = ClusterError("engine 1 ran out of memory")
    auto.ask(CheckMembership())
    assert moves.states()[-2:] == [State.REPLANNING, State.SERVING]
    assert runtime.factors == {"a": 1.0} and auto.pipeline.scheduler is old.scheduler
    assert not any(call[0] == "abort" for call in old.scheduler.calls)


def test_when_neither_load_of_a_move_works_requests_end_and_it_is_failed(auto, runtime, moves):
    old = serving(auto)
    runtime.move = FakeMove({"a": 1.9})
    runtime.need = 5                                  # no plan fits the engines any more
    auto.ask(CheckMembership())
    assert auto.state is State.FAILED and "re-balancing failed" in auto.failure
    assert old.scheduler.calls[-1][0] == "abort"


def test_replan_manual_leaves_a_joining_engine_a_spare(supervisor, runtime, moves):
    old = serving(supervisor)
    runtime.better = True
    runtime.registered.add(4)
    supervisor.ask(CheckMembership())
    assert supervisor.pipeline is old and State.REPLANNING not in moves.states()


# ---------------------------------------------------------------------------- stop
@pytest.mark.parametrize("resting", [State.IDLE, State.SERVING, State.FAILED])
def test_stop_from_a_resting_state_closes_the_pipeline(supervisor, runtime, moves, resting):
    if resting is not State.IDLE:
        pipeline = serving(supervisor)
    if resting is State.FAILED:
        runtime.need = 5
        pipeline.scheduler.lost("engine 1 stopped")
        supervisor.settle()
    assert supervisor.state is resting
    assert supervisor.stop(timeout_s=5)
    assert moves[-2:] == [(resting, State.STOPPING), (State.STOPPING, State.STOPPED)]
    assert runtime.closed == ([] if resting is State.IDLE else [pipeline])
    assert supervisor.pipeline is None and supervisor.failure is None
    with pytest.raises(ClusterError, match="not started"):
        supervisor.ask(Load(FakeOptions()))


@pytest.mark.parametrize("midway", [State.LOADING, State.SUSPENDED, State.REPLANNING])
def test_stop_midway_ends_the_work_at_its_next_move(runtime, midway):
    """A stop asked while a load or failover runs: the work is not interrupted, but it moves
    on to stopping instead of serving, and what it loaded is closed."""
    moves = Moves()
    supervisor = supervisor_for(runtime, moves)
    first = serving(supervisor)

    def on_state(old, new):
        moves(old, new)
        if new is midway:
            assert supervisor.stop(timeout_s=5) is False     # busy: it does not wait

    supervisor.on_state = on_state
    if midway is State.LOADING:
        with pytest.raises(ClusterError, match="stopped before load finished"):
            supervisor.ask(Load(FakeOptions()))
    else:
        runtime.kill(1)
        first.scheduler.lost("engine 1 stopped")
    assert supervisor.join(5) and supervisor.state is State.STOPPED
    assert (midway, State.STOPPING) in moves and State.SERVING not in moves.states()[4:]
    closed = runtime.loads[-1][0] if midway is not State.SUSPENDED else first
    assert runtime.closed == [closed] and supervisor.recovering is None


def test_stop_when_stopped_is_nothing_and_a_failed_start_ends_stopped(runtime, moves):
    supervisor = Supervisor(runtime, tick_s=None, on_state=moves)
    assert supervisor.stop() and supervisor.state is State.STOPPED

    def refuse():
        raise ClusterError("only 0 of 2 engines registered within 60 s")

    with pytest.raises(ClusterError, match="only 0 of 2"):
        supervisor.start(refuse)
    assert moves.states() == [State.STARTING, State.STOPPING, State.STOPPED]
    supervisor.start(lambda: None)                      # and it starts again
    assert supervisor.state is State.IDLE
    assert supervisor.stop() and supervisor.stop() and supervisor.state is State.STOPPED


def test_commands_queued_behind_a_stop_are_refused(runtime):
    runtime.gate = threading.Event()
    supervisor = supervisor_for(runtime)
    loading = supervisor.submit(Load(FakeOptions()))
    assert runtime.entered.wait(5)
    queued = supervisor.submit(Unload())
    supervisor.stop(timeout_s=0)
    runtime.gate.set()
    assert supervisor.join(5)
    with pytest.raises(ClusterError, match="stopped before load finished"):
        loading.result(5)
    with pytest.raises(ClusterError, match="stopped before unload ran"):
        queued.result(5)


# ---------------------------------------------------------------------------- the machine itself
def test_every_state_has_its_moves_and_an_illegal_one_raises():
    assert set(TRANSITIONS) == set(State)
    for old in State:
        for new in State:
            if new in TRANSITIONS[old]:
                check_transition(old, new)
            else:
                with pytest.raises(TransitionError, match=f"from {old.value} to {new.value}"):
                    check_transition(old, new)


def test_an_illegal_move_by_the_supervisor_raises(runtime):
    supervisor = Supervisor(runtime, tick_s=None)
    with pytest.raises(TransitionError, match="from stopped to serving"):
        supervisor._serve(FakePipeline(FakeOptions(), FakePlan((0,)), FakeScheduler(None)))


def test_unload_after_a_failure_stops_the_reload(supervisor, runtime, moves):
    pipeline = serving(supervisor)
    runtime.need = 5
    pipeline.scheduler.lost("engine 1 stopped")
    supervisor.settle()
    supervisor.ask(Unload())
    assert moves.states()[-1] is State.IDLE and supervisor.failure is None
    runtime.need, loads = 2, len(runtime.loads)
    runtime.registered.add(4)
    supervisor.ask(CheckMembership())
    assert supervisor.state is State.IDLE and len(runtime.loads) == loads


def test_concurrent_user_calls_run_one_at_a_time_on_the_supervisor_thread(supervisor, runtime, moves):
    runtime.gate = threading.Event()
    runtime.better = True
    first = supervisor.submit(Load(FakeOptions("a")))
    second = supervisor.submit(Load(FakeOptions("b")))
    third = supervisor.submit(Replan())
    callers = [threading.Thread(target=supervisor.ask, args=(Load(FakeOptions("c")),)) for _ in range(3)]
    for caller in callers:
        caller.start()
    runtime.gate.set()
    for caller in callers:
        caller.join(10)
    for answer in (first, second, third):
        answer.result(10)
    assert runtime.most_inside == 1 and runtime.threads == {"exo-lab-supervisor"}
    assert [p.options.model for p, _ in runtime.loads[:3]] == ["a", "b", "b"]
    assert len(runtime.loads) == 6 and supervisor.state is State.SERVING
    assert len(runtime.unloaded) == 5                     # each load replaced the one before


def test_health_says_why_without_asking_the_supervisor(supervisor, runtime):
    import asyncio

    assert asyncio.run(supervisor.health()) == (False, "no model is loaded")
    pipeline = serving(supervisor)
    assert asyncio.run(supervisor.health()) == (True, "ok")
    runtime.kill(0)
    # a dead stage nobody noticed: health tells the scheduler, which reports it
    assert asyncio.run(supervisor.health()) == (False, "recovering: engine 0 stopped")
    assert pipeline.scheduler.calls[0] == ("suspend", "engine 0 stopped")
    supervisor.settle()
    assert asyncio.run(supervisor.health()) == (True, "ok") and supervisor.pipeline.engines == (1, 2)


# ---------------------------------------------------------------------------- memory
MiB = 2**20


def stage_memory(node: str, free_mib: int, *, slots: int = 4, kv_slot_mib: int = 100):
    """A stage whose PC has ``free_mib`` free and ``slots`` slots of ``kv_slot_mib`` each; a
    prefill step needs 90, 70, 55 or 50 MiB for chunks of 256, 128, 64 or 32 tokens, a decode
    step 20 MiB plus 10 per row."""
    return memory.StageMemory(node, MemoryReport(
        free_bytes=free_mib * MiB, limit_bytes=1400 * MiB, slots=slots, kv_slot_bytes=kv_slot_mib * MiB,
        decode_bytes=tuple((20 + 10 * s) * MiB for s in range(1, 5)), prefill_chunks=(256, 128, 64, 32),
        prefill_bytes=tuple(m * MiB for m in (90, 70, 55, 50))))


def test_a_pc_short_of_memory_sheds_kv_slots_and_requests_replay(supervisor, runtime, moves):
    old = serving(supervisor)
    runtime.memory = [stage_memory("a", 500), stage_memory("b", 20)]    # b: 20 MiB free, a step needs 90
    supervisor.ask(CheckMembership())
    assert moves.states()[-2:] == [State.REPLANNING, State.SERVING]
    new = supervisor.pipeline
    # one slot freed gives b 120 MiB against a step of 80 with 3 slots: 3 fit
    assert new.options.max_batch == 3 and runtime.loads[-1][1] is old and new.scheduler is old.scheduler
    assert runtime.suspended_for == ["memory"] and [c[0] for c in old.scheduler.calls] == ["suspend", "rewire"]
    assert runtime.kept_plans == [False, True]                    # the same stages: only the slots change
    assert "serving with 3 of 4 KV slots" in supervisor.memory_note and "b is short of memory" in supervisor.memory_note
    assert new.options.prefill_chunk == 256 and runtime.chunks == []
    assert supervisor.options.max_batch == 4                      # the plan's slots, to give back later
    runtime.memory = [stage_memory("a", 500, slots=3), stage_memory("b", 120, slots=3)]
    supervisor.ask(CheckMembership())                             # enough now, but too soon to give back
    assert supervisor.pipeline is new


def test_slots_come_back_when_memory_does_after_the_wait(supervisor, runtime, moves, monkeypatch):
    serving(supervisor)
    runtime.memory = [stage_memory("a", 20)]
    supervisor.ask(CheckMembership())
    assert supervisor.pipeline.options.max_batch == 3
    monkeypatch.setattr(memory, "RESTORE_AFTER_S", 0.0)
    runtime.memory = [stage_memory("a", 150, slots=3)]            # 1 slot more leaves 50: not twice a step
    supervisor.ask(CheckMembership())
    assert supervisor.pipeline.options.max_batch == 3
    runtime.memory = [stage_memory("a", 300, slots=3)]            # 4 slots leave 200 >= 2 x 90
    supervisor.ask(CheckMembership())
    assert supervisor.pipeline.options.max_batch == 4 and supervisor.memory_note is None


def test_a_pc_a_little_short_feeds_smaller_prefill_chunks_first_and_nothing_pauses(supervisor, runtime, moves):
    old = serving(supervisor)
    runtime.memory = [stage_memory("a", 80)]                     # < 90 for 256 tokens, >= 1.25 x 55 for 64
    supervisor.ask(CheckMembership())
    assert runtime.chunks == [64] and supervisor.pipeline is old and old.options.prefill_chunk == 64
    assert State.REPLANNING not in moves.states()[3:] and old.options.max_batch == 4
    assert "prefill chunks of 64 (not 256) tokens" in supervisor.memory_note


def test_a_refused_step_loads_again_one_notch_down_even_when_the_reports_look_fine(supervisor, runtime, moves):
    old = serving(supervisor)
    runtime.memory = [stage_memory("a", 500)]
    old.scheduler.short_of_memory("stage 0's PC is short of memory")
    supervisor.settle()
    assert supervisor.state is State.SERVING and not supervisor.pipeline.scheduler.suspended
    assert runtime.loads[-1][1] is old and runtime.kept_plans[-1] is True
    assert (supervisor.pipeline.options.max_batch, supervisor.pipeline.options.prefill_chunk) == (4, 128)


def test_without_memory_for_one_slot_it_fails_and_tries_again_by_the_clock(supervisor, runtime, moves, monkeypatch):
    old = serving(supervisor)
    runtime.memory = [stage_memory("a", 0, kv_slot_mib=10)]      # 30 MiB even with one slot: a step needs 50
    runtime.fail_load = PlanError("the engines left cannot hold the model")
    supervisor.ask(CheckMembership())
    assert supervisor.state is State.FAILED and "short of memory even with one KV slot and prefill chunks of 32" \
        in supervisor.failure
    assert runtime.kept_plans[-1] is False                        # planned again: layers may move away
    assert ("abort", supervisor.failure) in old.scheduler.calls  # every request ends with the reason
    supervisor.ask(CheckMembership())                             # too soon to try again
    assert supervisor.state is State.FAILED
    monkeypatch.setattr(supervisor_module, "MEMORY_RETRY_S", 0.0)
    runtime.memory = [stage_memory("a", 500)]                     # memory came back
    supervisor.ask(CheckMembership())                             # the same engines: loads again by itself
    assert supervisor.state is State.SERVING and supervisor.failure is None and supervisor.memory_note is None


def test_a_pc_far_from_its_edge_is_looked_at_less_often(supervisor, runtime, moves, monkeypatch):
    old = serving(supervisor)
    runtime.memory = [stage_memory("a", 5000)]                   # 55 worst steps spare
    supervisor.ask(CheckMembership())
    runtime.memory = [stage_memory("a", 20)]                     # shrank since: not looked at yet
    supervisor.ask(CheckMembership())
    assert supervisor.pipeline is old and supervisor.memory_note is None
    monkeypatch.setattr(supervisor_module, "MEMORY_RELAXED_S", 0.0)
    supervisor.ask(CheckMembership())                            # the next look sees it
    assert supervisor.pipeline.options.max_batch == 3
