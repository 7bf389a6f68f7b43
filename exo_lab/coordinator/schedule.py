"""The scheduling core: which requests run, step by step, as pure and typed policy.

One loop decides, step by step, what runs (as vLLM's scheduler does; the stages just execute the
batch they are given). This module is that decision and nothing else: no sockets, no asyncio, no
clock (timings come in with each step's result), no torch. :class:`SchedulingCore` holds the
state; :meth:`~SchedulingCore.schedule` returns a :class:`StepPlan` (the steps to send, the
slots to FREE on the stages) and :meth:`~SchedulingCore.apply` takes a step's
:class:`StepResult` back and says what to deliver. The runner
(:class:`~exo_lab.coordinator.scheduler.Scheduler`) owns the sockets and sends what the plan says.

- **KV slots.** Every stage holds ``max_batch`` KV slots (allocated at load). A request owns a
  slot from admission to its end; beyond ``max_batch`` running requests, new ones wait, and past
  ``max_queued`` waiting ones :class:`~exo_lab.errors.QueueFull` (the API: 429).
- **Tenants** (:mod:`~exo_lab.coordinator.tenants`). Every request belongs to one (an API
  client; :data:`~exo_lab.coordinator.tenants.LOCAL` in a notebook). A tenant has at most its
  ``max_queued`` requests waiting (QueueFull naming its own limit) and holds at most its
  ``max_running`` slots; a tenant's first waiting request fits even when ``max_queued`` others
  wait, so no one client's queue shuts the rest out. Free slots go to the waiting tenant that
  holds the fewest (first come first served within a tenant); and while a tenant waits holding
  two or more slots fewer than another, one of that other's requests is **preempted**: its slot
  is taken back, and it waits at the head of its tenant's queue to replay its tokens, as after a
  failover (the same tokens: draws depend only on seed and position). A refused request is told
  to retry after about the time its tenant's (else anyone's) nearest running request ends, at
  the measured decode pace, within RETRY_AFTER_S.
- **Steps.** Running requests with one token to feed (decoding) go down the pipe together as one
  batch of rows (per-row slots, positions and sampling settings); new requests join at the next
  step, finished or cancelled ones leave at once.
- **Chunked prefill.** A prompt is fed in chunks, one chunk in flight at a time (a lane of its
  own), alternating with decode steps, so streams already decoding keep flowing. While others
  decode, a chunk is sized so it costs about PREFILL_GAP_RATIO decode steps (both measured as the
  steps come back), at least MIN_PREFILL_CHUNK and at most ``prefill_chunk`` tokens
  (FIRST_PREFILL_CHUNK before both were measured); with nobody decoding, a chunk is
  ``prefill_chunk`` tokens.
- **Micro-batches.** Up to ``micro_batches`` decode steps are in flight at once (default: one
  per stage, or one when stages sharing a PC would oversubscribe its cores, see
  :func:`~exo_lab.coordinator.pipeline.default_micro_batches`), so with K stages on K PCs every
  PC works at once; the running requests are split into that many groups.
- **Speculative decoding** (:class:`Speculation`, off unless given). While at most
  ``max_rows`` requests run, a decode group whose every request may speculate (no grammar, bias,
  penalties or logprobs) becomes a verify step: each row feeds its last token and up to ``k``
  drafts (:func:`~exo_lab.coordinator.drafting.prompt_lookup`, or a draft model's offered with
  :meth:`SchedulingCore.offer_drafts`; shorter rows padded with guesses),
  and the last stage samples at every position exactly as plain decoding would there (same
  seed, same position). The drafts that equal the samples are accepted, plus the sample after
  them: greedy and seeded output is token for token that of plain decoding, and with sampling it
  is standard speculative sampling for a deterministic drafter (accept a draft with its target
  probability, else draw from the rest). The KV of rejected positions is left behind: the slot's
  length moves only past what was accepted. ``k`` adapts per request (doubles after a trip
  whose drafts were all accepted, else shrinks to the accepted run plus one, at least
  DRAFT_FLOOR; after two trips with none accepted the request decodes plainly for
  SPECULATION_COOLDOWN tokens).
- **Prefix reuse.** A finished request leaves its tokens' KV in its slot. A new request takes
  the free slot of its own tenant scope (tenant and isolation key) sharing the longest token
  prefix with its prompt and prefills only the rest (a chat's next turn); otherwise the least
  recently freed slot. Never another scope's: what it cached would show in the time to first
  token (a secret in one user's prompt could be guessed token by token by another).

**Slot lifetimes have one owner**, :meth:`SchedulingCore._settle`: however a request ends
(finished, error, client gone, aborted) or gives its slot up (preempted), its slot comes back
there, at once or when its step in flight returns, exactly once; and the slot is then listed in
the next plan's ``free_slots`` so a FREE goes down the pipe for the stages' books.

- **Failover.** When the pipeline is lost, :meth:`SchedulingCore.suspend` puts every running
  request back at the head of the queue with its KV forgotten and its tokens kept; the runner
  rewires to a new pipeline, and each request then replays its prompt and the tokens generated so
  far as a prefill and goes on. Sampling draws depend only on (seed, position), so the tokens do
  not depend on whether a failure happened.
"""
from __future__ import annotations

import collections
import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..errors import QueueFull, RequestError
from ..sampling import MAX_RULE_BIAS, LogitProcessor, LogitRule, SamplingParams, SamplingSettings, merge_rule
from ..settings import SPECULATION_MODES
from .drafting import prompt_lookup
from .tenants import LOCAL, FairQueue, Tenant

