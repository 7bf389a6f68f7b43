"""Inside an engine: the stage worker, and the control-plane calls that load and run it.

The coordinator calls :func:`load_stage`, :func:`start_worker`, :func:`unload_stage` and
:func:`worker_status` through ipyparallel (the control plane). The stage worker owns one
:class:`~exo_lab.model.shard.Stage` and moves per-token traffic over pyzmq (the data plane): it
receives typed messages from its inbox, runs its layers, and sends to the next stage, or, on the
last stage, samples and sends the token back to the coordinator.

All of a stage's torch work (building the shard, every forward) runs on one thread of the
engine, :func:`torch_thread`. Measured with SmolLM2 on 2 cores: a decode step takes 44 ms when
only one thread ever enters OpenMP, and 105-134 ms when the engine's main thread has run torch
ops before (the load) and another thread then runs the forwards. Two OpenMP masters give
libgomp more managed threads than cores, and it then parks its workers in the kernel between
the hundreds of small parallel regions of a step instead of spinning.

The live worker is in the engine's namespace as ``exo_stage`` so ``%%px`` can reach it:
``exo_stage.stage.layers``, ``exo_stage.stage.kv`` (the KV slots), ``exo_stage.stage.device``.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, replace

from ..control_types import EngineState, EngineStatus, LoadedStage, MemoryReport, ShardSpec, StageStatus, received
from .room import MemoryRoom, memory

logger = logging.getLogger(__name__)

NAMESPACE_NAME = "exo_stage"
# What a step may need beyond the stage's own estimate (allocator slack, Python objects): a step
# runs only when its PC has its estimate plus this free, else it is refused before allocating.
STEP_MARGIN_BYTES = 32 * 2**20
VERIFY_TOKENS = 8      # the longest decode row the memory report counts (speculation's verify rows)
_worker: "StageWorker | None" = None
_torch_thread: "TorchThread | None" = None
_torch_thread_lock = threading.Lock()


class TorchThread:
    """One daemon thread that runs submitted calls in order (a stage's serving loop is one long
    call). Daemon, unlike a ThreadPoolExecutor's, so a serving loop never holds up the engine's
    exit."""

    def __init__(self):
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run, name="exo-torch", daemon=True).start()

    def submit(self, function, /, *args, **kwargs) -> Future:
        future: Future = Future()
        self._calls.put((future, function, args, kwargs))
        return future

    def _run(self) -> None:
        import torch

        while True:
            future, function, args, kwargs = self._calls.get()
            if not future.set_running_or_notify_cancel():
                continue
            # torch.set_num_threads() reaches OpenMP only on the thread that calls it (the
            # engine's main thread, where the coordinator's set_threads runs) although
            # get_num_threads() reports it everywhere: apply it on this thread too
            torch.set_num_threads(torch.get_num_threads())
            try:
                future.set_result(function(*args, **kwargs))
            except BaseException as exc:  # handed to whoever waits on the future
                future.set_exception(exc)


def torch_thread() -> TorchThread:
    """This engine's one thread for torch work (see the module's docstring for why one)."""
    global _torch_thread
    with _torch_thread_lock:
        if _torch_thread is None:
            _torch_thread = TorchThread()
        return _torch_thread


@dataclass
class WorkerStats:
    """Counters a status call reads; written by the worker thread only."""

    messages: int = 0
    tokens: int = 0
    errors: int = 0
    dropped: int = 0            # malformed messages the inbox refused
    refused: int = 0            # steps refused because the PC was short of memory
    mixed_steps: int = 0        # steps whose rows ran with different LoRA adapters (or none)
    busy_s: float = 0.0
    last_forward_ms: float = 0.0
    state: EngineState = EngineState.IDLE


class StageWorker:
    """One pipeline stage plus the thread that feeds it from the data plane."""

    def __init__(self, stage, inbox, stage_index: int, num_stages: int, room: MemoryRoom | None = None):
        self.stage = stage
        self.room = room if room is not None else MemoryRoom()   # this PC's free memory, read per step
        self.inbox = inbox
        self.stage_index = stage_index
        self.num_stages = num_stages
        self.outbox = None
        self.stats = WorkerStats()
        self.active_slots: set[int] = set()     # slots of live requests (a FREE removes one)
        self.trainer = None                     # engine.training.StageTrainer while fine-tuning
        self._stop = threading.Event()
        self._serving: Future | None = None

    @property
    def is_last(self) -> bool:
        return self.stage_index == self.num_stages - 1

    def start(self, next_address: str) -> None:
        import zmq

        from ..security import data_plane_key
        from ..wire import Outbox

        self.outbox = Outbox(zmq.Context.instance(), next_address, key=data_plane_key())
        self._serving = torch_thread().submit(self._run)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Ask the serving loop to end. The loop closes its own sockets on the way out (a zmq
        socket must not be closed under a thread still using it, e.g. blocked in a send to a
        peer that went away)."""
        self._stop.set()
        if self._serving is None:
            self._close_sockets()
            return
        try:
            self._serving.result(timeout_s)
        except Exception:   # a loop still busy past the timeout, or one that failed: logged there
            logger.warning("stage %d's serving loop did not end cleanly", self.stage_index, exc_info=True)

    def _close_sockets(self) -> None:
        self.inbox.close()
        if self.outbox is not None:
            self.outbox.close()

    def _run(self) -> None:
        """Serve the inbox. Fine-tuning messages wait while serving ones are queued: a decode
        step that arrives while training runs goes first (each kind keeps its own order)."""
        import collections

        from ..wire import TRAINING, FrameError

        held = collections.deque()           # training messages, in arrival order
        try:
            while not self._stop.is_set():
                try:
                    message = self.inbox.recv(timeout_ms=0 if held else 100)
                except FrameError as exc:  # a malformed frame is dropped and counted, never fatal
                    self.stats.dropped += 1
                    logger.warning("dropped a malformed data-plane message: %s", exc)
                    continue
                if message is None and held:
                    message = held.popleft()
                elif isinstance(message, TRAINING):
                    held.append(message)
                    continue
                if message is not None:
                    self._handle(message)
        finally:
            if self.trainer is not None:
                self.trainer.close()
            self._close_sockets()

    def _handle(self, message) -> None:
        from ..wire import TRAINING, Copy, Forward, Free, TrainLoss, msg_id

        self.stats.messages += 1
        try:
            if isinstance(message, Forward):
                self._forward(message)
                return
            if isinstance(message, TRAINING) and not isinstance(message, TrainLoss):
                self._train(message)
                return
            if isinstance(message, Free):
                self.active_slots.discard(message.slot)
            if isinstance(message, Copy):
                self.stage.copy_kv(message.src_slot, message.dst_slot, message.length)
            self._send(message)   # FREE, ERROR, PING and SHUTDOWN travel the ring on
        except Exception as exc:
            self.stats.errors += 1
            logger.exception("stage %d failed on message %d", self.stage_index, msg_id(message))
            self._send_error_for(msg_id(message), exc)
        finally:
            self.stats.state = EngineState.IDLE

    def _forward(self, message) -> None:
        from ..wire import Forward, Sampled

        self.stats.state = EngineState.GENERATING
        slots = [row.slot for row in message.rows]
        self.active_slots.update(slots)
        started = time.perf_counter()
        embeds = self.is_last and any(row.embed for row in message.rows)
        verifies = self.is_last and any(row.verify for row in message.rows)
        keep = message.tensor.shape[1] if verifies else 1
        if self._refused(message, keep):
            return
        adapters = [row.adapter for row in message.rows] if any(row.adapter for row in message.rows) else None
        if adapters is not None and len(set(adapters)) > 1:
            self.stats.mixed_steps += 1
        output = self.stage.forward(message.tensor, slots, [row.position for row in message.rows], hidden=embeds,
                                    keep=keep, adapters=adapters)
        elapsed_ms = (time.perf_counter() - started) * 1e3
        self.stats.busy_s += elapsed_ms / 1e3
        self.stats.last_forward_ms = elapsed_ms
        stage_ms = (*message.stage_ms, round(elapsed_ms, 3))
        if not self.is_last:
            self._send(Forward(message.step_id, message.rows, output, stage_ms))
            return
        vectors = None
        if embeds:   # output: final-norm hidden states (B, T, hidden)
            vectors = pool_rows(output, message.rows)
            output = self.stage.head(output[:, -1, :]) if any(row.sample for row in message.rows) else None
        rows, verified = message.rows, ()
        if verifies:       # output: (B, T, vocab); verify rows are sampled there, once
            verified = verify_rows(output, rows)
            output = output[:, -1, :]
            rows = tuple(replace(row, sample=False) if row.verify else row for row in rows)
        token_ids, logprobs = sample_rows(output, rows, message.tensor.shape[1])
        if verified:
            token_ids = tuple(samples[0] if samples else token for samples, token in zip(verified, token_ids))
        self.stats.tokens += sum(row.sample for row in rows) + sum(map(len, verified))
        self._send(Sampled(message.step_id, token_ids, stage_ms, logprobs, vectors, verified))

    def _train(self, message) -> None:
        """A fine-tuning message (engine.training): this stage's part, then what it sends on."""
        from ..errors import ClusterError

        trainer = self.trainer
        if trainer is None:
            raise ClusterError("this stage is not training (the job was stopped, or the stage reloaded)")
        self.stats.state = EngineState.GENERATING
        started = time.perf_counter()
        out = trainer.handle(message)
        self.stats.busy_s += time.perf_counter() - started
        for where, reply in out:
            if where == "up":
                trainer.upstream.send(reply)
            else:
                self._send(reply)

    def _refused(self, message, keep: int) -> bool:
        """Refuse the step, before allocating anything, when this PC has less free memory than
        the step needs (plus STEP_MARGIN_BYTES): a SHORT goes to the coordinator, which sheds KV
        slots and replays the rows. An engine past its PC's memory is killed by the OS."""
        from ..wire import Short

        rows, tokens = message.tensor.shape[0], message.tensor.shape[1]
        length = max(row.position for row in message.rows) + tokens
        need = self.stage.step_bytes(rows, tokens, length, keep) + STEP_MARGIN_BYTES
        free = self.room.free_bytes(enough=need)
        if free >= need:
            return False
        self.stats.refused += 1
        logger.warning("stage %d refused step %d: %d MiB free on this PC, the step needs %d MiB",
                       self.stage_index, message.step_id, free >> 20, need >> 20)
        self._send(Short(message.step_id, self.stage_index, free, need))
        return True

    def memory_report(self, chunks: tuple[int, ...], up_to: int = 1) -> MemoryReport:
        """This stage's memory now (MemoryReport): what the coordinator's memory watch decides
        by; steps counted for 1 to max(its slots, ``up_to``) rows, and prefill ``chunks``."""
        stage = self.stage
        slots = stage.spec.max_batch
        rows = max(slots, up_to)
        context = stage.max_context
        decode = tuple(STEP_MARGIN_BYTES + stage.step_bytes(s, VERIFY_TOKENS, context, VERIFY_TOKENS)
                       for s in range(1, rows + 1))
        # a chunk's tokens in one row (a prompt), or spread over several (embeddings)
        prefill = tuple(STEP_MARGIN_BYTES + max(stage.step_bytes(r, max(1, min(chunk, context) // r), context)
                                                for r in range(1, min(rows, chunk) + 1))
                        for chunk in chunks)
        return MemoryReport(free_bytes=self.room.free_bytes(), limit_bytes=self.room.limit_bytes() or 0,
                            slots=slots, kv_slot_bytes=stage.kv_cache_bytes() // slots, decode_bytes=decode,
                            prefill_chunks=tuple(chunks), prefill_bytes=prefill)

    def _send(self, message) -> None:
        self.outbox.send(message)

    def _send_error_for(self, step_id: int, exc: BaseException) -> None:
        from ..errors import ExoLabError
        from ..wire import Error

        # A user's error (a bad position, a too-long sequence) says what it is; anything else
        # is an internal fault whose details stay in this engine's log, not in an API answer.
        what = str(exc) if isinstance(exc, ExoLabError) else f"an internal error ({type(exc).__name__})"
        try:
            self._send(Error(step_id, f"stage {self.stage_index} failed: {what}"))
        except Exception:  # the next stage is gone too: the coordinator's liveness check reports it
            logger.exception("could not pass an error on from stage %d", self.stage_index)

    def status(self) -> StageStatus:
        stats, spec = self.stats, self.stage.spec
        return StageStatus(
            stage_index=self.stage_index, start_layer=spec.start_layer, stop_layer=spec.stop_layer,
            dtype=spec.dtype, device=str(self.stage.device), state=stats.state, messages=stats.messages,
            tokens=stats.tokens, errors=stats.errors, dropped_messages=stats.dropped, busy_s=stats.busy_s,
            last_forward_ms=stats.last_forward_ms, active_requests=len(self.active_slots),
            kv_slots=spec.max_batch, kv_cache_bytes=self.stage.kv_cache_bytes(),
            parameter_bytes=self.stage.parameter_bytes(), refused_steps=stats.refused)


def sample_rows(logits, rows, steps: int) -> tuple[tuple[int, ...], tuple]:
    """(a token per row, a TokenLogprob or None per row, or () when no row asked) from the last
    stage's logits (B, vocab): each row's rule applied (bias, then its allowed mask), then sampled
    at the sequence position right after this step's ``steps`` inputs; NO_TOKEN for a row that
    does not sample. Raises RequestError naming the row whose rule allows no token."""
    from ..errors import RequestError
    from ..sampling import sample_row
    from ..wire import NO_TOKEN

    if all(row.sample and row.sampling.greedy and row.rule is None and row.logprobs < 0 for row in rows):
        return tuple(int(t) for t in logits.argmax(dim=-1)), ()   # the common case, vectorised
    tokens, logprobs = [], []
    for b, row in enumerate(rows):
        if not row.sample:
            tokens.append(NO_TOKEN)
            logprobs.append(None)
            continue
        try:
            token_id, logprob = sample_row(logits[b], row.sampling, row.position + steps, row.rule, row.logprobs)
        except RequestError as exc:
            raise RequestError(f"row {b} (slot {row.slot}): {exc}", param=exc.param) from None
        tokens.append(token_id)
        logprobs.append(logprob)
    return tuple(tokens), (tuple(logprobs) if any(lp is not None for lp in logprobs) else ())


def verify_rows(logits, rows) -> tuple[tuple[int, ...], ...]:
    """Per verify row the token sampled at each of its T positions (logits (B, T, vocab)), each
    exactly as a plain decode step with that position last would sample it (same settings, seed
    and position); () for the other rows."""
    from ..errors import RequestError
    from ..sampling import sample_token
    from ..wire.frames import MAX_VERIFIED

    steps = logits.shape[1]
    if steps > MAX_VERIFIED:
        raise RequestError(f"a verify row of {steps} positions is over {MAX_VERIFIED}")
    out = []
    for b, row in enumerate(rows):
        if not row.verify:
            out.append(())
        elif row.sampling.greedy:
            out.append(tuple(int(t) for t in logits[b].argmax(dim=-1)))
        else:
            out.append(tuple(sample_token(logits[b, i].float().cpu(), row.sampling, row.position + i + 1)
                             for i in range(steps)))
    return tuple(out)


def pool_rows(hidden, rows):
    """float32 (B, hidden) from final-norm hidden states (B, T, hidden): the last position of
    rows embedding with last-token pooling (1), the sum over the chunk's positions for mean
    pooling (2: the coordinator adds the chunks and divides), zeros for other rows."""
    import torch

    vectors = torch.zeros(hidden.shape[0], hidden.shape[2], dtype=torch.float32)
    for b, row in enumerate(rows):
        if row.embed == 1:
            vectors[b] = hidden[b, -1].float().cpu()
        elif row.embed == 2:
            vectors[b] = hidden[b].float().sum(dim=0).cpu()
    return vectors


# ----------------------------------------------------------------------------- control plane

def _publish(namespace_value) -> None:
    """Put the worker in the engine's user namespace (for %%px) when running in an engine."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is not None:
        shell.user_ns[NAMESPACE_NAME] = namespace_value


def load_stage(spec: ShardSpec, stage_index: int, num_stages: int, bind_host: str,
               advertise_host: str, ports: tuple[int, ...] | None = None) -> LoadedStage:
    """Load this engine's shard and bind its data-plane inbox. ``spec.model_dir`` is the model
    as the coordinator names it; this engine resolves it to its own folder. Returns the inbox
    address and what the load cost. Raises ModelError for anything but a ShardSpec."""
    import zmq

    from ..weights.checkpoint import load_stage as build_stage
    from ..security import data_plane_key
    from ..wire import Inbox
    from .fetch import open_model

    spec = received(spec, ShardSpec, "the coordinator")
    # a PC without the model fetches exactly this stage's tensors from the storage PC
    model_dir, ensure_tensors = open_model(spec.model_dir)
    spec = replace(spec, model_dir=str(model_dir))
    # the same layers again (a re-plan that left this stage as it was): keep the weights; the
    # requests replayed after a failover write their KV slots afresh from position 0
    # (shedding KV slots, or giving them back, reloads with the same layers and another max_batch:
    # the weights stay and only the KV cache is allocated again)
    previous = current_worker()
    kept = previous.stage if previous is not None and previous.stage.spec.same_layers(spec) else None
    unload_stage()
    started = time.perf_counter()
    if kept is not None and kept.spec.max_batch != spec.max_batch:
        torch_thread().submit(kept.resize_slots, spec.max_batch).result()
    stage = kept if kept is not None else torch_thread().submit(
        build_stage, spec, ensure_tensors=ensure_tensors).result()
    inbox = Inbox(zmq.Context.instance(), host=bind_host, port=ports or 0, advertise_host=advertise_host,
                  key=data_plane_key())
    global _worker
    _worker = StageWorker(stage, inbox, stage_index, num_stages)
    _publish(_worker)
    return LoadedStage(address=inbox.address, load_s=time.perf_counter() - started, reused=kept is not None,
                       parameter_bytes=stage.parameter_bytes(), **memory())


def start_worker(next_address: str) -> bool:
    """Connect this stage to the next one (or the coordinator) and start serving."""
    if _worker is None:
        raise RuntimeError("no stage is loaded on this engine; call load_stage first")
    _worker.start(next_address)
    return True


def unload_stage() -> bool:
    """Stop the worker and drop the shard (idempotent)."""
    global _worker
    if _worker is None:
        return False
    _worker.stop()
    _worker = None
    _publish(None)
    import gc

    from ..model.shard import release_free_memory

    gc.collect()
    release_free_memory()       # the PC gets the stage's memory back now, not at the next load
    return True


def current_worker() -> "StageWorker | None":
    """This engine's live stage worker (the same object as ``exo_stage`` in %%px), or None."""
    return _worker


def memory_report(chunks: tuple[int, ...], up_to: int = 1) -> MemoryReport:
    """This engine's stage's MemoryReport (the coordinator's memory watch). Raises ClusterError
    when no stage is loaded."""
    from ..errors import ClusterError

    if _worker is None:
        raise ClusterError("no stage is loaded on this engine")
    return _worker.memory_report(tuple(chunks), up_to)


def worker_status() -> EngineStatus:
    """This engine's memory, and its stage's status when one is loaded."""
    return EngineStatus(**memory(), stage=_worker.status() if _worker is not None else None)
