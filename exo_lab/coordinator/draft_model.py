"""A draft model for speculative decoding: a whole small model on the coordinator that guesses
the next tokens greedily, for the pipeline to check in one trip (``speculation: draft_model``).

What drafts (the ``draft_model`` setting): a smaller model with the served model's tokenizer, or
the served model itself at fewer bits (the default: the served model at ``draft_dtype`` int8,
whose greedy choice agrees with float32 SmolLM2's at 94-98% of positions on open chat). It runs
as one :class:`~exo_lab.model.shard.Stage` holding every layer, built by the same loader as a
pipeline stage, with KV slots of its own.

How a draft is made (:meth:`DraftModel.draft`, on one thread of the draft model's own, with
torch threads for that thread only: the coordinator PC's cores less those its own CPU stages
use, so drafting ahead while the stages compute takes no core from them; :class:`Drafting`
says when it drafts):

- **Its own KV per request.** Each request drafting now holds one of :data:`DRAFT_SLOTS` slots
  (least recently used given up first). A slot remembers the tokens whose keys and values it
  holds; a call feeds only what the request wrote since (the sample the pipeline returned, or the
  whole prompt the first time) after the longest prefix both share, so drafts the pipeline
  rejected are simply overwritten. Slots are never shared between requests: another client's
  cached prompt would show in the time a draft takes.
- **Greedy, and only while sure.** Each draft token is the draft model's most likely one; it
  stops early when that token's probability falls below :data:`DRAFT_CONFIDENCE`
  (transformers' assisted generation stops its assistant the same way, at 0.4). SmolLM2's int8
  copy agrees with the float32 model's greedy choice even where unsure: on three open chat
  prompts, one run each, 0.4 ran at 0.92-1.26x plain decoding (before drafting ahead), 0.1 at
  1.48-1.78x, 0.0 at 1.58-1.84x. 0.1 keeps most of that and spares the sampled requests, whose
  samples rarely equal an unsure draft. The drafter is deterministic, so checking drafts against the
  target's samples is exact (module docstring of :mod:`exo_lab.coordinator.schedule`).
- **Within the served vocabulary.** A draft model's head may be padded past the tokenizer; a
  token the served model cannot embed is never proposed.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from ..control_types import ShardSpec
from ..engine.probe import usable_cores
from ..errors import ModelError
from ..weights.checkpoint import load_stage
from ..weights.resolve import read_model_config, resolve_model
from .schedule import DraftAsk

logger = logging.getLogger(__name__)

MAX_DRAFT_THREADS = 8      # torch threads the draft model computes on, at most
# A draft model further behind a request than this many tokens (a prompt it has not read) takes
# them in on its thread while the request decodes plainly: the runner never waits for a prefill
# of the draft model (SmolLM2 int8 on 1 thread: about 4 ms a token).
CATCH_UP_TOKENS = 16
DRAFT_SLOTS = 3            # requests whose draft KV is kept (speculation runs for at most 2 at once)
DRAFT_CONFIDENCE = 0.1      # stop drafting when the draft's own probability of its token falls below
PREFILL_CHUNK = 512         # tokens fed per forward when a slot catches up with a prompt


@dataclass
class _Slot:
    index: int
    tokens: list[int] = field(default_factory=list)   # what the slot's KV holds, in order


class DraftModel:
    """A model that drafts tokens for speculative decoding (module docstring). Build it with
    :meth:`load`; call :meth:`draft` from one thread at a time."""

    def __init__(self, stage, *, model_id: str, dtype: str, vocab_limit: int, threads: int = 1):
        self.stage = stage
        self.model_id = model_id
        self.dtype = dtype
        self.vocab_limit = vocab_limit
        self.threads = threads
        self.seconds = 0.0                  # spent drafting, in all
        self._slots: collections.OrderedDict[int, _Slot] = collections.OrderedDict()   # request id -> slot, LRU first
        self._free = list(range(stage.spec.max_batch))
        self._thread = concurrent.futures.ThreadPoolExecutor(1, "exo-lab-draft", initializer=_use_threads,
                                                             initargs=(threads,))

    @classmethod
    def load(cls, model_id: str, *, dtype: str, context_length: int, tokenizer, served_dir,
             busy_threads: int = 0) -> "DraftModel":
        """The draft model ``model_id`` at ``dtype`` for a served model whose tokenizer is
        ``tokenizer`` (loaded from ``served_dir``), with KV slots of ``context_length`` positions,
        computing on this PC's cores less ``busy_threads`` (those of the stages it runs too:
        drafting ahead runs while they compute; at least 1, at most MAX_DRAFT_THREADS).

        Raises:
            ModelError: the model cannot be found or read, or its vocabulary is not the served one.
        """
        started = time.perf_counter()
        try:
            folder = resolve_model(model_id)
            config = read_model_config(folder)
            if folder.resolve() != Path(served_dir).resolve():
                _check_same_vocabulary(model_id, folder, tokenizer)
            layers = config["num_hidden_layers"]
            spec = ShardSpec(model_dir=str(folder), start_layer=0, stop_layer=layers, num_layers=layers,
                             dtype=dtype, device="cpu", max_context=context_length, max_batch=DRAFT_SLOTS)
            stage = load_stage(spec)
        except ModelError as exc:
            raise ModelError(f"the draft model (speculation 'draft_model'): {exc}") from exc
        logger.info("draft model %s (%s) loaded on the coordinator in %.1f s: %.0f MB of weights, %.0f MB of KV",
                    model_id, dtype, time.perf_counter() - started, stage.parameter_bytes() / 1e6,
                    stage.kv_cache_bytes() / 1e6)
        threads = max(1, min(MAX_DRAFT_THREADS, usable_cores() - busy_threads))
        return cls(stage, model_id=model_id, dtype=dtype, vocab_limit=len(tokenizer), threads=threads)

    def behind(self, ask: DraftAsk) -> int:
        """Tokens of ``ask`` its request's slot does not hold yet (read from another thread
        while drafting goes on: an estimate, for deciding whether to wait for the drafts)."""
        slot = self._slots.get(ask.request_id)
        return len(ask.tokens) - (_shared_prefix(list(slot.tokens), list(ask.tokens)) if slot is not None else 0)

    def submit(self, asks: tuple[DraftAsk, ...], stop: threading.Event | None = None) -> concurrent.futures.Future:
        """:meth:`draft` on the draft model's own thread: a future of its result."""
        return self._thread.submit(self.draft, asks, stop)

    def close(self) -> None:
        """No more drafts (one under way finishes on its thread)."""
        self._thread.shutdown(wait=False)

    def draft(self, asks: tuple[DraftAsk, ...], stop: threading.Event | None = None) -> list[list[int]]:
        """Up to ``k`` greedy draft tokens to follow the ``tokens`` of each ask, in order; once
        ``stop`` is set, no further token is drafted (what was drafted is returned). An ask
        with ``k`` 0 only feeds its tokens (catching up with a prompt)."""
        started = time.perf_counter()
        try:
            return [self._draft_one(ask, stop) for ask in asks]
        finally:
            self.seconds += time.perf_counter() - started

    # ------------------------------------------------------------------ internals
    def _draft_one(self, ask: DraftAsk, stop: threading.Event | None) -> list[int]:
        slot = self._slot_for(ask.request_id)
        tokens = list(ask.tokens)
        kept = _shared_prefix(slot.tokens, tokens)
        kept = min(kept, len(tokens) - 1)          # feed at least the last token: its logits are the next
        logits = None
        for start in range(kept, len(tokens), PREFILL_CHUNK):
            piece = tokens[start:start + PREFILL_CHUNK]
            logits = self._forward(slot, piece, start)
        slot.tokens = tokens
        drafts: list[int] = []
        while ask.k > 0:
            probabilities = torch.softmax(logits[: self.vocab_limit], dim=-1)
            confidence, token = torch.max(probabilities, dim=-1)
            if float(confidence) < DRAFT_CONFIDENCE:
                break
            drafts.append(int(token))
            if len(drafts) == ask.k or (stop is not None and stop.is_set()):
                break
            logits = self._forward(slot, [drafts[-1]], len(slot.tokens))
            slot.tokens.append(drafts[-1])
        return drafts

    def _forward(self, slot: _Slot, tokens: list[int], position: int) -> torch.Tensor:
        """Feed ``tokens`` at ``position`` into ``slot``: the float32 logits after the last one."""
        inputs = torch.tensor([tokens], dtype=torch.int64)
        return self.stage(inputs, [slot.index], [position])[0]

    def _slot_for(self, request_id: int) -> _Slot:
        slot = self._slots.pop(request_id, None)
        if slot is None:
            if not self._free:
                _, oldest = self._slots.popitem(last=False)
                self._free.append(oldest.index)
            slot = _Slot(self._free.pop())
        self._slots[request_id] = slot           # the most recently used, last
        return slot


