"""Inside an engine: fine-tuning a stage's LoRA adapter through the pipeline.

The coordinator (``coordinator.finetune``) sends each micro-batch down the ring as a
:class:`~exo_lab.wire.TrainForward`; every stage runs its layers with autograd and passes its
output on, keeping what its backward pass needs; the last stage computes the loss on the
micro-batch's targets, runs backward at once, sends the loss to the coordinator
(:class:`~exo_lab.wire.TrainLoss`) and the gradient of its input upstream
(:class:`~exo_lab.wire.TrainBackward`, to the previous stage's inbox); each stage in turn runs
its backward and passes the gradient on up. Adapter gradients add up over a batch's
micro-batches. The coordinator closes the batch with a :class:`~exo_lab.wire.TrainStep` around
the ring: phase 0 sums the gradients' squared norms (the first stage holds it until all its
backward passes are done, and every later stage finished its own before that), phase 1 scales
them (gradient clipping) and steps each stage's AdamW.

Training messages share the stage's inbox and thread with inference, in arrival order: the
coordinator keeps at most one micro-batch per stage in flight, so serving steps interleave with
training ones (docs/training.md measures it). Control-plane calls here (:func:`start_training`,
:func:`training_state`, :func:`stop_training`, :func:`add_adapter`, :func:`drop_adapter`) run on
the engine's main thread between batches: the coordinator calls them only when no training
message is in flight.
"""
from __future__ import annotations

import logging
from dataclasses import replace

import torch
import torch.nn.functional as F

from ..control_types import LoraSettings, TrainSetup, received
from ..errors import ClusterError, ModelError
from ..model import lora
from .room import MemoryRoom

logger = logging.getLogger(__name__)

IGNORE = -100        # a target position without loss (prompt tokens, padding)
TRAINING_SLACK_BYTES = 32 * 2**20    # allocator slack beyond training_bytes' tensors


