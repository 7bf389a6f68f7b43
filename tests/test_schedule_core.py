"""The scheduling core's policy, in one process, with a fake pipeline: no engines, no sockets, no
sleeps, no clock.

The fake pipeline keeps, per KV slot, the token ids whose keys and values the slot holds, and
the next token of a row is a hash of all of them: a request gets the tokens it gets alone only
when the core's slots, positions, reused prefixes and replays are right. After every call the
core's books are checked (every slot either free or held by exactly one running request), and
every FREE the plans ask for is counted per slot.
"""
from __future__ import annotations

import collections
import zlib

import pytest

from exo_lab.coordinator.schedule import (
    FIRST_PREFILL_CHUNK,
    MIN_PREFILL_CHUNK,
    Delivery,
    DraftAsk,
    PlannedStep,
    Request,
    SchedulingCore,
    SPECULATION_COOLDOWN,
    Speculation,
    StepPlan,
    StepResult,
)
from exo_lab.coordinator.drafting import prompt_lookup
from exo_lab.coordinator.tenants import LOCAL, Tenant, TenantLimits
from exo_lab.errors import QueueFull, RequestError
from exo_lab.sampling import SamplingParams

VOCAB = 512
NO_TOKEN = -1
A, B = Tenant("client-a"), Tenant("client-b")


def next_token(cache: list[int]) -> int:
    return zlib.crc32(bytes(str(cache), "ascii")) % VOCAB


class FakePipeline:
    """The stages in one process: what each slot's KV holds, the FREEs received, and a step's
    cost (``decode_ms`` per decode step, ``prefill_token_ms`` per prefilled token)."""

    def __init__(self, decode_ms: float = 10.0, prefill_token_ms: float = 0.5, model=None):
        self.decode_ms, self.prefill_token_ms = decode_ms, prefill_token_ms
        self.model = model or next_token
        self.kv: dict[int, list[int]] = {}
        self.frees: list[int] = []

    def execute(self, step: PlannedStep) -> StepResult:
        tokens, verified = [], []
        for row in step.rows:
            cache = self.kv.setdefault(row.slot, [])
            assert row.position <= len(cache), f"a row starts at {row.position} past what slot {row.slot} holds"
            cache[row.position:] = row.token_ids
            # a verify row: the token after each of its positions, as if that one were the last
            verified.append(tuple(self.model(cache[:row.position + i + 1]) for i in range(len(row.token_ids)))
                            if row.verify else ())
            tokens.append(self.model(cache) if row.sample else NO_TOKEN)
        cost_ms = self.prefill_token_ms * step.fed if step.prefill else self.decode_ms
        return StepResult(step.step_id, tuple(tokens), (cost_ms,), verified=tuple(verified) if any(verified) else ())


class Run:
    """Drives a core against a FakePipeline as the runner would: plan, send, answer the oldest
    step in flight, apply; records plans, steps, FREEs and each request's delivered tokens."""

    def __init__(self, core: SchedulingCore, pipe: FakePipeline | None = None):
        self.core, self.pipe = core, pipe or FakePipeline()
        self.in_flight: collections.deque[PlannedStep] = collections.deque()
        self.plans: list[StepPlan] = []
        self.steps: list[PlannedStep] = []
        self.delivered: dict[int, list[int]] = collections.defaultdict(list)   # request_id -> tokens
        self.finished: list[int] = []

    def submit(self, prompt: list[int], tokens: int, tenant: Tenant = LOCAL, ignore_eos: bool = True) -> Request:
        params = SamplingParams(max_new_tokens=tokens, ignore_eos=ignore_eos)
        request = Request(list(prompt), params, params.settings(seed=7), tenant)
        self.core.submit(request)
        check_books(self.core)
        return request

    def plan(self) -> StepPlan:
        plan = self.core.schedule()
        check_books(self.core)
        self.pipe.frees.extend(plan.free_slots)
        self.in_flight.extend(plan.steps)
        self.steps.extend(plan.steps)
        self.plans.append(plan)
        return plan

    def answer(self, step: PlannedStep | None = None) -> Delivery:
        """``step`` (default: the oldest in flight) comes back."""
        step = step or self.in_flight[0]
        self.in_flight.remove(step)
        delivery = self.core.apply(self.pipe.execute(step))
        check_books(self.core)
        for request, token_id in delivery.tokens:
            self.delivered[request.request_id].append(token_id)
        self.finished.extend(r.request_id for r in delivery.finished)
        return delivery

    def turn(self) -> None:
        self.plan()
        if self.in_flight:
            self.answer()

    def until(self, condition, limit: int = 5000) -> None:
        for _ in range(limit):
            if condition():
                return
            self.turn()
        raise AssertionError("the condition never held")

    def until_idle(self, limit: int = 5000) -> None:
        """Run until nothing is in flight and a plan has nothing to send (its FREEs included)."""
        for _ in range(limit):
            plan = self.plan()
            if not self.in_flight and not plan.steps:
                return
            self.answer()
        raise AssertionError("the core never went idle")

    def run_out(self, limit: int = 5000) -> int:
        """Plan and answer until nothing is in flight; returns the drafts accepted on the way."""
        accepted = 0
        for _ in range(limit):
            self.plan()
            if not self.in_flight:
                return accepted
            accepted += self.answer().accepted
        raise AssertionError("the core never ran out of steps")

    def rows_of(self, request: Request) -> list[tuple[int, PlannedStep]]:
        return [(index, step) for index, step in enumerate(self.steps)
                if any(row.request_id == request.request_id for row in step.rows)]


def check_books(core: SchedulingCore) -> None:
    """Every slot is free or held by exactly one running request, never both."""
    held = [r.slot for r in core.running if r.slot is not None]
    assert len(held) == len(set(held)), f"a slot is held twice: {sorted(held)}"
    assert not set(held) & set(core.free_slots), f"a held slot is also free: {set(held) & set(core.free_slots)}"
    assert sorted(held + list(core.free_slots)) == list(range(core.max_batch)), "a slot went missing"


def make_core(max_batch: int = 4, **settings) -> SchedulingCore:
    return SchedulingCore(**{"max_batch": max_batch, "context_length": 4096, "prefill_chunk": 64, **settings})