# Bounds of the Retry-After a refused request is told (its tenant's next request end, estimated).
RETRY_AFTER_S = (1.0, 60.0)
DEFAULT_DECODE_STEP_MS = 100.0  # the decode pace assumed for Retry-After before a step was timed
CLIENTS_SHOWN = 16          # the most loaded tenants listed in the status
# A prefill chunk next to decoding streams costs about this many decode steps: their gap
# between tokens stays within a small multiple of the usual one while a long prompt prefills.
PREFILL_GAP_RATIO = 1.0
MIN_PREFILL_CHUNK = 16
FIRST_PREFILL_CHUNK = 64    # before any step was timed
EMA_WEIGHT = 0.3            # weight of the newest timing in the running averages
SPECULATION_COOLDOWN = 16   # tokens decoded plainly after two verify trips with nothing accepted
MAX_DRAFT = 16              # draft tokens per row at most (the wire's bound on a verify row)
# speculation "prompt_lookup": drafts per row at most, and the fewest asked for after a partly
# accepted trip. On this CPU a verify row of T positions costs about 1.3 + 0.05 T decode steps
# (SmolLM2: 62 ms for 1 position, 93 for 2, 105 for 9, 134 for 17): the first extra position is
# dear, the next ones cheap. Tuned with benchmarks/bench_speculative.py (editing text and code,
# open chat): 16 and 2, with k doubling after a trip whose drafts were all accepted.
DEFAULT_MAX_DRAFT = 16
DRAFT_FLOOR = 2
# speculation "draft_model": drafts asked for on a request's first verify trip. Each draft costs a
# step of the draft model (SmolLM2 int8 on the coordinator: 18 ms against 55-64 ms for a float32
# step of the pipeline), so k starts low and doubles while the drafts are all accepted.
FIRST_MODEL_DRAFT = 4


@dataclass(frozen=True)
class Speculation:
    """Speculative decoding (module docstring): ``drafter`` is the load's ("off",
    "prompt_lookup", or "draft_model" when a draft model drafts: the runner asks it for
    :meth:`SchedulingCore.draft_asks` and hands the drafts back with
    :meth:`SchedulingCore.offer_drafts` before each :meth:`SchedulingCore.schedule`); a request
    may name another (``SamplingParams.speculative``). At most ``max_draft`` draft tokens per
    row, only while at most ``max_rows`` requests run (past that the step is no longer bound by
    reading the weights, and drafts cost what they save)."""

    drafter: str = "off"
    max_draft: int = DEFAULT_MAX_DRAFT
    max_rows: int = 2

    def __post_init__(self) -> None:
        if (self.drafter not in SPECULATION_MODES or not 1 <= self.max_draft <= MAX_DRAFT
                or self.max_rows < 1):
            raise ValueError(f"Speculation needs a drafter in {SPECULATION_MODES}, 1 <= max_draft <= {MAX_DRAFT} "
                             f"and max_rows >= 1, got {self}")


@dataclass(frozen=True)
class DraftAsk:
    """What a draft model is asked before a step: up to ``k`` tokens to follow ``tokens`` (the
    request's prompt and output so far) for request ``request_id``."""

    request_id: int
    tokens: tuple[int, ...]
    k: int


@dataclass(eq=False)
class Request:
    """One generation request as the core sees it (compared by identity).

    The runner builds it; :meth:`SchedulingCore.submit` gives it its ``request_id``. The core
    alone changes the fields below ``tenant``; the runner may read them."""

    prompt: list[int]
    params: SamplingParams
    settings: SamplingSettings      # what every row of it carries (the seed fixed)
    tenant: Tenant = LOCAL
    processor: LogitProcessor | None = None   # asked for each sampled row's rule, told each token
    embed: int = 0                  # 0: generate; 1, 2: prefill only, pooled last / mean (wire.Row.embed)
    leader: "Request | None" = None  # n choices: the sibling whose prompt KV this one copies
    request_id: int = 0
    generated: list[int] = field(default_factory=list)
    slot: int | None = None
    kv_len: int = 0             # positions whose keys and values its slot holds
    in_flight: bool = False
    done: bool = False          # no more steps: finished, cancelled or failed
    preempting: bool = False    # gives its slot back when its step in flight returns
    stopped: bool = False       # its processor finished: the request ends with "stop"
    draft_k: int = 0            # speculation: drafts to ask for next (0: not started)
    misses: int = 0             # verify trips in a row with no draft accepted
    plain_until: int = 0        # decode plainly until this many tokens are generated
    drafted: int = 0            # draft tokens verified, and of them accepted
    accepted: int = 0
    # a draft model's drafts: (length, last token, drafts) of the tokens they follow (offer_drafts)
    offered: tuple[int, int, tuple[int, ...]] | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.generated

    @property
    def to_feed(self) -> int:
        """Tokens not yet in the KV: the prompt (or its unshared rest), then the last sample."""
        return len(self.prompt) + len(self.generated) - self.kv_len