class StageTrainer:
    """One stage's side of a fine-tuning job: its adapter, optimizer and saved activations."""

    def __init__(self, worker, setup: TrainSetup, state: dict | None = None):
        import zmq

        from ..security import data_plane_key
        from ..wire import Outbox

        self.stage = stage = worker.stage
        self.setup = setup
        self.context = lora.wrap(stage)
        if state is not None:
            self.params = lora.set_adapter(stage, setup.adapter, setup.lora, state["tensors"], trainable=True)
        else:
            self.params = lora.init_adapter(stage, setup.adapter, setup.lora, setup.seed)
        self.keys = lora.adapter_keys(stage, setup.lora)      # peft names, in the params' order
        self.optimizer = torch.optim.AdamW(self.params, lr=0.0, betas=tuple(setup.betas), eps=setup.eps,
                                           weight_decay=setup.weight_decay)
        if state is not None and state.get("optimizer"):
            self._load_optimizer(state["optimizer"])
        self.steps = int(state.get("steps", 0)) if state else 0
        self.saved: dict[tuple[int, int], tuple] = {}     # (batch, micro) -> (input, output or None)
        self.backward_done: dict[int, int] = {}
        self.pending: list = []                           # phase-0 steps waiting for backward passes
        self.upstream = Outbox(zmq.Context.instance(), setup.upstream, key=data_plane_key()) \
            if setup.upstream else None

    @property
    def is_first(self) -> bool:
        return self.stage.spec.is_first

    @property
    def is_last(self) -> bool:
        return self.stage.spec.is_last

    def close(self) -> None:
        if self.upstream is not None:
            self.upstream.close()
        self.saved.clear()
        self.context.train = None

    # ------------------------------------------------------------------ messages
    def handle(self, message) -> list[tuple[str, object]]:
        """("down" | "up", message) pairs to send for a training message."""
        from ..wire import TrainBackward, TrainForward, TrainStep

        if isinstance(message, (TrainForward, TrainBackward)) and message.batch_id < self.setup.floor:
            logger.info("dropped a training message of an earlier attempt (batch %d)", message.batch_id)
            return []
        if isinstance(message, TrainForward):
            return self._forward(message)
        if isinstance(message, TrainBackward):
            return self._backward(message)
        if isinstance(message, TrainStep):
            return self._step(message)
        return [("down", message)]

    def _run(self, inputs, batch: int, micro: int):
        """This stage's training forward of one micro-batch (dropout drawn per (batch, micro))."""
        context = self.context
        context.train, context.dropout = self.setup.adapter, self.setup.lora.dropout
        context.generator = lora.dropout_generator(self.setup.seed, batch, micro, self.stage.spec.start_layer) \
            if self.setup.lora.dropout else None
        try:
            return self.stage.train_forward(inputs)
        finally:
            context.train, context.generator = None, None

    def _input(self, tensor):
        if self.is_first:
            return tensor.to(self.stage.device).long()
        return tensor.to(self.stage.device, self.stage.dtype).detach().requires_grad_(True)

    def _forward(self, message) -> list:
        from ..wire import TrainBackward, TrainForward, TrainLoss

        key = (message.batch_id, message.micro)
        inputs = self._input(message.tensor)
        if self.is_last:
            logits = self._run(inputs, *key)
            targets = message.targets.to(logits.device).long()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE,
                                   reduction="sum") * message.scale
            loss.backward()
            out = [("down", TrainLoss(message.batch_id, message.micro, float(loss.detach()),
                                      int((targets != IGNORE).sum())))]
            if not self.is_first:
                out.append(("up", TrainBackward(message.batch_id, message.micro, inputs.grad)))
            self._backward_done(message.batch_id)
            return out + self._release_steps()
        if self.setup.recompute:
            with torch.no_grad():
                output = self._run(inputs, *key)
            self.saved[key] = (inputs, None)
        else:
            output = self._run(inputs, *key)
            self.saved[key] = (inputs, output)
        return [("down", TrainForward(message.batch_id, message.micro, output.detach(), message.targets,
                                      message.scale))]

    def _backward(self, message) -> list:
        from ..wire import TrainBackward

        key = (message.batch_id, message.micro)
        if key not in self.saved:
            raise ClusterError(f"a gradient for micro-batch {message.micro} of batch {message.batch_id} "
                               "arrived without its forward on this stage")
        inputs, output = self.saved.pop(key)
        if output is None:                       # recomputation: the forward again, with autograd
            output = self._run(inputs, *key)
        output.backward(message.tensor.to(output.device, output.dtype))
        out = []
        if not self.is_first:
            out.append(("up", TrainBackward(message.batch_id, message.micro, inputs.grad)))
        self._backward_done(message.batch_id)
        return out + self._release_steps()

    def _backward_done(self, batch: int) -> None:
        self.backward_done[batch] = self.backward_done.get(batch, 0) + 1

    def _release_steps(self) -> list:
        ready = [m for m in self.pending if self.backward_done.get(m.batch_id, 0) >= m.micros]
        self.pending = [m for m in self.pending if m not in ready]
        return [out for message in ready for out in self._step(message)]

    def _step(self, message) -> list:
        if message.phase == 0:
            if self.is_first and self.backward_done.get(message.batch_id, 0) < message.micros:
                self.pending.append(message)
                return []
            norm_sq = sum(float(p.grad.double().pow(2).sum()) for p in self.params if p.grad is not None)
            return [("down", replace(message, value=message.value + norm_sq))]
        coef = message.value
        for p in self.params:
            if p.grad is not None and coef != 1.0:
                p.grad.mul_(coef)
        for group in self.optimizer.param_groups:
            group["lr"] = message.lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.backward_done.pop(message.batch_id, None)
        self.saved = {k: v for k, v in self.saved.items() if k[0] != message.batch_id}
        self.steps += 1
        return [("down", message)]

    # ------------------------------------------------------------------ state
    def state(self) -> dict:
        """The adapter (peft names), AdamW's moments by the same names, and the step count."""
        optimizer = {}
        for key, p in zip(self.keys, self.params):
            entry = self.optimizer.state.get(p)
            if entry:
                optimizer[key] = {"step": float(entry["step"]), "exp_avg": entry["exp_avg"].clone(),
                                  "exp_avg_sq": entry["exp_avg_sq"].clone()}
        return {"tensors": lora.adapter_tensors(self.stage, self.setup.adapter, self.setup.lora),
                "optimizer": optimizer, "steps": self.steps}

    def _load_optimizer(self, moments: dict) -> None:
        for key, p in zip(self.keys, self.params):
            entry = moments.get(key)
            if entry is None:
                raise ModelError(f"the checkpoint's optimizer state has no {key}")
            self.optimizer.state[p] = {"step": torch.tensor(float(entry["step"])),
                                       "exp_avg": entry["exp_avg"].to(p.dtype).clone(),
                                       "exp_avg_sq": entry["exp_avg_sq"].to(p.dtype).clone()}