def alone(prompt: list[int], tokens: int, model=None, **settings) -> list[int]:
    run = Run(make_core(max_batch=1, **settings), FakePipeline(model=model))
    request = run.submit(prompt, tokens)
    run.until_idle()
    return run.delivered[request.request_id]


def prompt_of(seed: int, length: int) -> list[int]:
    return [(seed * 31 + i * 7) % VOCAB for i in range(length)]


# --------------------------------------------------------------------------- batching


def test_requests_join_and_leave_mid_batch_and_get_the_tokens_they_get_alone():
    run = Run(make_core(max_batch=3))
    first = run.submit(prompt_of(1, 5), 12)
    second = run.submit(prompt_of(2, 40), 6)
    run.until(lambda: len(run.delivered[first.request_id]) >= 4)
    late = run.submit(prompt_of(3, 3), 8)
    run.until_idle()
    for request in (first, second, late):
        assert run.delivered[request.request_id] == alone(request.prompt, request.params.max_new_tokens)
    shared = [step for step in run.steps if {first.request_id, late.request_id} <= {r.request_id for r in step.rows}]
    assert shared, "the late request never joined the running one's batch"
    # the short one leaves at once: no step after its last token carries it
    last_of_second = run.rows_of(second)[-1][0]
    assert all(row.request_id != second.request_id for step in run.steps[last_of_second + 1:] for row in step.rows)
    assert sorted(run.finished) == sorted(r.request_id for r in (first, second, late))


def test_a_finished_request_gives_its_slot_back_once_and_a_later_cancel_frees_nothing():
    run = Run(make_core(max_batch=2))
    short = run.submit(prompt_of(4, 3), 3)
    long = run.submit(prompt_of(5, 3), 20)
    slot = short.slot
    run.until(lambda: short.done)
    assert short.slot is None and run.core.free_slots == (slot,)
    run.core.cancel(short)                    # the runner's stream ends the request again: harmless
    assert run.plan().free_slots == (slot,)
    run.until_idle()
    assert collections.Counter(run.pipe.frees) == {0: 1, 1: 1}
    assert len(run.delivered[short.request_id]) == 3 and len(run.delivered[long.request_id]) == 20


def test_max_new_tokens_and_end_of_sequence_end_a_request():
    prompt = prompt_of(6, 4)
    tokens = alone(prompt, 12)
    eos = tokens[4]
    assert eos not in tokens[:4]
    run = Run(make_core(eos_token_ids={eos}))
    stops = run.submit(prompt, 12, ignore_eos=False)
    goes_on = run.submit(prompt, 12, ignore_eos=True)
    run.until_idle()
    assert run.delivered[stops.request_id] == tokens[:5]        # the end-of-sequence token is delivered, then done
    assert run.delivered[goes_on.request_id] == tokens
    assert run.finished.index(stops.request_id) < run.finished.index(goes_on.request_id)


# --------------------------------------------------------------------------- prefix reuse


def test_a_chats_next_turn_reuses_the_kv_of_the_turn_before_in_its_slot():
    run = Run(make_core(max_batch=2))
    history = prompt_of(7, 30)
    turn = run.submit(history, 5, A)
    run.until_idle()
    cached = 30 + 5 - 1                       # the last sampled token never went through the stages
    next_turn = run.submit(history + run.delivered[turn.request_id] + [9, 9, 9], 6, A)
    assert next_turn.slot == run.steps[0].rows[0].slot, "it took a cold slot, not its own warm one"
    plan = run.plan()
    assert plan.reused_positions == (cached,)
    assert plan.steps[0].rows[0].position == cached and plan.steps[0].rows[0].token_ids == tuple(next_turn.tokens[cached:])
    run.until_idle()
    assert run.delivered[next_turn.request_id] == alone(next_turn.prompt, 6)


def test_a_prompt_equal_to_the_cached_tokens_still_feeds_its_last_token():
    run = Run(make_core(max_batch=1))
    first = run.submit(prompt_of(8, 10), 3, A)
    run.until_idle()
    again = run.submit(first.tokens[:12], 2, A)
    plan = run.plan()
    assert plan.reused_positions == (11,) and plan.steps[0].rows[0].token_ids == (again.prompt[-1],)


@pytest.mark.parametrize("other", [B, Tenant(A.client_id, "user-2")], ids=["other client", "other isolation key"])
def test_a_cached_prefix_is_never_reused_across_tenant_scopes(other):
    run = Run(make_core(max_batch=2))
    secret = prompt_of(9, 40)
    run.submit(secret, 2, A)
    run.until_idle()
    probe = run.submit(secret[:30] + [1, 2], 2, other)
    plan = run.plan()
    assert plan.reused_positions == ()
    assert plan.steps[0].rows[0].position == 0 and probe.slot != run.steps[0].rows[0].slot
    run.until_idle()
    assert run.delivered[probe.request_id] == alone(probe.prompt, 2)


# --------------------------------------------------------------------------- step shapes


def prefill_chunks(run: Run, request: Request) -> list[int]:
    return [step.fed for _, step in run.rows_of(request) if step.prefill]


def test_a_prompt_alone_is_prefilled_in_chunks_of_prefill_chunk_sampling_only_the_last():
    run = Run(make_core(prefill_chunk=256))
    request = run.submit(prompt_of(10, 300), 2)
    run.until_idle()
    steps = [step for _, step in run.rows_of(request) if step.prefill]
    assert [step.fed for step in steps] == [256, 44]
    assert [step.rows[0].sample for step in steps] == [False, True]
    assert [step.rows[0].position for step in steps] == [0, 256]


@pytest.mark.parametrize(("decode_ms", "prefill_token_ms", "expected"), [
    (10.0, 0.5, [20] * 15),                             # a chunk costs one decode step
    (4.0, 0.5, [MIN_PREFILL_CHUNK] * 18 + [12]),        # never below MIN_PREFILL_CHUNK
    (1000.0, 0.5, [256, 44]),                           # never above prefill_chunk
])
def test_next_to_decoding_streams_a_chunk_costs_about_one_measured_decode_step(decode_ms, prefill_token_ms,
                                                                                expected):
    run = Run(make_core(prefill_chunk=256), FakePipeline(decode_ms, prefill_token_ms))
    decoding = run.submit(prompt_of(11, 20), 200)
    run.until(lambda: len(run.delivered[decoding.request_id]) >= 3)      # both kinds of step were timed
    late = run.submit(prompt_of(12, 300), 2)
    run.until_idle()
    assert prefill_chunks(run, late) == expected