@dataclass(frozen=True)
class PlannedRow:
    """One request's row of a step: its slot, the sequence position of ``token_ids[0]`` (its
    KV length), the token ids to feed, and whether the last stage samples a token for it."""

    request_id: int
    slot: int
    position: int
    token_ids: tuple[int, ...]
    sample: bool
    settings: SamplingSettings
    rule: LogitRule | None = None       # bias and allowed mask for the sampled token
    logprobs: int = -1                  # -1: none; else the alternatives wanted (wire.Row.logprobs)
    embed: int = 0                      # wire.Row.embed
    drafts: int = 0                     # a verify row: its guesses, token_ids[1:] (drafts, then padding)
    adapter: int = 0                    # the LoRA adapter the row runs with (wire.Row.adapter; 0: none)

    @property
    def verify(self) -> bool:
        """Sampled at every position (wire.Row.verify): token_ids are the last token and guesses."""
        return self.drafts > 0


@dataclass(frozen=True)
class PlannedStep:
    """One micro-batch to send down the pipe: a prefill chunk (one row) or a decode group."""

    step_id: int
    rows: tuple[PlannedRow, ...]
    prefill: bool

    @property
    def fed(self) -> int:
        """Tokens per row."""
        return len(self.rows[0].token_ids)


@dataclass(frozen=True)
class StepPlan:
    """What to send now: FREE for ``free_slots`` (slots given back since the last plan), then
    ``steps``. ``reused_positions``: for each request admitted since the last plan into a slot
    holding a prefix of its tokens, how many positions it reuses; ``preempted``: requests
    preempted since the last plan (both for the runner's counters). ``copies``: (src slot, dst
    slot, positions) to copy on every stage after the FREEs and before the steps (n choices
    sharing one prefill). ``failed``: requests that ended while planning (their processor
    raised), with why, for the runner to tell."""

    steps: tuple[PlannedStep, ...] = ()
    free_slots: tuple[int, ...] = ()
    reused_positions: tuple[int, ...] = ()
    preempted: int = 0
    copies: tuple[tuple[int, int, int], ...] = ()
    failed: tuple[tuple["Request", str], ...] = ()


@dataclass(frozen=True)
class StepResult:
    """A step's answer from the last stage: a token id per row (ignored where the row did not
    sample) and each stage's forward time in ms; ``logprobs``: one per row or (); ``vectors``:
    one pooled vector per row (indexable by row, opaque to the core) or None."""

    step_id: int
    token_ids: tuple[int, ...]
    stage_ms: tuple[float, ...] = ()
    logprobs: tuple = ()
    vectors: object = None
    verified: tuple[tuple[int, ...], ...] = ()    # per row: the samples at each position of a verify row


@dataclass(frozen=True)
class Delivery:
    """What :meth:`SchedulingCore.apply` made of a result: the new token of each sampling row,
    in row order, and the requests that ended with it (end of sequence, max_new_tokens, its
    processor finished, or an embedding's last chunk). ``logprobs``: one per token (None where
    not asked); ``vectors``: (request, pooled vector of this chunk) per embedding row;
    ``failed``: requests whose processor raised on their token, with why.
    ``dropped``: the step is unknown (it ended already, or nobody issued it)."""

    tokens: tuple[tuple[Request, int], ...] = ()
    finished: tuple[Request, ...] = ()
    dropped: bool = False
    logprobs: tuple = ()
    vectors: tuple[tuple[Request, object], ...] = ()
    failed: tuple[tuple[Request, str], ...] = ()
    drafted: int = 0            # speculation: draft tokens verified by this step, and accepted
    accepted: int = 0
    verified_rows: int = 0      # verify rows that came back whole


@dataclass
class _InFlight:
    step: PlannedStep
    requests: list[Request]


@dataclass
class _Pending:
    """What happened between two plans, reported by the next one."""

    free_slots: list[int] = field(default_factory=list)
    reused_positions: list[int] = field(default_factory=list)
    preempted: int = 0
    copies: list[tuple[int, int, int]] = field(default_factory=list)
    failed: list[tuple["Request", str]] = field(default_factory=list)