def training_bytes(stage, rows: int, length: int, in_flight: int, recompute: bool, settings: LoraSettings) -> int:
    """An upper bound on what training adds to ``stage`` (:func:`estimate_training_bytes` with the
    stage's own config, layers and step workspace)."""
    return estimate_training_bytes(stage.stage_config.to_dict(), len(stage.layers), stage.spec.is_last, settings,
                                   rows, length, in_flight, recompute, stage.step_bytes(rows, length, length))


def estimate_training_bytes(config: dict, layers: int, is_last: bool, settings: LoraSettings, rows: int,
                            length: int, in_flight: int, recompute: bool, workspace: int) -> int:
    """An upper bound on what training adds to a stage of ``layers`` layers of a model with
    ``config`` (config.json's fields): the adapter, its gradient and AdamW's two moments (float32),
    the activations autograd keeps for ``in_flight`` micro-batches of ``rows`` x ``length``
    tokens (with recomputation, only their inputs, plus one micro-batch's activations while it is
    recomputed), one forward's ``workspace`` and allocator slack. Pure: the engine checks it
    against its PC's free memory, the coordinator against what the plan left on each stage."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    shapes = {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv_heads * head_dim),
              "v_proj": (hidden, kv_heads * head_dim), "o_proj": (heads * head_dim, hidden),
              "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    adapter = layers * sum(settings.r * (i + o) for name, (i, o) in shapes.items() if name in settings.targets)
    # per token per layer autograd keeps the norms' inputs and outputs, q/k/v, the rotated q/k,
    # the attention output, the MLP's gate/up/activation products and the adapters' inputs, and
    # SDPA's probabilities per head; the allocator's free blocks come on top: micro-batches of
    # different widths fragment the heap. Calibrated on SmolLM2 in a running job
    # (benchmarks/bench_finetune.py: first stage 501 MiB at peak against 418 MiB for 20h + 8i per
    # token) and bounded in tests/test_finetune.py against a fresh process's peak.
    per_token = (28 * hidden + 12 * inter) * 4
    per_micro = layers * rows * length * (per_token + 2 * heads * length * 4)
    if is_last:
        per_micro += 5 * rows * length * config["vocab_size"] * 4        # logits, softmax, their gradients
    inputs = rows * length * hidden * 4
    kept = in_flight * inputs + per_micro if recompute else in_flight * per_micro
    return 16 * adapter + kept + workspace + TRAINING_SLACK_BYTES


# ----------------------------------------------------------------------------- control plane

def _worker():
    from .worker import current_worker

    worker = current_worker()
    if worker is None:
        raise ClusterError("no stage is loaded on this engine")
    return worker


def start_training(setup: TrainSetup, state: dict | None = None, rows: int = 1, length: int = 512,
                   in_flight: int = 1, recompute_choice: bool | None = None) -> dict:
    """Give this engine's stage the adapter to train (fresh, or from a checkpoint's ``state``)
    and an optimizer. Recomputes activations where keeping them would not fit this PC's free
    memory (``recompute_choice`` None; False: never, True or setup.recompute: always). Returns {"recompute": bool, "need_bytes", "free_bytes"}. Raises ModelError with the
    numbers when even recomputation does not fit."""
    setup = received(setup, TrainSetup, "the coordinator")
    worker = _worker()
    stop_training()
    stage = worker.stage
    lora.wrapped(stage, setup.lora)
    free = MemoryRoom().free_bytes()
    need = training_bytes(stage, rows, length, in_flight, False, setup.lora)
    lean = training_bytes(stage, rows, length, in_flight, True, setup.lora)
    try:
        recompute, need = plan_memory(free, need, lean, True if setup.recompute else recompute_choice)
    except ModelError as exc:
        raise ModelError(f"training stage [{stage.spec.start_layer}, {stage.spec.stop_layer}) {exc} (micro-batches "
                         f"of {rows} x {length} tokens, {in_flight} in flight): use a smaller micro_batch_size or "
                         "max_length, or more PCs") from None
    setup = replace(setup, recompute=recompute)
    worker.trainer = StageTrainer(worker, setup, state)
    return {"recompute": setup.recompute, "need_bytes": need, "free_bytes": free}


def training_state() -> dict:
    """This stage's adapter, optimizer moments and step count (a checkpoint's part)."""
    trainer = getattr(_worker(), "trainer", None)
    if trainer is None:
        raise ClusterError("this engine's stage is not training")
    return trainer.state()


def stop_training(keep_adapter: bool = False) -> bool:
    """End this stage's training (idempotent); the trained adapter is dropped unless kept."""
    from .worker import current_worker

    worker = current_worker()
    trainer = getattr(worker, "trainer", None) if worker is not None else None
    if trainer is None:
        return False
    worker.trainer = None
    trainer.close()
    if not keep_adapter:
        lora.drop_adapter(worker.stage, trainer.setup.adapter)
    return True