def test_before_a_decode_step_was_timed_a_chunk_is_first_prefill_chunk():
    run = Run(make_core(prefill_chunk=256))
    decoding = run.submit(prompt_of(13, 20), 50)
    run.until(lambda: len(run.delivered[decoding.request_id]) == 1)      # decoding, no decode step timed yet
    late = run.submit(prompt_of(14, 300), 2)
    run.until_idle()
    assert prefill_chunks(run, late)[0] == FIRST_PREFILL_CHUNK


def test_decoding_requests_are_split_into_micro_batches_in_flight_at_once():
    run = Run(make_core(max_batch=4, micro_batches=2))
    requests = [run.submit([i + 1], 5) for i in range(4)]                 # one-token prompts: decoding at once
    plan = run.plan()
    assert [len(step.rows) for step in plan.steps] == [2, 2] and not any(s.prefill for s in plan.steps)
    assert run.plan().steps == (), "a third step while two micro-batches are in flight"
    run.answer()
    again = run.plan()
    assert [[row.request_id for row in step.rows] for step in again.steps] == \
        [[row.request_id for row in plan.steps[0].rows]]
    run.until_idle()
    assert all(run.delivered[r.request_id] == alone(r.prompt, 5) for r in requests)


def test_one_prefill_chunk_is_in_flight_at_a_time_beside_decode_steps():
    run = Run(make_core(max_batch=3, prefill_chunk=32))
    decoding = run.submit([5], 30)
    first, second = run.submit(prompt_of(15, 100), 2), run.submit(prompt_of(16, 100), 2)
    prefill, decode = run.plan().steps
    assert (prefill.prefill, [r.request_id for r in prefill.rows]) == (True, [first.request_id])
    assert (decode.prefill, [r.request_id for r in decode.rows]) == (False, [decoding.request_id])
    for _ in range(3):                                    # decode steps go on while the chunk is in the stages
        run.answer(next(step for step in run.in_flight if not step.prefill))
        plan = run.plan()
        assert [step.prefill for step in plan.steps] == [False], "a second prefill chunk while one is in flight"
    run.answer(prefill)
    assert [step.rows[0].request_id for step in run.plan().steps if step.prefill] == [first.request_id]
    run.until_idle()
    lanes = [step.rows[0].request_id for step in run.steps if step.prefill]
    switch = lanes.index(second.request_id)
    assert set(lanes[:switch]) == {first.request_id} and set(lanes[switch:]) == {second.request_id}


# --------------------------------------------------------------------------- queue limits


def test_past_max_queued_a_request_is_refused_and_a_tenants_first_one_still_fits():
    run = Run(make_core(max_batch=1, max_queued=2))
    for i in range(3):
        run.submit([i + 1], 30, A)                                        # one runs, two wait
    refused = Request([9], SamplingParams(max_new_tokens=3), SamplingParams().settings(1), A)
    with pytest.raises(QueueFull) as error:
        run.core.submit(refused)
    assert str(error.value).startswith("all 1 KV slots are busy and 2 requests are already waiting (max_queued 2)")
    assert error.value.retry_after_s == 3.0                               # 30 tokens left x 100 ms, untimed
    assert refused.request_id == 0 and len(run.core.waiting) == 2, "a refused request changed the queue"
    run.submit([7], 3, B)                                                 # B's first waiting request fits
    with pytest.raises(QueueFull, match="max_queued 2"):
        run.submit([8], 3, B)


def test_a_tenants_own_caps_refuse_with_its_own_numbers():
    capped = Tenant("client-capped", limits=TenantLimits(max_running=1, max_queued=2))
    run = Run(make_core(max_batch=4))
    for i in range(3):
        run.submit([i + 1], 50, capped)
    assert [r.tenant for r in run.core.running] == [capped], "past its max_running"
    with pytest.raises(QueueFull) as error:
        run.submit([4], 2, capped)
    assert str(error.value).startswith("your client has 2 requests queued, its limit (api.max_queued_per_client) "
                                       "is 2, and 1 running")
    other = run.submit([5], 2, B)
    assert other.slot is not None, "a free slot was kept from another client"
    assert run.core.client_load() == [{"client": capped.label, "running": 1, "queued": 2},
                                      {"client": B.label, "running": 1, "queued": 0}]


def test_retry_after_is_the_nearest_end_at_the_measured_decode_pace_within_bounds():
    run = Run(make_core(max_batch=2), FakePipeline(decode_ms=40.0))
    running = run.submit([1], 100, A)
    run.until(lambda: len(run.delivered[running.request_id]) == 3)       # 97 left, 40 ms each
    assert run.core.retry_after_s(A) == pytest.approx(97 * 0.040)
    assert run.core.retry_after_s(B) == pytest.approx(97 * 0.040), "anyone's request when B runs none"
    nearly_done = run.submit([2], 4, B)
    run.until(lambda: len(run.delivered[nearly_done.request_id]) == 3)
    assert run.core.retry_after_s(B) == 1.0                               # 1 token x 40 ms, at least 1 s
    assert run.core.retry_after_s(A) > 1.0, "another client's request end told to A"
    run.core.cancel(running)
    long = run.submit([2], 4000, A)
    assert long.slot is not None and run.core.retry_after_s(A) == 60.0


def test_a_request_that_cannot_run_is_refused_with_its_numbers():
    core = make_core(context_length=100)
    with pytest.raises(RequestError, match="empty"):
        core.check([], SamplingParams())
    with pytest.raises(RequestError, match=r"context is 100 tokens, but the request needs 110 \(90 in the prompt "
                                           r"\+ 20 to generate\); .* at most 10"):
        core.check([1] * 90, SamplingParams(max_new_tokens=20))


# --------------------------------------------------------------------------- cancellation


def test_cancelling_a_queued_request_takes_it_out_without_a_slot_or_a_free():
    run = Run(make_core(max_batch=1))
    run.submit([1], 5)
    queued = run.submit([2], 5)
    run.core.cancel(queued)
    assert run.core.waiting == ()
    run.until_idle()
    assert run.rows_of(queued) == [] and run.pipe.frees == [0]