class SchedulingCore:
    """The scheduling policy and its state (module docstring): waiting requests, running ones,
    steps in flight, free KV slots with their cached prefixes, and timing averages.

    Deterministic: the same calls give the same plans. Not thread-safe; one runner drives it."""

    def __init__(self, *, max_batch: int, context_length: int, eos_token_ids: Iterable[int] = (),
                 micro_batches: int = 1, prefill_chunk: int = 256, max_queued: int = 64,
                 speculation: Speculation = Speculation(), vocab_size: int | None = None):
        self.max_batch = max_batch
        self.vocab_size = vocab_size            # token ids must be below it (None: not checked)
        self.speculation = speculation
        self.context_length = context_length
        self.eos_token_ids = frozenset(eos_token_ids)
        self.micro_batches = max(1, micro_batches)
        self.prefill_chunk = max(1, prefill_chunk)
        self.max_queued = max_queued
        self.decode_step_ms: float | None = None       # running averages of the pipeline's work
        self.prefill_token_ms: float | None = None
        self._waiting = FairQueue()
        self._running: list[Request] = []
        self._in_flight: dict[int, _InFlight] = {}
        # free slot -> (tenant scope, the tokens whose KV it still holds), least recently freed first
        self._free_slots: collections.OrderedDict[int, tuple[tuple | None, list[int]]] = _empty_slots(max_batch)
        self._pending = _Pending()
        self._request_ids = itertools.count(1)
        self._step_ids = itertools.count(1)

    # ----------------------------------------------------------------- what it holds
    @property
    def running(self) -> tuple[Request, ...]:
        """Requests holding a slot (a finished one until its step in flight returns)."""
        return tuple(self._running)

    @property
    def waiting(self) -> tuple[Request, ...]:
        """Requests waiting for a slot, tenant by tenant."""
        return tuple(self._waiting)

    @property
    def free_slots(self) -> tuple[int, ...]:
        """Free slots, least recently freed first."""
        return tuple(self._free_slots)

    def client_load(self) -> list[dict]:
        """Per tenant with requests: its label, KV slots held and requests waiting; the most
        loaded CLIENTS_SHOWN, for the status (no prompt, no address, no key)."""
        load: dict[str, list[int]] = {}
        for request in self._live():
            load.setdefault(request.tenant.label, [0, 0])[0] += 1
        for tenant, waiting in self._waiting.tenants():
            load.setdefault(tenant.label, [0, 0])[1] += waiting
        rows = sorted(load.items(), key=lambda item: (-sum(item[1]), item[0]))[:CLIENTS_SHOWN]
        return [{"client": label, "running": running, "queued": queued} for label, (running, queued) in rows]

    # ----------------------------------------------------------------- requests
    def check(self, prompt_ids: list[int], params: SamplingParams, tenant: Tenant = LOCAL, *,
              embed: bool = False) -> None:
        """Raise RequestError when the request cannot run, QueueFull when it may not wait."""
        if not prompt_ids:
            raise RequestError("the prompt is empty: it must contain at least one token",
                               param="input" if embed else "messages")
        self._check_ids(prompt_ids, "input" if embed else "messages")
        if embed:
            if len(prompt_ids) > self.context_length:
                raise RequestError(f"this model's context is {self.context_length} tokens, but an input has "
                                   f"{len(prompt_ids)}; shorten it", param="input")
            self._check_queue(tenant)
            return
        if params.speculative == "draft_model" and self.speculation.drafter != "draft_model":
            raise RequestError("speculative 'draft_model' needs a draft model, and this load has none; load "
                               "with speculation 'draft_model', or ask for 'prompt_lookup' or true",
                               param="speculative")
        if params.penalized and params.max_new_tokens + len(params.logit_bias) > MAX_RULE_BIAS:
            raise RequestError(f"with presence or frequency penalties, max_tokens plus the logit_bias entries "
                               f"may be at most {MAX_RULE_BIAS}", param="max_tokens")
        needed = len(prompt_ids) + params.max_new_tokens
        if needed > self.context_length:
            raise RequestError(
                f"this model's context is {self.context_length} tokens, but the request needs "
                f"{needed} ({len(prompt_ids)} in the prompt + {params.max_new_tokens} to generate); "
                f"shorten the prompt or lower max_tokens to at most "
                f"{max(self.context_length - len(prompt_ids), 0)}", param="max_tokens")
        self._check_queue(tenant)

    def _check_ids(self, prompt_ids, param: str) -> None:
        """Token ids only (a string here would be read as characters), each in the vocabulary:
        one bad id would fail every request sharing its step."""
        for token in prompt_ids:
            if isinstance(token, bool) or not isinstance(token, int) or token < 0 or (
                    self.vocab_size is not None and token >= self.vocab_size):
                bound = f" below the vocabulary size {self.vocab_size}" if self.vocab_size else ""
                raise RequestError(f"the prompt must be a list of token ids (ints >= 0{bound}); got {token!r} "
                                   "in it. Pass text to cluster.generate()/stream(), or cluster.encode(text) "
                                   "to astream()", param=param)

    def submit(self, request: Request) -> None:
        """Queue ``request`` and admit what fits at once (so the queue holds only the rest).
        Raises as :meth:`check` does, before anything changes."""
        self.check(request.prompt, request.params, request.tenant, embed=bool(request.embed))
        request.request_id = next(self._request_ids)
        self._waiting.append(request)
        self._admit()

    def submit_group(self, requests: list[Request]) -> None:
        """Submit n choices of one prompt: the first prefills it, and each other one, once its slot
        is free and the first's KV holds all of the prompt but its last token, gets those
        positions copied into its slot (a ``copies`` entry of a plan) instead of prefilling them.
        RequestError unless 1 <= n <= max_batch; on any refusal none of them stays queued."""
        if not 1 <= len(requests) <= self.max_batch:
            raise RequestError(f"n must be between 1 and max_batch ({self.max_batch}), got {len(requests)}", param="n")
        for request in requests[1:]:
            request.leader = requests[0]
        submitted = []
        try:
            for request in requests:
                self.submit(request)
                submitted.append(request)
        except BaseException:
            for request in submitted:
                self.cancel(request)
            raise

    def cancel(self, request: Request) -> None:
        """The consumer is done with ``request`` (finished, gone or failed): it leaves the queue,
        or its slot comes back (now, or when its step in flight returns). Idempotent."""
        request.done = True
        self._settle(request)

    def abort(self) -> tuple[Request, ...]:
        """End every request (the survivors cannot hold the model, or shutdown); returns them,
        running ones first, so the runner can tell each one why."""
        ended = (*self._running, *self._waiting)
        for request in ended:
            request.done = True
            self._settle(request)
        self._waiting.clear()
        return ended

    def suspend(self) -> int:
        """The pipeline is lost: every live running request goes back to the head of its queue
        with its KV forgotten and its tokens kept (it replays them as a prefill when admitted
        again); steps in flight and the stages' slots are forgotten with the stages. Returns how
        many requests will replay."""
        replayed = 0
        for request in reversed(self._running):
            request.in_flight, request.kv_len, request.slot, request.preempting = False, 0, None, False
            if not request.done:
                self._waiting.appendleft(request)
                replayed += 1
        self._running.clear()
        self._in_flight.clear()
        self._free_slots = _empty_slots(self.max_batch)
        self._pending.free_slots.clear()     # the stages that would count them are gone
        return replayed

    def resize(self, max_batch: int) -> None:
        """Hold ``max_batch`` KV slots from now on (the stages shed slots, or got them back).
        Only while the stages hold no request's KV (between :meth:`suspend` and the new
        pipeline): requests admitted meanwhile go back to the head of their queue, as at a
        suspend, and are admitted again into the new slots."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.suspend()
        self.max_batch = max_batch
        self._free_slots = _empty_slots(max_batch)

    def retry_after_s(self, tenant: Tenant) -> float:
        """About when a slot frees for ``tenant``: the end of its (else anyone's) running request
        with the fewest tokens left, at the measured decode pace."""
        running = self._live()
        mine = [r for r in running if r.tenant.client_id == tenant.client_id] or running
        tokens_left = min((r.params.max_new_tokens - len(r.generated) for r in mine), default=1)
        seconds = tokens_left * (self.decode_step_ms or DEFAULT_DECODE_STEP_MS) / 1000
        return min(max(seconds, RETRY_AFTER_S[0]), RETRY_AFTER_S[1])

    def _check_queue(self, tenant: Tenant) -> None:
        """QueueFull when ``tenant`` may not have one more request waiting (module docstring)."""
        mine = self._waiting.waiting(tenant.client_id)
        cap = tenant.limits.max_queued
        if cap is not None and mine >= cap:
            raise QueueFull(f"your client has {mine} requests queued, its limit "
                            f"(api.max_queued_per_client) is {cap}, and {self._held().get(tenant.client_id, 0)} "
                            f"running; send the next one when one of them has ended",
                            self.retry_after_s(tenant))
        if len(self._waiting) >= self.max_queued and (mine or not self.max_queued):
            raise QueueFull(f"all {self.max_batch} KV slots are busy and {len(self._waiting)} requests "
                            f"are already waiting (max_queued {self.max_queued}); retry shortly",
                            self.retry_after_s(tenant))

    # ----------------------------------------------------------------- steps
    def schedule(self) -> StepPlan:
        """Admit what fits, then plan the steps to send now: a prefill chunk in a lane of its own
        (one at a time, so decode steps never wait for a second one), and decode groups up to
        ``micro_batches`` in flight. The planned requests count as in flight from here on."""
        self._admit()
        self._copy_prefixes()
        ready = [r for r in self._running if not r.in_flight and not r.done and not self._awaits_leader(r)]
        steps = []
        prefill = [r for r in ready if r.embed or r.to_feed > 1]
        if prefill and not any(flight.step.prefill for flight in self._in_flight.values()):
            steps.append(self._launch_prefill(prefill))
        decode = [r for r in ready if not r.embed and r.to_feed == 1]
        # the decoding requests, split into one group per micro-batch
        size = max(1, math.ceil(len(self._live()) / self.micro_batches))
        in_flight = sum(not flight.step.prefill for flight in self._in_flight.values())
        speculate = len(self._live()) <= self.speculation.max_rows
        while decode and in_flight < self.micro_batches:
            group, decode = decode[:size], decode[size:]
            drafts = self._drafts(group) if speculate else None
            steps.append(self._launch_verify(group, drafts) if drafts else self._launch(group, 1, True, prefill=False))
            in_flight += 1
        return self._plan(tuple(step for step in steps if step is not None))

    def _launch_prefill(self, prefill: list[Request]) -> PlannedStep | None:
        """The prefill lane's next step: a chunk of the first request's prompt, or when that one
        is an embedding, a batch of embeddings' chunks of one length (at most a chunk's tokens)."""
        first, chunk = prefill[0], self._chunk_size()
        if not first.embed:
            fed = min(chunk, first.to_feed)
            return self._launch([first], fed, fed == first.to_feed, prefill=True)
        group = [r for r in prefill if r.embed]
        fed = min(chunk, *(r.to_feed for r in group))
        group = group[:max(1, chunk // fed)]
        return self._launch(group, min(fed, *(r.to_feed for r in group)), False, prefill=True)

    def draft_asks(self) -> tuple[DraftAsk, ...]:
        """What the draft model should draft before the next :meth:`schedule`: each request ready
        to decode whose drafter it is and that has no drafts for its tokens yet, unless
        speculation is off for the load now (too many running)."""
        if len(self._live()) > self.speculation.max_rows:
            return ()
        asks = []
        for r in self._running:
            if (r.in_flight or r.done or r.embed or r.to_feed != 1 or self._drafter(r) != "draft_model"
                    or self._offered(r) is not None):
                continue
            k = self._draft_room(r)
            if k > 0:
                asks.append(DraftAsk(r.request_id, tuple(r.tokens), k))
        return tuple(asks)

    def ahead_asks(self, step: PlannedStep) -> tuple[DraftAsk, ...]:
        """Drafting ahead, while ``step`` (just planned) is in flight: for each of its verify
        rows drafted by the draft model, the drafts to follow the row's tokens should every guess
        be accepted (the first draft then stands for the sample the step brings back). When the
        step's samples do confirm them, the next verify row is ready when the step returns. For
        a prefill chunk of a request the draft model will draft for, an ask of ``k`` 0: the
        draft model takes in the same tokens meanwhile."""
        flight = self._in_flight.get(step.step_id)
        if flight is None or (step.prefill and len(self._live()) > self.speculation.max_rows):
            return ()
        asks = []
        for request, row in zip(flight.requests, step.rows):
            if self._drafter(request) != "draft_model":
                continue
            if row.verify:
                k = min(self.speculation.max_draft, 2 * request.draft_k) + 1
                asks.append(DraftAsk(request.request_id, (*request.tokens, *row.token_ids[1:]), k))
            elif step.prefill:
                asks.append(DraftAsk(request.request_id, tuple(request.tokens[:row.position + len(row.token_ids)]), 0))
        return tuple(asks)

    def offer_drafts(self, offers: Iterable[tuple[DraftAsk, Sequence[int]]]) -> None:
        """The draft model's answers: each ask with the drafts that follow its tokens. A request
        uses them while its tokens are the ask's, or the ask's followed by the first drafts (a
        draft made ahead whose guesses were accepted); otherwise they are ignored."""
        by_id = {r.request_id: r for r in self._running}
        for ask, drafts in offers:
            request = by_id.get(ask.request_id)
            if request is not None and not request.done and ask.tokens:
                request.offered = (len(ask.tokens), ask.tokens[-1], tuple(drafts))

    def _offered(self, request: Request) -> tuple[int, ...] | None:
        """The offered drafts that follow the request's tokens now; None when none do."""
        if request.offered is None:
            return None
        length, last, drafts = request.offered
        tokens = request.tokens
        extra = len(tokens) - length
        if extra < 0 or (extra > 0 and extra >= len(drafts)) or tokens[length - 1] != last \
                or tuple(tokens[length:]) != drafts[:extra]:
            return None
        return drafts[extra:]

    def _drafts(self, group: list[Request]) -> list[list[int]] | None:
        """Each request's drafts when every one of ``group`` may speculate and one has a draft."""
        drafters = [self._drafter(r) for r in group]
        if not all(drafters):
            return None
        drafts = []
        for r, drafter in zip(group, drafters):
            k = self._draft_room(r)
            if drafter == "prompt_lookup":
                drafts.append(prompt_lookup(r.tokens, k))
            else:
                offered, r.offered = self._offered(r), None
                drafts.append(list(offered[:k]) if offered is not None and k > 0 else [])
        return drafts if any(drafts) else None

    def _draft_room(self, request: Request) -> int:
        """Drafts to ask for now: the request's k, within its tokens and context left."""
        if not request.draft_k:
            first = FIRST_MODEL_DRAFT if self._drafter(request) == "draft_model" else self.speculation.max_draft
            request.draft_k = min(first, self.speculation.max_draft)
        room = min(request.params.max_new_tokens - len(request.generated) - 1,
                   self.context_length - 1 - request.kv_len)
        return min(request.draft_k, room)

    def _drafter(self, request: Request) -> str | None:
        """Who drafts for ``request`` now, None when it decodes plainly: its own choice
        (``speculative``), else the load's; and only what sampling alone decides (no processor,
        bias, penalties or logprobs), outside a cooldown."""
        params = request.params
        wanted = self.speculation.drafter if params.speculative is True else params.speculative
        if (not wanted or wanted == "off" or request.processor is not None or params.logit_bias
                or params.penalized or params.logprobs is not None or request.embed
                or len(request.generated) < request.plain_until):
            return None
        if wanted == "draft_model" and self.speculation.drafter != "draft_model":
            return None         # refused by check(); a request submitted without it decodes plainly
        return wanted

    def _launch_verify(self, group: list[Request], drafts: list[list[int]]) -> PlannedStep:
        """A verify step: per row the last token, its drafts, and guesses up to the longest row
        (a guess is checked like a draft, so one that matches is a right token too)."""
        width = max(len(d) for d in drafts)
        rows = []
        for r, draft in zip(group, drafts):
            last = r.tokens[r.kv_len]
            fill = (draft or [last])[-1:] * (width - len(draft))
            rows.append(PlannedRow(r.request_id, r.slot, r.kv_len, (last, *draft, *fill), True, r.settings,
                                   drafts=len(draft) + len(fill), adapter=r.params.adapter))
        return self._issue(rows, group, prefill=False)

    def _awaits_leader(self, request: Request) -> bool:
        """A fresh choice of n waits while its first sibling is still prefilling their prompt."""
        leader, shared = request.leader, len(request.prompt) - 1
        return (leader is not None and not request.generated and request.kv_len < shared
                and leader.slot is not None and not leader.done and leader.kv_len < shared)

    def _copy_prefixes(self) -> None:
        """Copy the prompt's KV (all but its last token) from a leader's slot into the slots of
        its siblings that lack it; the stages do it in order, after the leader's steps wrote it."""
        for request in self._running:
            leader, shared = request.leader, len(request.prompt) - 1
            if (leader is None or request.done or request.in_flight or request.kv_len >= shared
                    or leader.slot is None or leader.kv_len < shared):
                continue
            self._pending.copies.append((leader.slot, request.slot, shared))
            request.kv_len = shared

    def apply(self, result: StepResult) -> Delivery:
        """A step came back: note its timing, move each row's KV length on, hand out the sampled
        tokens, and settle the requests that ended or were preempted meanwhile."""
        flight = self._in_flight.pop(result.step_id, None)
        if flight is None or len(result.token_ids) != len(flight.requests):
            return Delivery(dropped=True)
        self._note_timing(flight.step, result.stage_ms)
        tokens, finished, logprobs, vectors, failed = [], [], [], [], []
        drafted = accepted = verified_rows = 0
        for index, (request, row, token_id) in enumerate(zip(flight.requests, flight.step.rows, result.token_ids)):
            request.in_flight = False
            if row.verify:
                samples = result.verified[index] if len(result.verified) > index else ()
                if len(samples) != len(row.token_ids) and not request.done:
                    request.done = True
                    failed.append((request, f"the last stage sampled {len(samples)} positions of a verify row "
                                            f"of {len(row.token_ids)}"))
                run = self._verified(request, row, samples)
                drafted, accepted = drafted + row.drafts * bool(run), accepted + max(len(run) - 1, 0)
                verified_rows += bool(run)
                for token_id in run:
                    tokens.append((request, token_id))
                    logprobs.append(None)
                    if self._add_token(request, token_id):
                        finished.append(request)
                        break
                request.kv_len = min(request.kv_len, len(request.tokens))   # it ended within the run
                self._settle(request)
                continue
            request.kv_len += flight.step.fed
            if row.embed and not request.done:
                vectors.append((request, None if result.vectors is None else result.vectors[index]))
                if request.kv_len >= len(request.prompt):
                    request.done = True
                    finished.append(request)
            elif row.sample and not request.done:
                tokens.append((request, token_id))
                logprobs.append(result.logprobs[index] if len(result.logprobs) > index else None)
                try:
                    if self._add_token(request, token_id):
                        finished.append(request)
                except Exception as exc:      # the processor's fault ends its request only
                    request.done = True
                    failed.append((request, f"the logit processor failed: {exc!r}"))
            self._settle(request)
        return Delivery(tuple(tokens), tuple(finished), logprobs=tuple(logprobs), vectors=tuple(vectors),
                        failed=tuple(failed), drafted=drafted, accepted=accepted, verified_rows=verified_rows)

    def _verified(self, request: Request, row: PlannedRow, samples: tuple[int, ...]) -> tuple[int, ...]:
        """A verify row came back with the samples at each of its positions: the tokens it
        yields (the drafts equal to the samples, then the sample after them); the slot's KV
        length moves past the last token and the accepted drafts only. Adapts draft_k."""
        guesses = row.token_ids[1:]
        if request.done:                        # ended meanwhile, or the samples did not come whole
            request.kv_len += 1                 # the last token's KV is written either way
            return ()
        run = 0
        while run < len(guesses) and guesses[run] == samples[run]:
            run += 1
        request.kv_len += run + 1
        request.drafted += row.drafts
        request.accepted += run
        maximum = self.speculation.max_draft
        request.draft_k = min(maximum, request.draft_k * 2) if run == len(guesses) else max(DRAFT_FLOOR, run + 1)
        request.misses = request.misses + 1 if run == 0 else 0
        if request.misses >= 2:
            request.misses, request.plain_until = 0, len(request.generated) + run + 1 + SPECULATION_COOLDOWN
        return tuple(samples[:run + 1])

    def fail_step(self, step_id: int) -> tuple[Request, ...] | None:
        """A stage failed on this step: its requests end (returned, for the runner to tell them
        why); None when the step is unknown."""
        flight = self._in_flight.pop(step_id, None)
        if flight is None:
            return None
        for request in flight.requests:
            request.in_flight = False
            request.done = True
            self._settle(request)
        return tuple(flight.requests)

    def take_freed(self) -> tuple[int, ...]:
        """Slots given back since the last plan, for a FREE each (the next plan then has none)."""
        freed, self._pending.free_slots = tuple(self._pending.free_slots), []
        return freed

    def _launch(self, requests: list[Request], fed: int, sample: bool, *, prefill: bool) -> PlannedStep | None:
        """A step of ``fed`` tokens per row; its requests are in flight from now on. A request
        whose processor raises ends here (the plan's ``failed``); None when none is left."""
        rows, launched = [], []
        for r in requests:
            try:
                rule = self._rule(r) if sample else None
            except Exception as exc:
                r.done = True
                why = str(exc) if isinstance(exc, RequestError) else f"the logit processor failed: {exc!r}"
                self._pending.failed.append((r, why))
                self._settle(r)
                continue
            logprobs = -1 if r.params.logprobs is None else r.params.logprobs
            rows.append(PlannedRow(r.request_id, r.slot, r.kv_len, tuple(r.tokens[r.kv_len:r.kv_len + fed]),
                                   sample, r.settings, rule, logprobs if sample else -1, r.embed,
                                   adapter=r.params.adapter))
            launched.append(r)
        if not launched:
            return None
        return self._issue(rows, launched, prefill=prefill)

    def _issue(self, rows: list[PlannedRow], requests: list[Request], *, prefill: bool) -> PlannedStep:
        """A step of ``rows`` (one per request): its requests are in flight from now on."""
        step = PlannedStep(next(self._step_ids), tuple(rows), prefill)
        for request in requests:
            request.in_flight = True
        self._in_flight[step.step_id] = _InFlight(step, list(requests))
        return step

    @staticmethod
    def _rule(request: Request) -> LogitRule | None:
        """The rule of the request's next token: its processor's, with logit_bias and penalties.
        Raises RequestError when the rule allows no token at all (a grammar that cannot go on):
        the request ends here, before its row could fail the whole step at the last stage."""
        rule = request.processor.next_rule() if request.processor is not None else None
        rule = merge_rule(rule, request.params, request.generated)
        if rule is not None and rule.allowed is not None and not rule.allowed.strip(b"\0"):
            raise RequestError("its grammar allows no next token: the constraint cannot be met from here")
        return rule

    def _plan(self, steps: tuple[PlannedStep, ...]) -> StepPlan:
        pending, self._pending = self._pending, _Pending()
        return StepPlan(steps, tuple(pending.free_slots), tuple(pending.reused_positions), pending.preempted,
                        tuple(pending.copies), tuple(pending.failed))

    def _add_token(self, request: Request, token_id: int) -> bool:
        """Append a sampled token (and tell its processor); True when it ends the request (end of
        sequence, length, or its processor finished)."""
        request.generated.append(token_id)
        is_eos = token_id in self.eos_token_ids and not request.params.ignore_eos
        if request.processor is not None and not is_eos:
            request.processor.accept(token_id)
            request.stopped = request.processor.finished()
        if is_eos or request.stopped or len(request.generated) >= request.params.max_new_tokens:
            request.done = True
        return request.done

    def _chunk_size(self) -> int:
        decoding = any(r.generated for r in self._live())
        if not decoding:
            return self.prefill_chunk
        if self.decode_step_ms is None or self.prefill_token_ms is None:
            return min(self.prefill_chunk, FIRST_PREFILL_CHUNK)
        budget = int(PREFILL_GAP_RATIO * self.decode_step_ms / max(self.prefill_token_ms, 1e-6))
        return min(self.prefill_chunk, max(MIN_PREFILL_CHUNK, budget))   # prefill_chunk caps: memory

    def _note_timing(self, step: PlannedStep, stage_ms: tuple[float, ...]) -> None:
        work_ms = sum(stage_ms)
        if step.prefill:
            self.prefill_token_ms = _average(self.prefill_token_ms, work_ms / step.fed)
        else:
            self.decode_step_ms = _average(self.decode_step_ms, work_ms)

    # ----------------------------------------------------------------- slots
    def _admit(self) -> None:
        """Free slots to waiting requests, fairly across tenants; then, while a tenant waits with
        far fewer slots than another holds, one slot taken back from that other (preemption)."""
        while True:
            while self._free_slots:
                request = self._waiting.pop(self._held())
                if request is None:
                    return
                self._start(request)
            if not self._preempt_one():
                return

    def _start(self, request: Request) -> None:
        request.slot, request.kv_len = self._take_slot(request)
        if request.kv_len:
            self._pending.reused_positions.append(request.kv_len)
        self._running.append(request)

    def _live(self) -> list[Request]:
        return [r for r in self._running if not r.done]

    def _held(self) -> dict[str, int]:
        """client_id -> KV slots its live requests hold."""
        return collections.Counter(r.tenant.client_id for r in self._live())

    def _preempt_one(self) -> bool:
        """Preempt the cheapest request (fewest positions in its KV, not in flight first) of the
        tenant holding the most slots, when a waiting tenant holds at least two fewer; one at a
        time. True when its slot is free now (else when its step in flight returns)."""
        if not self._waiting or any(r.preempting for r in self._running):
            return False
        held = self._held()
        waiter = self._waiting.next_tenant(held)
        if waiter is None or not held:
            return False
        hog = max(held, key=held.get)
        if held[hog] - held.get(waiter, 0) < 2:
            return False
        victim = min((r for r in self._live() if r.tenant.client_id == hog), key=lambda r: (r.in_flight, r.kv_len))
        victim.preempting = True
        self._pending.preempted += 1
        self._settle(victim)
        return victim.slot is None

    def _settle(self, request: Request) -> None:
        """The one owner of slot lifetimes: once ``request`` has no step in flight, a done one
        gives its slot back (or leaves the queue), and a preempted one gives it back and waits at
        the head of its tenant's queue to replay its tokens. Safe to call any number of times."""
        if request.in_flight:
            return                          # settled again when its step returns
        if request.slot is None:
            if request.done and request in self._waiting:
                self._waiting.remove(request)
            return
        if request.done:
            self._release(request)
        elif request.preempting:
            request.preempting = False
            self._release(request)
            request.kv_len = 0
            self._waiting.appendleft(request)

    def _release(self, request: Request) -> None:
        """Give ``request``'s slot back (its KV stays there for its own scope), for a FREE."""
        slot, request.slot = request.slot, None
        self._running.remove(request)
        # most recently freed last
        # an adapter's keys and values differ from the base model's: the scope includes it
        self._free_slots[slot] = ((request.tenant.scope, request.params.adapter), request.tokens[:request.kv_len])
        self._pending.free_slots.append(slot)

    def _take_slot(self, request: Request) -> tuple[int, int]:
        """(slot, reusable positions): the free slot of the request's own scope whose KV shares the
        longest prefix with its tokens (at least one token is always fed), else the least recently
        freed one."""
        best_slot, best = next(iter(self._free_slots)), 0
        tokens = request.tokens
        for slot, (scope, cached) in self._free_slots.items():
            if scope != (request.tenant.scope, request.params.adapter) or request.embed:   # an embedding pools every position
                continue
            shared = _common_prefix(cached, tokens, len(tokens) - 1)
            if shared > best:
                best_slot, best = slot, shared
        del self._free_slots[best_slot]
        return best_slot, best


def _empty_slots(count: int) -> collections.OrderedDict:
    return collections.OrderedDict((slot, (None, [])) for slot in range(count))


def _average(current: float | None, sample: float) -> float:
    return sample if current is None else (1 - EMA_WEIGHT) * current + EMA_WEIGHT * sample


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y or n >= limit:
            break
        n += 1
    return n