def add_adapter(adapter: int, settings: LoraSettings, tensors: dict) -> int:
    """Serve adapter id ``adapter`` on this stage from ``tensors`` (peft names; the stage reads its
    layers'). Returns the bytes it holds."""
    settings = received(settings, LoraSettings, "the coordinator")
    worker = _worker()
    params = lora.set_adapter(worker.stage, adapter, settings, tensors, dtype=torch.float32)
    return sum(t.numel() * t.element_size() for t in params)


def adapter_status() -> dict:
    """The adapter ids this stage holds and how many of its steps mixed adapters in one batch."""
    worker = _worker()
    held = set()
    for module in worker.stage.modules():
        if isinstance(module, lora.LoraLinear):
            held.update(module.adapters)
    return {"adapters": sorted(held), "mixed_steps": worker.stats.mixed_steps}


def recompute_choice(free: int, need: int, lean: int, recompute: bool | None) -> tuple[bool, int]:
    """(recompute, bytes needed) for a stage with ``free`` bytes: keeping activations needs
    ``need``, recomputing them ``lean``. ``recompute`` None recomputes only where keeping them
    does not fit; False/True insist. The engine (:func:`plan_memory`) and the coordinator's check
    against the plan both decide by it."""
    if recompute is None:
        recompute = need > free
    return recompute, lean if recompute else need


def plan_memory(free: int, need: int, lean: int, recompute: bool | None) -> tuple[bool, int]:
    """:func:`recompute_choice`, raising ModelError (without the stage's name: the caller adds
    it) when the choice does not fit ``free``."""
    recompute, chosen = recompute_choice(free, need, lean, recompute)
    if chosen > free:
        raise ModelError(f"needs about {chosen / 2**20:.0f} MiB beyond its weights"
                         f"{' even recomputing activations' if recompute else ''} and its PC has "
                         f"{free / 2**20:.0f} MiB free")
    return recompute, chosen


def drop_adapter(adapter: int) -> bool:
    """Stop serving adapter id ``adapter`` on this stage."""
    lora.drop_adapter(_worker().stage, adapter)
    return True