def test_cancelling_a_running_request_frees_its_slot_at_once_for_the_next():
    run = Run(make_core(max_batch=1))
    gone, waiting = run.submit([1], 50), run.submit([2], 5)
    run.until(lambda: len(run.delivered[gone.request_id]) == 2 and not run.in_flight)
    run.core.cancel(gone)
    plan = run.plan()
    assert plan.free_slots == (0,) and [r.request_id for r in plan.steps[0].rows] == [waiting.request_id]
    run.until_idle()
    assert len(run.delivered[gone.request_id]) == 2 and run.pipe.frees == [0, 0]
    assert run.delivered[waiting.request_id] == alone([2], 5)


def test_cancelling_a_request_in_flight_frees_its_slot_once_when_its_step_returns():
    run = Run(make_core(max_batch=2))
    gone, kept = run.submit([1], 50), run.submit([2], 8)
    slot = gone.slot
    run.plan()
    run.core.cancel(gone)
    run.core.cancel(gone)
    assert run.plan().free_slots == (), "freed while its step is still in the stages"
    delivery = run.answer()
    assert [r.request_id for r, _ in delivery.tokens] == [kept.request_id], "a token for a cancelled request"
    assert run.plan().free_slots == (slot,)
    run.until_idle()
    assert collections.Counter(run.pipe.frees) == {0: 1, 1: 1}
    assert run.delivered[kept.request_id] == alone([2], 8)


def test_a_failed_step_ends_its_requests_and_frees_their_slots_once():
    run = Run(make_core(max_batch=2))
    failing, other = run.submit([1], 10), run.submit([2], 10)
    run.core.micro_batches = 2
    plan = run.plan()
    doomed = next(step for step in plan.steps if step.rows[0].request_id == failing.request_id)
    assert run.core.fail_step(doomed.step_id) == (failing,) and failing.done
    assert run.core.fail_step(doomed.step_id) is None
    run.in_flight.remove(doomed)
    run.until_idle()
    assert collections.Counter(run.pipe.frees) == {0: 1, 1: 1}
    assert run.delivered[other.request_id] == alone([2], 10)


def test_abort_ends_every_request_and_gives_every_slot_back():
    run = Run(make_core(max_batch=2))
    requests = [run.submit([i + 1], 10) for i in range(3)]
    run.plan()
    ended = run.core.abort()
    assert ended == tuple(requests) and all(r.done for r in requests)
    assert run.core.waiting == () and run.core.take_freed() == ()       # both still in flight
    while run.in_flight:
        assert run.answer().tokens == ()
    assert sorted(run.core.take_freed()) == [0, 1] and run.core.running == ()


def test_an_unknown_or_malformed_result_is_dropped():
    run = Run(make_core())
    request = run.submit([1], 3)
    step = run.plan().steps[0]
    assert run.core.apply(StepResult(step.step_id + 99, (5,))).dropped
    assert run.core.apply(StepResult(step.step_id, (5, 6))).dropped
    assert request.generated == []


# --------------------------------------------------------------------------- failover


def test_suspended_requests_replay_and_get_the_tokens_of_an_uninterrupted_run():
    prompts = [(prompt_of(17, 30), 25), (prompt_of(18, 5), 20), (prompt_of(19, 70), 15)]

    def start() -> tuple[Run, list[Request]]:
        run = Run(make_core(max_batch=2, micro_batches=2, prefill_chunk=32))
        return run, [run.submit(prompt, tokens) for prompt, tokens in prompts]

    steady, requests = start()
    steady.until_idle()
    expected = [steady.delivered[r.request_id] for r in requests]

    run, requests = start()
    run.until(lambda: sum(map(len, run.delivered.values())) >= 12 and run.in_flight)
    lost = list(run.in_flight)
    live = [r for r in run.core.running if not r.done]
    assert run.core.suspend() == len(live) >= 1
    run.in_flight.clear()
    old, run.pipe = run.pipe, FakePipeline()                   # new stages: no KV anywhere
    assert all(run.core.apply(old.execute(step)).dropped for step in lost), "a lost step's answer was used"
    replay = run.plan()
    assert replay.free_slots == (), "FREEs for the lost stages' slots"
    row = replay.steps[0].rows[0]
    replayed = next(r for r in requests if r.request_id == row.request_id)
    assert replayed in live and row.position == 0 and list(row.token_ids) == replayed.tokens[:len(row.token_ids)]
    run.until_idle()
    assert [run.delivered[r.request_id] for r in requests] == expected
    assert len(run.pipe.frees) == len(requests)


def test_fewer_slots_after_a_suspend_take_the_requests_admitted_meanwhile_back_and_tokens_stay():
    prompts = [(prompt_of(20 + i, 10 + 9 * i), 12) for i in range(4)]
    expected = [alone(prompt, tokens) for prompt, tokens in prompts]

    run = Run(make_core(max_batch=4, prefill_chunk=32))
    requests = [run.submit(p, t) for p, t in prompts[:3]]
    run.until(lambda: sum(map(len, run.delivered.values())) >= 6)
    run.core.suspend()                                          # a PC got short of memory
    run.in_flight.clear()
    requests.append(run.submit(*prompts[3]))                    # arrives during the pause: gets a slot
    assert requests[-1].slot is not None
    run.core.resize(2)                                          # the stages shed half their slots
    check_books(run.core)
    assert run.core.max_batch == 2 and len(run.core.running) == 0 and len(run.core.waiting) == 4
    run.pipe = FakePipeline()
    run.until_idle()
    assert [run.delivered[r.request_id] for r in requests] == expected
    assert max(len(step.rows) for step in run.steps[-20:]) <= 2


# --------------------------------------------------------------------------- fair share


def test_free_slots_go_in_turns_across_tenants_first_come_first_served_within_one():
    run = Run(make_core(max_batch=1))
    mine = [run.submit([10 + i], 2, A) for i in range(3)]
    theirs = [run.submit([20 + i], 2, B) for i in range(3)]
    run.until_idle()
    first_steps = sorted((run.rows_of(r)[0][0], r.prompt[0]) for r in mine + theirs)
    assert [prompt for _, prompt in first_steps] == [10, 20, 11, 21, 12, 22]