class Drafting:
    """The draft model beside the scheduling core, for the runner (:mod:`.scheduler`), which
    calls :meth:`before_plan` before each plan, :meth:`launched` after sending each step and
    :meth:`landed` when one comes back.

    - Before a plan: offer the core what was drafted ahead of the steps that came back, then
      fresh drafts for the requests still without (:meth:`SchedulingCore.draft_asks`), made on
      the draft model's thread while the loop awaits them.
    - Drafting ahead: as soon as a verify step is sent, the draft model goes on past its guesses
      (:meth:`SchedulingCore.ahead_asks`) until the step comes back; for a prefill chunk it takes
      in the chunk's tokens meanwhile.
    - Never waiting on a prefill: a request the draft model is more than CATCH_UP_TOKENS behind
      decodes plainly while the draft model catches up, and so does every request while a catch-up
      runs.
    - A failure of the draft model costs its drafts only (the tokens are the same without them),
      logged once per 1,000.
    """

    def __init__(self, model: DraftModel, core):
        self.model = model
        self.core = core
        self.errors = 0
        self._ahead: dict[int, _Ahead] = {}     # step id -> the drafting ahead of it while in flight
        self._landed: list[_Ahead] = []         # stopped: their step came back, their drafts to offer
        self._catching_up: dict[int, concurrent.futures.Future] = {}   # request id -> its catch-up

    async def before_plan(self) -> None:
        landed, self._landed = self._landed, []
        for ahead in landed:
            if ahead.future.cancel():           # still queued behind a catch-up: not worth waiting for
                continue
            self.core.offer_drafts(zip(ahead.asks, await self._result(ahead.future, len(ahead.asks))))
        self._catching_up = {rid: future for rid, future in self._catching_up.items() if not future.done()}
        now, later = [], []
        for ask in self.core.draft_asks():
            far = bool(self._catching_up) or self.model.behind(ask) > CATCH_UP_TOKENS
            (later if far else now).append(ask)
        self._catch_up(later)
        self.core.offer_drafts((ask, ()) for ask in later)
        if now:
            self.core.offer_drafts(zip(now, await self._result(self.model.submit(tuple(now)), len(now))))

    def launched(self, step) -> None:
        asks = self.core.ahead_asks(step)
        self._catch_up([ask for ask in asks if ask.k == 0])
        asks = tuple(ask for ask in asks if ask.k > 0)
        if asks:
            stop = threading.Event()
            self._ahead[step.step_id] = _Ahead(asks, stop, self.model.submit(asks, stop))

    def landed(self, step_id: int) -> None:
        ahead = self._ahead.pop(step_id, None)
        if ahead is not None:
            ahead.stop.set()
            self._landed.append(ahead)

    def stop(self) -> None:
        """Forget every drafting under way (the pipeline was lost: its steps will not come back)."""
        for ahead in self._ahead.values():
            ahead.stop.set()
        self._ahead.clear()
        self._landed.clear()
        self._catching_up.clear()

    def close(self) -> None:
        self.stop()
        self.model.close()

    def _catch_up(self, asks) -> None:
        for ask in asks:
            if ask.request_id not in self._catching_up:
                self._catching_up[ask.request_id] = self.model.submit((DraftAsk(ask.request_id, ask.tokens, 0),))

    async def _result(self, future: concurrent.futures.Future, count: int) -> list[list[int]]:
        try:
            return await asyncio.wrap_future(future)
        except Exception:
            self.errors += 1
            if self.errors == 1 or self.errors % 1000 == 0:
                logger.exception("the draft model failed (%d time(s)); decoding without its drafts", self.errors)
            return [[] for _ in range(count)]