def test_a_waiting_tenant_preempts_the_cheapest_request_of_the_one_holding_the_most():
    run = Run(make_core(max_batch=4))
    hog = [run.submit(prompt_of(20 + i, length), 30, A) for i, length in enumerate((40, 9, 25, 60))]
    run.until(lambda: all(len(run.delivered[r.request_id]) >= 2 for r in hog) and not run.in_flight)
    cheapest = min(hog, key=lambda r: r.kv_len)
    assert cheapest is hog[1]
    slot = cheapest.slot
    other = run.submit([3, 4, 5], 5, B)
    assert other.slot == slot and cheapest.slot is None and run.core.waiting == (cheapest,)
    plan = run.plan()
    assert plan.preempted == 1 and plan.free_slots == (slot,)
    run.until_idle()
    assert [run.delivered[r.request_id] for r in hog] == [alone(r.prompt, 30) for r in hog]
    assert run.delivered[other.request_id] == alone([3, 4, 5], 5)
    assert sum(plan.preempted for plan in run.plans) == 1, "preempted more than the fair share needs"


def test_a_request_preempted_in_flight_gives_its_slot_back_when_its_step_returns():
    run = Run(make_core(max_batch=2))
    hog = [run.submit([i + 1], 20, A) for i in range(2)]
    run.until(lambda: all(len(run.delivered[r.request_id]) >= 1 for r in hog))
    run.plan()
    assert all(r.in_flight for r in hog)
    other = run.submit([9], 3, B)
    assert other.slot is None and sum(r.preempting for r in hog) == 1
    victim = next(r for r in hog if r.preempting)
    slot = victim.slot
    run.answer()
    assert victim.slot is None and run.core.waiting == (other, victim) or run.core.waiting == (victim, other)
    assert run.plan().free_slots == (slot,) and other.slot == slot
    run.until_idle()
    assert [run.delivered[r.request_id] for r in hog] == [alone(r.prompt, 20) for r in hog]
    assert sum(plan.preempted for plan in run.plans) == 1


def test_slots_freed_just_before_a_failover_are_not_freed_on_the_new_stages():
    run = Run(make_core(max_batch=2))
    gone, kept = run.submit([1], 10), run.submit([2], 10)
    run.until(lambda: len(run.delivered[kept.request_id]) == 2 and not run.in_flight)
    run.core.cancel(gone)                     # its FREE would go with the next plan
    assert run.core.suspend() == 1
    replay = run.plan()
    assert replay.free_slots == () and [row.request_id for step in replay.steps for row in step.rows] == \
        [kept.request_id]


# --------------------------------------------------------------------------- logit rules, embeddings, n choices

from exo_lab.sampling import LogitRule   # noqa: E402


class RecordingProcessor:
    """A processor that allows every token but one it names per step, and finishes after ``length`` tokens."""

    def __init__(self, length: int = 1000):
        self.length, self.calls, self.accepted = length, [], []

    def next_rule(self):
        self.calls.append(("next_rule", len(self.accepted)))
        return LogitRule(bias=((len(self.accepted), -5.0),))

    def accept(self, token_id: int) -> None:
        self.calls.append(("accept", token_id))
        self.accepted.append(token_id)

    def finished(self) -> bool:
        return len(self.accepted) >= self.length


def submit_with(run: Run, prompt, tokens, processor=None, **params) -> Request:
    params = SamplingParams(max_new_tokens=tokens, ignore_eos=True, **params)
    request = Request(list(prompt), params, params.settings(seed=7), LOCAL, processor)
    run.core.submit(request)
    return request


def test_a_processor_is_asked_once_per_sampled_row_and_told_each_token_in_order():
    run = Run(make_core(prefill_chunk=16))
    processor = RecordingProcessor(length=5)
    request = submit_with(run, prompt_of(1, 40), 50, processor)
    run.until_idle()
    tokens = run.delivered[request.request_id]
    assert len(tokens) == 5 and request.stopped and run.finished == [request.request_id]
    # asked only for rows that sample (not for the prompt's first two chunks), each before its token
    expected = [call for i, token in enumerate(tokens) for call in (("next_rule", i), ("accept", token))]
    assert processor.calls == expected
    sampled_rows = [row for step in run.steps for row in step.rows if row.sample]
    assert [row.rule.bias for row in sampled_rows] == [((i, -5.0),) for i in range(5)]
    assert all(row.rule is None for step in run.steps for row in step.rows if not row.sample)


class DeadEndProcessor(RecordingProcessor):
    """A grammar that allows nothing after ``length`` tokens (a mask of no token)."""

    def next_rule(self):
        if len(self.accepted) < self.length:
            return super().next_rule()
        self.calls.append(("next_rule", len(self.accepted)))
        return LogitRule(allowed=bytes(16))

    def finished(self) -> bool:
        return False


def test_a_grammar_that_allows_no_token_ends_its_request_alone():
    """Its row never reaches the last stage (whose sampler would fail the whole step): the
    request ends with a message that says why, and the request batched with it goes on."""
    run = Run(make_core())
    stuck = submit_with(run, prompt_of(6, 8), 20, DeadEndProcessor(length=3))
    other = run.submit(prompt_of(7, 8), 12)
    run.until_idle()
    failed = [why for plan in run.plans for request, why in plan.failed if request is stuck]
    assert failed == ["its grammar allows no next token: the constraint cannot be met from here"]
    assert len(run.delivered[stuck.request_id]) == 3 and stuck.done
    assert run.delivered[other.request_id] == alone(other.prompt, 12)
    assert all(row.rule is None or row.rule.allowed is None for step in run.steps for row in step.rows)
    check_books(run.core)


def test_penalties_and_logit_bias_bias_each_row_by_the_requests_own_tokens():
    run = Run(make_core())
    request = submit_with(run, prompt_of(2, 5), 12, presence_penalty=0.5, frequency_penalty=0.25,
                          logit_bias=((3, 2.0), (9, -1.0)))
    other = submit_with(run, prompt_of(3, 5), 12)
    run.until_idle()
    rows = [row for step in run.steps for row in step.rows if row.request_id == request.request_id and row.sample]
    tokens = run.delivered[request.request_id]
    for index, row in enumerate(rows):
        bias = {3: 2.0, 9: -1.0}
        for token in set(tokens[:index]):       # OpenAI's formula, by hand
            bias[token] = bias.get(token, 0.0) - (0.5 + 0.25 * tokens[:index].count(token))
        assert dict(row.rule.bias) == pytest.approx(bias) and row.rule.allowed is None
    assert all(row.rule is None for step in run.steps for row in step.rows if row.request_id == other.request_id)


def test_embed_requests_prefill_in_batches_sample_nothing_and_free_their_slots():
    core = make_core(max_batch=4, prefill_chunk=32)
    run = Run(core)
    params = SamplingParams(max_new_tokens=1)
    embeds = [Request(prompt_of(i, length), params, params.settings(0), LOCAL, embed=2) for i, length in
              enumerate((10, 10, 40))]
    for request in embeds:
        core.submit(request)
    run.until_idle()
    assert sorted(run.finished) == sorted(r.request_id for r in embeds) and not run.delivered
    assert all(not row.sample and row.embed == 2 for step in run.steps for row in step.rows)
    assert [len(step.rows) for step in run.steps][0] == 3 and run.steps[0].fed == 10   # batched, one length
    fed = collections.Counter()
    for step in run.steps:
        for row in step.rows:
            fed[row.request_id] += len(row.token_ids)
    assert [fed[r.request_id] for r in embeds] == [10, 10, 40]         # every position, no reuse
    assert not core.running and sorted(run.pipe.frees) == [0, 1, 2] and all(r.slot is None for r in embeds)
    with pytest.raises(RequestError, match="context is 4096 tokens, but an input has 4097"):
        core.check(prompt_of(1, 4097), params, embed=True)


def start_group(run: Run, n: int, prompt: list[int], tokens: int) -> list[Request]:
    params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
    group = [Request(list(prompt), params, params.settings(seed=7 + i)) for i in range(n)]
    run.core.submit_group(group)
    return group


def test_n_choices_prefill_the_prompt_once_and_copy_its_kv_to_each_sibling_once():
    run = Run(make_core(max_batch=4, prefill_chunk=16))
    prompt = prompt_of(4, 50)
    group = start_group(run, 3, prompt, 6)
    copies = []
    for _ in range(200):
        plan = run.plan()
        for src, dst, length in plan.copies:    # the fake stages copy like the real ones
            run.pipe.kv[dst] = list(run.pipe.kv[src][:length])
            copies.append((src, dst, length))
        if not run.in_flight and not plan.steps:
            break
        run.answer()
    leader = group[0]
    assert sorted(copies) == sorted((0, dst, 49) for dst in (1, 2))     # once per sibling, 49 positions
    prefilled = [len(row.token_ids) for step in run.steps for row in step.rows if len(row.token_ids) > 1]
    assert sum(prefilled) == 50 and all(r.request_id == leader.request_id for step in run.steps if step.prefill
                                          for r in step.rows)
    # each choice gets the tokens it gets alone (the fake's next token depends on the KV alone)
    solo = alone(prompt, 6)
    assert all(run.delivered[r.request_id] == solo for r in group)
    with pytest.raises(RequestError, match="n must be between 1 and max_batch"):
        start_group(run, 5, prompt, 2)


def test_a_request_with_a_processor_replays_after_a_failover_without_telling_it_twice():
    def start():
        run = Run(make_core(prefill_chunk=16))
        processor = RecordingProcessor()
        return run, processor, submit_with(run, prompt_of(5, 30), 12, processor)

    clean_run, clean_processor, clean = start()
    clean_run.until_idle()
    run, processor, request = start()
    run.until(lambda: len(run.delivered[request.request_id]) == 5)
    assert run.core.suspend() == 1
    run.in_flight.clear()
    run.pipe = FakePipeline()                                 # new stages, empty KV
    run.until_idle()
    assert run.delivered[request.request_id] == clean_run.delivered[clean.request_id]
    assert processor.accepted == run.delivered[request.request_id] == clean_processor.accepted
    assert processor.calls == clean_processor.calls           # asked once per token, replay or not


# --------------------------------------------------------------------------- speculative decoding
def copying(cache: list[int]) -> int:
    """A model that continues what it has seen: after token t, what followed t's previous
    occurrence (a hash where t is new). Prompt lookup's drafts are mostly right for it."""
    last = cache[-1]
    for at in range(len(cache) - 2, -1, -1):
        if cache[at] == last:
            return cache[at + 1]
    return next_token(cache)


def spec_run(max_draft: int = 4, max_rows: int = 2, model=None, **settings) -> Run:
    return Run(make_core(speculation=Speculation("prompt_lookup", max_draft=max_draft, max_rows=max_rows), **settings),
               FakePipeline(model=model))


def skipping(cache: list[int]) -> int:
    """Copies, but every fifth position skips a token of what it copies: runs of drafts
    accepted, then one rejected, then drafts again (the skip lands back inside the text)."""
    return copying(cache + [copying(cache)]) if len(cache) % 5 == 0 else copying(cache)


@pytest.mark.parametrize("model", [copying, skipping], ids=["drafts-right", "drafts-partly-right"])
@pytest.mark.parametrize("requests", [1, 2])
def test_speculation_gives_the_tokens_of_plain_decoding(model, requests):
    """Accepted drafts, rejected ones, rows of different draft lengths padded in one step, the
    KV of rejected positions left behind: each request gets exactly the tokens it gets alone."""
    run = spec_run(model=model)
    submitted = [run.submit(prompt_of(seed, 40) * 2, 30) for seed in range(requests)]
    accepted = run.run_out()
    for request in submitted:
        assert run.delivered[request.request_id] == alone(request.prompt, 30, model=model)
    verify = [step for step in run.steps if any(row.verify for row in step.rows)]
    assert verify, "no verify step was planned"
    assert accepted > 10 and len(run.steps) < 30 * requests    # several tokens per trip
    drafted = sum(row.drafts for step in verify for row in step.rows)
    if model is skipping:
        assert accepted < drafted                                  # some rejected
    elif requests == 1:
        assert accepted == drafted                                 # no guess padded, none rejected