class _Ahead(NamedTuple):
    asks: tuple[DraftAsk, ...]
    stop: threading.Event
    future: concurrent.futures.Future


def _use_threads(count: int) -> None:
    """First thing on the draft thread: torch computes on ``count`` threads there, and only there.
    torch's count is per thread, but ``set_num_threads`` also sets the count that threads made
    later start with; a throwaway thread puts that back."""
    before = torch.get_num_threads()        # this thread takes its count now (torch sets it lazily)
    torch.set_num_threads(count)
    restore = threading.Thread(target=torch.set_num_threads, args=(before,))
    restore.start()
    restore.join()


def _shared_prefix(a: list[int], b: list[int]) -> int:
    """How many first tokens ``a`` and ``b`` share (list comparisons run in C: a binary search)."""
    low, high = 0, min(len(a), len(b))
    if a[:high] == b[:high]:
        return high
    while low < high:                       # a[:low] == b[:low], a[:high] != b[:high]
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


def _check_same_vocabulary(model_id: str, folder, tokenizer) -> None:
    from transformers import AutoTokenizer

    try:
        own = AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:
        raise ModelError(f"cannot load the draft model {model_id!r}'s tokenizer from {folder}: {exc}; a draft "
                         f"model needs the served model's tokenizer files") from exc
    if own.get_vocab() != tokenizer.get_vocab():
        raise ModelError(f"the draft model {model_id!r} has a different vocabulary from the served model "
                         f"({len(own)} tokens against {len(tokenizer)}); a draft model must share the served "
                         f"model's tokenizer: pick a smaller model of the same family, or leave draft_model "
                         f"unset to draft with the served model itself at draft_dtype")