def test_a_request_that_ends_inside_an_accepted_run_stops_there():
    prompt = prompt_of(8, 30) * 2
    tokens = alone(prompt, 20, model=copying)
    eos = tokens[6]
    assert eos not in tokens[:6]
    run = spec_run(model=copying, eos_token_ids={eos})
    request = run.submit(prompt, 20, ignore_eos=False)
    run.until_idle()
    assert run.delivered[request.request_id] == tokens[:7] and request.request_id in run.finished
    assert any(step.rows[0].verify and len(step.rows[0].token_ids) > 2 for step in run.steps)
    limited = spec_run(model=copying)
    short = limited.submit(prompt, 5)
    limited.until_idle()
    assert limited.delivered[short.request_id] == tokens[:5]
    assert all(len(step.rows[0].token_ids) <= 5 for step in limited.steps if step.rows[0].verify)


def test_speculation_backs_off_past_max_rows_and_for_requests_it_cannot_verify():
    run = spec_run(model=copying, max_rows=2)
    many = [run.submit(prompt_of(seed, 20) * 2, 12 + seed) for seed in range(3)]
    run.until(lambda: run.finished)
    assert not any(row.verify for step in run.steps for row in step.rows)    # 3 running: off
    run.until_idle()
    assert any(row.verify for step in run.steps for row in step.rows)        # 2 left: on again
    for request in many:
        assert run.delivered[request.request_id] == alone(request.prompt, request.params.max_new_tokens,
                                                          model=copying)
    core = make_core(speculation=Speculation("prompt_lookup", max_draft=4))
    params = SamplingParams(max_new_tokens=8, ignore_eos=True, logprobs=2)
    run = Run(core, FakePipeline(model=copying))
    core.submit(Request(prompt_of(1, 20) * 2, params, params.settings(seed=7)))
    run.until_idle()
    assert not any(row.verify for step in run.steps for row in step.rows)


def test_a_verify_row_answered_short_fails_its_request_only():
    run = spec_run(model=copying)
    request = run.submit(prompt_of(9, 30) * 2, 20)
    for _ in range(100):
        run.plan()
        step = next((step for step in run.in_flight if step.rows[0].verify), None)
        if step is not None:
            break
        run.answer()
    run.in_flight.remove(step)
    delivery = run.core.apply(StepResult(step.step_id, (1,), (1.0,), verified=((1,),)))
    assert [r for r, _ in delivery.failed] == [request] and request.done
    run.until_idle()
    check_books(run.core)


def test_prompt_lookup_proposes_what_followed_the_latest_longest_match():
    assert prompt_lookup([1, 2, 3, 4, 5, 1, 2, 3], 3) == [4, 5, 1]           # 3-gram
    assert prompt_lookup([9, 2, 3, 4, 7, 2, 3, 5, 1, 2, 3], 2) == [5, 1]      # the latest occurrence
    assert prompt_lookup([1, 2, 3, 4, 5, 9, 2, 3], 3) == [4, 5, 9]           # 2-gram
    assert prompt_lookup([1, 2, 3, 4, 5, 6, 7, 3], 3) == []                  # a lone token: no draft
    assert prompt_lookup([1, 2, 1, 2], 0) == [] and prompt_lookup([5], 4) == []
    # token ids whose bytes match across a token boundary are not a match (the search is aligned)
    assert prompt_lookup([0x0100, 0x0200, 7, 1, 2], 2) == []
    assert prompt_lookup([1, 0x01000000, 5, 1, 0x01000000], 2) == [5, 1]


def test_two_trips_with_nothing_accepted_turn_speculation_off_for_a_while():
    run = spec_run(model=copying)
    request = run.submit(prompt_of(3, 30) * 2, 60)
    rejected, resumed = 0, False
    for _ in range(500):
        run.plan()
        step = next((s for s in run.in_flight if s.rows[0].verify), None)
        if step is None:
            if not run.in_flight:
                break
            run.answer()
            continue
        run.in_flight.remove(step)
        if rejected < 2:       # answer with samples that reject every draft
            run.pipe.execute(step)     # the stages write the row's KV (the fake's books)
            wrong = tuple((t + 1) % VOCAB for t in step.rows[0].token_ids[1:]) + (5,)
            delivery = run.core.apply(StepResult(step.step_id, wrong[:1], (1.0,), verified=(wrong,)))
            assert delivery.accepted == 0 and [t for _, t in delivery.tokens] == [wrong[0]]
            rejected += 1
            if rejected == 2:
                off_at = len(request.generated)
                assert request.plain_until == off_at + SPECULATION_COOLDOWN
        else:
            assert len(request.generated) >= off_at + SPECULATION_COOLDOWN, "speculated during the cooldown"
            run.in_flight.appendleft(step)
            run.answer(step)
            resumed = True
    assert rejected == 2 and resumed, "speculation never came back after the cooldown"


@pytest.mark.parametrize("drafter", ["prompt_lookup", "draft_model"])
def test_a_failover_in_the_middle_of_speculation_replays_to_the_same_tokens(drafter):
    """Verify steps lost with the pipeline (their drafts neither accepted nor rejected, drafts
    made ahead of them never offered) are dropped; the replay prefills only accepted tokens and
    goes on speculating to the tokens of an uninterrupted run."""
    prompt = prompt_of(21, 30) * 2
    expected = alone(prompt, 40, model=skipping)
    run = spec_run(model=skipping) if drafter == "prompt_lookup" else draft_model_run(skipping, greedy_drafter(copying))
    request = run.submit(prompt, 40)
    for _ in range(500):
        run.plan()
        if len(run.delivered[request.request_id]) >= 12 and any(step.rows[0].verify for step in run.in_flight):
            break
        run.answer()
    lost = list(run.in_flight)
    assert lost and lost[0].rows[0].verify
    assert run.core.suspend() == 1
    run.in_flight.clear()
    old, run.pipe = run.pipe, FakePipeline(model=skipping)       # new stages: no KV anywhere
    assert all(run.core.apply(old.execute(step)).dropped for step in lost)
    run.until_idle()
    assert run.delivered[request.request_id] == expected
    after = run.steps[run.steps.index(lost[-1]) + 1:]
    assert after[0].prefill and after[0].rows[0].position == 0                       # the replay
    assert list(after[0].rows[0].token_ids) == request.tokens[:len(after[0].rows[0].token_ids)]
    assert any(row.verify for step in after for row in step.rows)                    # speculating again


# --------------------------------------------------------------------------- a draft model drafts
class DraftingRun(Run):
    """Drives the core as the runner does with a draft model: fresh drafts for draft_asks()
    before each plan, and (``ahead``) drafts made past each verify step's guesses while it is in
    flight, offered once it came back. ``drafter(tokens, k)`` is the draft model."""

    def __init__(self, core: SchedulingCore, pipe: FakePipeline, drafter, ahead: bool = True):
        super().__init__(core, pipe)
        self.drafter, self.ahead = drafter, ahead
        self.made_ahead: dict[int, list] = {}      # step id -> [(ask, drafts)]
        self.fresh_asks = 0

    def plan(self) -> StepPlan:
        asks = self.core.draft_asks()
        self.fresh_asks += len(asks)
        self.core.offer_drafts([(ask, self.drafter(ask.tokens, ask.k)) for ask in asks])
        plan = super().plan()
        for step in plan.steps if self.ahead else ():
            asks = self.core.ahead_asks(step)
            if asks:
                self.made_ahead[step.step_id] = [(ask, self.drafter(ask.tokens, ask.k)) for ask in asks]
        return plan

    def answer(self, step: PlannedStep | None = None) -> Delivery:
        step = step or self.in_flight[0]
        delivery = super().answer(step)
        self.core.offer_drafts(self.made_ahead.pop(step.step_id, ()))
        return delivery


def greedy_drafter(model):
    """A draft model that is ``model`` itself: its greedy continuation."""
    def drafts(tokens, k):
        cache = list(tokens)
        for _ in range(k):
            cache.append(model(cache))
        return cache[len(tokens):]
    return drafts


def draft_model_run(model, drafter, ahead=True, max_rows=2) -> DraftingRun:
    core = make_core(speculation=Speculation("draft_model", max_draft=8, max_rows=max_rows))
    return DraftingRun(core, FakePipeline(model=model), drafter, ahead)


@pytest.mark.parametrize("ahead", [True, False], ids=["ahead", "not-ahead"])
@pytest.mark.parametrize("drafter", [copying, skipping], ids=["drafts-right", "drafts-partly-right"])
@pytest.mark.parametrize("requests", [1, 2])
def test_a_draft_model_s_drafts_give_the_tokens_of_plain_decoding(ahead, drafter, requests):
    """The target copies (see copying); the draft model copies too, or skips where the target
    does not. Either way each request gets exactly its tokens alone; drafts made ahead of a
    step are used when its guesses are confirmed, so the draft model is asked afresh less."""
    run = draft_model_run(copying, greedy_drafter(drafter), ahead)
    submitted = [run.submit(prompt_of(40 + seed, 9), 40) for seed in range(requests)]
    accepted = run.run_out()
    for request in submitted:
        assert run.delivered[request.request_id] == alone(request.prompt, 40, model=copying)
    verify = [step for step in run.steps if any(row.verify for row in step.rows)]
    drafted = sum(row.drafts for step in verify for row in step.rows)
    assert verify and accepted > 0
    if drafter is copying and requests == 1:
        assert accepted == drafted                     # every draft right, none padded
        assert len(run.steps) < 40 // 3                # several tokens per trip
    if drafter is skipping:
        assert accepted < drafted
    if ahead and drafter is copying and requests == 1:
        assert run.fresh_asks <= 2, run.fresh_asks     # after the first, every draft was made ahead
    elif not ahead:
        assert run.fresh_asks >= len(verify)


def test_drafts_offered_for_other_tokens_are_not_used():
    """An answer that no longer fits the request (it moved on, or a guess made ahead was
    rejected) is ignored, and the request is asked again; one that fits is used as given."""
    run = draft_model_run(copying, greedy_drafter(copying), ahead=False)
    request = run.submit(prompt_of(50, 9), 30)
    run.until(lambda: len(request.generated) >= 1 and not request.in_flight)
    core = run.core
    (ask,) = core.draft_asks()
    assert ask.tokens == tuple(request.tokens) and ask.k == 4          # FIRST_MODEL_DRAFT
    core.offer_drafts([(DraftAsk(ask.request_id, ask.tokens[:-1] + (ask.tokens[-1] + 1,), 4), (1, 2, 3))])
    assert core.draft_asks() == (ask,)                                 # its last token differs
    core.offer_drafts([(DraftAsk(ask.request_id, ask.tokens + (7,), 4), (1, 2, 3))])
    assert core.draft_asks() == (ask,)                                 # longer than its tokens
    core.offer_drafts([(ask, (11, 12, 13))])
    assert core.draft_asks() == ()
    (step,) = core.schedule().steps
    assert step.rows[0].verify and step.rows[0].token_ids == (ask.tokens[-1], 11, 12, 13)
    # made ahead: the guesses 11, 12, 13 then a sample; drafts made past them start with that sample
    (ahead,) = core.ahead_asks(step)
    assert ahead.tokens == ask.tokens + (11, 12, 13) and ahead.k == 2 * 4 + 1       # k doubles if all accepted
    core.offer_drafts([(ahead, (21, 22, 23))])
    core.apply(StepResult(step.step_id, (11,), (1.0,), verified=((11, 12, 13, 21),)))   # all right, sample 21
    assert request.tokens[-4:] == [11, 12, 13, 21] and core.draft_asks() == ()
    (step,) = core.schedule().steps
    assert step.rows[0].token_ids == (21, 22, 23)


def test_a_request_may_pick_its_drafter():
    """speculative names a drafter per request: prompt lookup on a draft model's load asks the
    draft model nothing; draft_model where the load has none is refused before it is queued."""
    run = draft_model_run(copying, greedy_drafter(copying))
    params = SamplingParams(max_new_tokens=20, ignore_eos=True, speculative="prompt_lookup")
    request = Request(prompt_of(3, 20) * 2, params, params.settings(seed=7))
    run.core.submit(request)
    run.until_idle()
    assert run.fresh_asks == 0 and any(row.verify for step in run.steps for row in step.rows)
    assert run.delivered[request.request_id] == alone(request.prompt, 20, model=copying)
    plain = make_core(speculation=Speculation("prompt_lookup"))
    with pytest.raises(RequestError, match="draft_model.*needs a draft model") as caught:
        plain.check([1, 2, 3], SamplingParams(speculative="draft_model"))
    assert caught.value.param == "speculative"
    with pytest.raises(RequestError, match="speculative must be"):
        SamplingParams(speculative="medusa")
