"""Fine-tuning a LoRA adapter through the pipeline's stages: the coordinator's side.

``cluster.finetune(data, ...)`` returns a :class:`FineTuneJob` that runs in a thread of its
own. For each optimizer step it takes the step's batch (:mod:`.training_data`: a pure function
of the data, the seed and the step), splits it into micro-batches and, on the cluster's loop,
sends them down the ring as ``TrainForward`` messages, at most ``in_flight`` at a time (default:
one per stage, which keeps every stage busy as 1F1B does while bounding the activations each
stage keeps); every micro-batch's loss comes back from the last stage. It then closes the batch
with a two-phase ``TrainStep`` around the ring: the gradients' global norm, then clipping and
AdamW on every stage (:mod:`exo_lab.engine.training` says what the stages do).

Checkpoints (every ``save_every`` steps and at the end) gather each stage's adapter and AdamW
moments over the control plane and write peft's format, ``<output_dir>/checkpoint-<step>/``
(adapter_model.safetensors, adapter_config.json, trainer_state.pt), and the final adapter in
``<output_dir>`` itself. When a stage's engine dies the supervisor re-plans on the engines left
(serving resumes); the job then starts every stage from the last checkpoint (the adapter and
optimizer state; the data order depends only on the step) and goes on from that step, so the
result equals an uninterrupted run's. A failure the stages report (out of memory, a bad batch)
ends the job with that message instead.

When the job ends its adapter is served under ``name`` (the API's ``model``), beside the base.
"""
from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..control_types import LoraSettings, TrainSetup
from ..errors import ClusterError, ExoLabError, ModelError
from ..wire import Error, TrainForward, TrainLoss, TrainStep, msg_id
from . import training_data as data_mod
from .adapters import layer_part

logger = logging.getLogger(__name__)

STEP_TIMEOUT_S = 600.0        # a micro-batch's forward and backward through every stage
RECOVER_TIMEOUT_S = 600.0     # waiting for the supervisor to serve again after a lost stage
MAX_RECOVERIES = 8
MAX_YIELD_S = 5.0             # the longest pause a micro-batch takes for serving requests
LIVENESS_CHECK_S = 1.0        # how often a step waiting on the stages checks that their engines live
STATE_FILE = "trainer_state.pt"


@dataclass(frozen=True)
class FineTuneSettings:
    """A job's settings (``cluster.finetune``'s keyword arguments); checked on construction."""

    lora: LoraSettings = field(default_factory=LoraSettings)
    epochs: float = 1.0
    max_steps: int | None = None
    learning_rate: float = 2e-4
    lr_schedule: str = "linear"
    warmup_steps: int = 0
    batch_size: int = 8
    micro_batch_size: int = 2
    max_length: int = 512
    seed: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    save_every: int | None = None         # None: about every tenth of the run, at least every 10 steps
    recompute: bool | None = None         # None: where keeping activations would not fit
    in_flight: int | None = None          # micro-batches in the pipe at once (None: one per stage)
    serving_share: float = 0.5            # of the stages' time training may take while requests are served

    def __post_init__(self) -> None:
        def positive_int(name, value, low=1):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ModelError(f"{name} must be an integer >= {low}, got {value!r}")
        for name in ("batch_size", "micro_batch_size", "max_length"):
            positive_int(name, getattr(self, name))
        for name in ("warmup_steps", "seed"):
            positive_int(name, getattr(self, name), 0)
        if self.save_every is not None:
            positive_int("save_every", self.save_every, 0)
        if self.max_steps is not None:
            positive_int("max_steps", self.max_steps)
        if self.in_flight is not None:
            positive_int("in_flight", self.in_flight)
        if self.micro_batch_size > self.batch_size:
            raise ModelError(f"micro_batch_size ({self.micro_batch_size}) cannot exceed batch_size ({self.batch_size})")
        if not isinstance(self.epochs, (int, float)) or not self.epochs > 0:
            raise ModelError(f"epochs must be > 0, got {self.epochs!r}")
        if not isinstance(self.learning_rate, (int, float)) or not 0 < self.learning_rate < 1:
            raise ModelError(f"learning_rate must be in (0, 1), got {self.learning_rate!r}")
        if self.lr_schedule not in data_mod.LR_SCHEDULES:
            raise ModelError(f"lr_schedule must be one of {', '.join(data_mod.LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if not isinstance(self.serving_share, (int, float)) or not 0 < self.serving_share <= 1:
            raise ModelError(f"serving_share must be in (0, 1], got {self.serving_share!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ModelError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm!r}")
        if not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            raise ModelError(f"weight_decay must be >= 0, got {self.weight_decay!r}")


class _PipelineLost(ClusterError):
    """A stage was lost mid-batch (the supervisor is re-planning): the job resumes."""


class _Sink:
    """The scheduler's route for training messages (Scheduler.training): batch id -> queue."""

    def __init__(self):
        self.queues: dict[int, asyncio.Queue] = {}

    def owns(self, message) -> bool:
        return isinstance(message, (TrainLoss, TrainStep, Error)) and msg_id(message) in self.queues

    def received(self, message) -> None:
        self.queues[msg_id(message)].put_nowait(message)

    def lost(self, reason: str) -> None:
        for queue in self.queues.values():
            queue.put_nowait(_PipelineLost(reason))


class FineTuneJob:
    """A fine-tuning run (``cluster.finetune``). Read ``step``, ``total_steps``, ``history`` (a
    dict per step: loss, lr, grad_norm, tokens, seconds), ``status`` (running, done, stopped,
    failed), ``error``, ``checkpoints``, ``resumes``; call :meth:`wait`, :meth:`stop`,
    :meth:`plot`; displayed in a notebook it is a progress bar and a live loss plot."""

    def __init__(self, cluster, examples: list, settings: FineTuneSettings, name: str, output_dir: Path,
                 skipped: int = 0, resume: tuple[int, dict] | None = None):
        self.cluster = cluster
        self.examples = examples
        self.settings = settings
        self.name = name
        self.output_dir = Path(output_dir)
        self.skipped = skipped
        self.longest = max(len(e.ids) for e in examples)     # the longest row (what memory is checked for)
        per_epoch = data_mod.batches_per_epoch(len(examples), settings.batch_size)
        self.total_steps = settings.max_steps or max(1, math.ceil(settings.epochs * per_epoch))
        self.step = resume[0] if resume else 0
        # a checkpoint is what a lost stage costs: the job goes back to the last one (0: only at the end)
        self.save_every = settings.save_every if settings.save_every is not None else \
            max(10, math.ceil(self.total_steps / 10))
        self.history: list[dict] = []
        self.checkpoints: list[Path] = []
        self.status = "running"
        self.error: str | None = None
        self.resumes = 0
        self.recompute: bool | None = None
        self.stage_memory: list[dict] = []     # per stage: what training needs and had free (start_training)
        self.planned_memory: list[dict] = []   # per stage: what it needs against what the plan leaves (plan_memory)
        self.adapter_id = cluster.adapters.reserve()
        self._checkpoint = resume            # (step, state) the job goes back to when a stage is lost
        self._attempt = 0
        self._stages: list = []             # the engines the job last started training on
        self._sink: _Sink | None = None     # the scheduler's route to this job's batches
        self._stop = threading.Event()
        self._done = threading.Event()
        self._listeners: list = []
        self._thread = threading.Thread(target=self._run, name=f"exo-finetune-{name}", daemon=True)

    def start(self) -> "FineTuneJob":
        self._thread.start()
        return self

    # ------------------------------------------------------------------ user calls
    def stop(self, wait: bool = True, timeout_s: float = 120.0) -> None:
        """Stop after the step under way; the last checkpoint stays (nothing else is saved)."""
        self._stop.set()
        if wait:
            self._done.wait(timeout_s)

    def wait(self, timeout_s: float | None = None) -> "FineTuneJob":
        """Block until the job ends. Raises the job's error when it failed, TimeoutError."""
        if not self._done.wait(timeout_s):
            raise TimeoutError(f"fine-tuning {self.name} did not finish within {timeout_s} s "
                               f"(step {self.step} of {self.total_steps})")
        if self.status == "failed":
            raise ClusterError(f"fine-tuning {self.name} failed: {self.error}")
        return self

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def losses(self) -> list[float]:
        return [h["loss"] for h in self.history]

    def tokens_per_s(self) -> float:
        """Training tokens (every position of every row, padding excluded) per second over the
        steps run so far."""
        seconds = sum(h["seconds"] for h in self.history)
        return sum(h["tokens"] for h in self.history) / seconds if seconds else 0.0

    def plot(self, ax=None):
        """The loss per step: a matplotlib Figure (drawn on ``ax`` when given)."""
        from ..notebook.plots import loss_plot

        return loss_plot(self, ax)

    def _ipython_display_(self):
        from ..notebook.training import JobView

        JobView(self).show()

    def __repr__(self) -> str:
        loss = f", loss {self.history[-1]['loss']:.4f}" if self.history else ""
        return f"<FineTuneJob {self.name}: {self.status}, step {self.step}/{self.total_steps}{loss}>"

    # ------------------------------------------------------------------ the run
    def _run(self) -> None:
        state = self._checkpoint[1] if self._checkpoint else None
        attached = False
        try:
            while self.step < self.total_steps and not self._stop.is_set():
                try:
                    if not attached:
                        self._attach(state)
                        attached = True
                    self._record(self._batch(self.step))
                    self.step += 1
                    every = self.save_every
                    if self.step == self.total_steps or (every and self.step % every == 0):
                        state = self._save(self.step, final=self.step == self.total_steps)
                except _PipelineLost as exc:
                    attached = False
                    state = self._recover(str(exc))
            if self.step < self.total_steps:
                self.status = "stopped"
            else:
                self._serve()
                self.status = "done"
        except BaseException as exc:
            self.status, self.error = "failed", str(exc) if isinstance(exc, ExoLabError) else repr(exc)
            logger.warning("fine-tuning %s failed at step %d: %s", self.name, self.step, self.error)
        finally:
            self._detach()
            self.cluster.adapters.release(self.adapter_id)
            self._done.set()
            self._notify()

    def _pipeline(self):
        pipeline = self.cluster.pipeline
        if pipeline is None or self.cluster.state != "serving":
            raise _PipelineLost(f"the cluster is {self.cluster.state}")
        return pipeline

    def _attach(self, state: dict | None) -> None:
        """Every stage starts training: a fresh adapter, or the checkpoint's ``state``."""
        from ..engine import training

        pipeline = self._pipeline()
        control = self.cluster.control
        self._attempt += 1
        s = self.settings
        in_flight = s.in_flight or len(pipeline.engines)
        answers = []
        for index, (info, stage) in enumerate(zip(pipeline.engines, pipeline.plan.stages)):
            setup = TrainSetup(adapter=self.adapter_id, lora=s.lora, seed=s.seed, weight_decay=s.weight_decay,
                               recompute=bool(s.recompute), floor=self._batch_id(0),
                               upstream=pipeline.addresses[index - 1] if index else None)
            part = None if state is None else _stage_state(state, stage.start_layer, stage.stop_layer)
            try:
                answer = control.call(info.engine_id, training.start_training, setup, part, s.micro_batch_size,
                                      self.longest, in_flight, s.recompute, what="starting fine-tuning",
                                      timeout_s=120)
            except ExoLabError:
                self._lost_if_gone()
                raise
            answers.append(answer)
        self.recompute = any(answer["recompute"] for answer in answers)
        self.stage_memory = [{"engine": info.engine_id, **answer} for info, answer in zip(pipeline.engines, answers)]
        self._stages = list(pipeline.engines)
        pipeline.scheduler.training = self._sink = _Sink()

    def _lost_if_gone(self) -> None:
        """Raise _PipelineLost (and have the supervisor fail over) when a stage engine is gone."""
        pipeline = self.cluster.pipeline
        problem = pipeline.dead_stage_message(self.cluster.control) if pipeline is not None else None
        if problem:
            self.cluster.run_coroutine(_report_lost(pipeline.scheduler, problem))
            raise _PipelineLost(problem)

    def _detach(self) -> None:
        from ..engine import training

        pipeline = self.cluster.pipeline
        if pipeline is not None and pipeline.scheduler.training is self._sink:
            pipeline.scheduler.training = None
        control = self.cluster.control
        for info in self._stages:
            if not control.is_gone(info):
                try:
                    control.call(info.engine_id, training.stop_training, what="ending fine-tuning", timeout_s=30)
                except ExoLabError as exc:
                    logger.info("ending fine-tuning on engine %d: %s", info.engine_id, exc)

    def _batch_id(self, step: int) -> int:
        """Batch ids grow over attempts, so a stage never takes a message of an earlier attempt."""
        return (self._attempt << 32) | step

    def _batch(self, step: int) -> dict:
        s = self.settings
        batch = data_mod.batch_at(self.examples, step, s.batch_size, s.seed)
        pad = self.cluster.tokenizer.pad_token_id
        micros = data_mod.micro_batches(batch, s.micro_batch_size, 0 if pad is None else pad)
        targets = sum(e.target_count for e in batch)
        lr = data_mod.learning_rate(step, self.total_steps, s.learning_rate, s.lr_schedule, s.warmup_steps)
        pipeline = self._pipeline()
        started = time.perf_counter()
        loss, norm = self.cluster.run_coroutine(
            _run_batch(pipeline.scheduler, self._sink, self._batch_id(step), micros, 1.0 / targets, lr,
                       s.max_grad_norm, s.in_flight or len(pipeline.engines), s.serving_share))
        return {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": norm, "targets": targets,
                "tokens": sum(len(e.ids) for e in batch), "seconds": time.perf_counter() - started}

    def _record(self, result: dict) -> None:
        self.history.append(result)
        self._notify()

    def _notify(self) -> None:
        for listener in list(self._listeners):
            try:
                listener(self)
            except Exception:        # a closed widget must not stop the job
                logger.debug("a fine-tuning listener failed", exc_info=True)

    def _recover(self, reason: str) -> dict | None:
        """Wait for the supervisor to serve again, then go back to the last checkpoint."""
        self.resumes += 1
        if self.resumes > MAX_RECOVERIES:
            raise ClusterError(f"the pipeline was lost {self.resumes} times ({reason})")
        logger.warning("fine-tuning %s: %s; resuming from step %d", self.name, reason,
                       self._checkpoint[0] if self._checkpoint else 0)
        deadline = time.monotonic() + RECOVER_TIMEOUT_S
        while not (self.cluster.state == "serving" and self.cluster.pipeline is not None
                   and self.cluster.pipeline.dead_engines(self.cluster.control) == []):
            if self._stop.is_set():
                return None
            if time.monotonic() > deadline or self.cluster.state in ("failed", "idle", "stopped"):
                raise ClusterError(f"the pipeline was lost ({reason}) and the cluster did not serve again "
                                   f"(it is {self.cluster.state}: {self.cluster.failure or 'no failure given'})")
            time.sleep(0.5)
        # the history of steps after the checkpoint is replayed
        self.step = self._checkpoint[0] if self._checkpoint else 0
        self.history = [h for h in self.history if h["step"] <= self.step]
        return self._checkpoint[1] if self._checkpoint else None

    # ------------------------------------------------------------------ checkpoints
    def _gather(self) -> dict:
        from ..engine import training

        control = self.cluster.control
        state = {"tensors": {}, "optimizer": {}, "steps": 0}
        for info in self._stages:
            try:
                part = control.call(info.engine_id, training.training_state, what="saving the adapter", timeout_s=120)
            except ExoLabError:
                self._lost_if_gone()
                raise
            state["tensors"].update(part["tensors"])
            state["optimizer"].update(part["optimizer"])
            state["steps"] = part["steps"]
        return state

    def _save(self, step: int, final: bool) -> dict:
        import torch

        from ..model.lora import save_adapter

        state = self._gather()
        folder = self.output_dir / f"checkpoint-{step}"
        base = self.cluster.model_id
        save_adapter(folder, state["tensors"], self.settings.lora, base)
        torch.save({"step": step, "optimizer": state["optimizer"], "history": self.history,
                    "settings": asdict(self.settings)}, folder / STATE_FILE)
        self.checkpoints.append(folder)
        if final:
            save_adapter(self.output_dir, state["tensors"], self.settings.lora, base)
        self._checkpoint = (step, state)
        return state

    def _serve(self) -> None:
        self.cluster.add_adapter(self.name, self.output_dir)


async def _report_lost(scheduler, problem: str) -> None:
    scheduler.lost(problem)


async def _run_batch(scheduler, sink: _Sink, batch_id: int, micros: list, scale: float, lr: float,
                     max_grad_norm: float | None, in_flight: int, share: float = 1.0) -> tuple[float, float]:
    """One optimizer step through the ring (the module docstring): (loss, gradient norm).

    While the scheduler serves requests, one micro-batch is in the pipe at a time and the next
    waits so that training takes about ``share`` of the time: a decode step then waits for at most
    one training micro-batch on a stage, and runs in the pauses."""
    queue: asyncio.Queue = asyncio.Queue()
    sink.queues[batch_id] = queue

    async def next_message():
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while True:
            try:
                message = await asyncio.wait_for(queue.get(), LIVENESS_CHECK_S)
                break
            except asyncio.TimeoutError:
                # nobody else may be waiting on the pipe: a dead stage engine is noticed here, and
                # reported as a request would report it (the supervisor fails over)
                problem = scheduler.check_alive()
                if problem is None and time.monotonic() > deadline:
                    problem = f"no answer from the stages within {STEP_TIMEOUT_S:.0f} s: a stage is hung"
                if problem:
                    scheduler.lost(problem)
                    raise _PipelineLost(problem) from None
        if isinstance(message, Exception):
            raise message
        if isinstance(message, Error):
            raise ClusterError(message.message)
        return message

    async def send(message):
        if scheduler.suspended_since is not None:
            raise _PipelineLost("the pipeline is being re-planned")
        try:
            await scheduler.send_training(message)
        except ClusterError as exc:
            raise _PipelineLost(str(exc)) from None

    try:
        losses: dict[int, float] = {}
        sent_at: dict[int, float] = {}
        sent, busy = 0, 0.0
        while len(losses) < len(micros):
            serving = share < 1.0 and scheduler.active_requests > 0
            if sent < len(micros) and sent - len(losses) < (1 if serving else in_flight):
                if serving and busy:
                    await asyncio.sleep(min(busy * (1.0 - share) / share, MAX_YIELD_S))
                sent_at[sent] = time.perf_counter()
                await send(TrainForward(batch_id, sent, micros[sent][0], micros[sent][1], scale))
                sent += 1
                continue
            message = await next_message()
            if isinstance(message, TrainLoss):
                losses[message.micro] = message.loss
                busy = time.perf_counter() - sent_at[message.micro]
        await send(TrainStep(batch_id, len(micros), 0, 0.0, lr))
        message = await next_message()
        norm = math.sqrt(message.value)
        coef = 1.0 if max_grad_norm is None else min(1.0, max_grad_norm / (norm + 1e-6))
        await send(TrainStep(batch_id, len(micros), 1, coef, lr))
        message = await next_message()
        while not (isinstance(message, TrainStep) and message.phase == 1):
            message = await next_message()
        return sum(losses[i] for i in range(len(micros))), norm
    finally:
        sink.queues.pop(batch_id, None)


def _stage_state(state: dict, start: int, stop: int) -> dict:
    return {"tensors": layer_part(state["tensors"], start, stop),
            "optimizer": layer_part(state.get("optimizer", {}), start, stop),
            "steps": state.get("steps", 0)}


def plan_memory(pipeline, settings: FineTuneSettings, longest: int) -> list[dict]:
    """Per stage of the plan in force: what training needs beyond serving (keeping activations,
    and recomputing them) against what the plan leaves on its node (budget - planned total).
    Raises ModelError naming the first stage where even recomputation does not fit (or keeping
    activations, with recompute=False), with the numbers and what to change. The engines check
    their PCs' free memory again when the job starts."""
    from ..engine.training import estimate_training_bytes, recompute_choice
    from ..weights.resolve import read_model_config

    config = read_model_config(pipeline.model_dir)
    in_flight = settings.in_flight or len(pipeline.plan.stages)
    rows = []
    for index, stage in enumerate(pipeline.plan.stages):
        layers = stage.stop_layer - stage.start_layer
        need, lean = (estimate_training_bytes(config, layers, stage.has_head, settings.lora, settings.micro_batch_size,
                                              longest, in_flight, recompute, stage.workspace_bytes)
                      for recompute in (False, True))
        spare = stage.budget_bytes - stage.total_bytes
        rows.append({"stage": index, "node": stage.node, "spare_bytes": spare, "need_bytes": need, "lean_bytes": lean})
        recompute, shown = recompute_choice(spare, need, lean, settings.recompute)
        if shown > spare:
            raise ModelError(
                f"fine-tuning does not fit the plan: stage {index} ({stage.node}, layers [{stage.start_layer}, "
                f"{stage.stop_layer})) needs about {shown / 2**20:.0f} MiB beyond what it holds for serving"
                f"{' even recomputing activations' if recompute else ''} (micro-batches of "
                f"{settings.micro_batch_size} x {longest} tokens, {in_flight} in flight), and its budget leaves "
                f"{max(spare, 0) / 2**20:.0f} MiB: lower micro_batch_size or max_length, or load the model over more PCs")
    return rows


def load_checkpoint(path) -> tuple[int, dict, dict]:
    """(step, state, settings dict) of a job's checkpoint folder (``resume_from``)."""
    import torch

    from ..model.lora import read_adapter

    path = Path(path).expanduser()
    if not (path / STATE_FILE).is_file():
        raise ModelError(f"{path} is not a fine-tuning checkpoint (no {STATE_FILE}); pass a checkpoint-<step> folder")
    saved = torch.load(path / STATE_FILE, weights_only=False)
    _, tensors, _ = read_adapter(path)
    return saved["step"], {"tensors": tensors, "optimizer": saved["optimizer"], "steps": saved["step"]}, saved["settings"]


def start_job(cluster, data, *, name: str, output_dir=None, resume_from=None, init_from=None,
              **options) -> FineTuneJob:
    """``cluster.finetune``'s body: check everything, tokenize, start the job's thread."""
    from ..paths import state_dir

    pipeline = cluster._require_pipeline()
    lora_fields = {k: options.pop(k) for k in ("r", "alpha", "dropout", "target_modules") if k in options}
    if "target_modules" in lora_fields:
        lora_fields["targets"] = lora_fields.pop("target_modules")
    unknown = sorted(set(options) - {f for f in FineTuneSettings.__dataclass_fields__ if f != "lora"})
    if unknown:
        raise ModelError(f"cluster.finetune() got unknown option(s) {unknown}; it takes r, alpha, dropout, "
                         f"target_modules, {', '.join(f for f in FineTuneSettings.__dataclass_fields__ if f != 'lora')}")
    resume = None
    if init_from is not None:          # start from an adapter's weights (peft's or ours), its shape
        from ..model.lora import read_adapter

        if lora_fields:
            raise ModelError("init_from gives the adapter's r, alpha, dropout and target_modules: leave them out")
        lora, tensors, _ = read_adapter(Path(init_from).expanduser())
        lora_fields = {"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout, "targets": lora.targets}
        resume = (0, {"tensors": tensors, "optimizer": {}, "steps": 0})
    settings = FineTuneSettings(lora=LoraSettings(**lora_fields), **options)
    if resume_from is not None:
        step, state, _ = load_checkpoint(resume_from)
        resume = (step, state)
    if cluster.adapters.get(name) is not None or name in (cluster.model_id,):
        raise ModelError(f"an adapter named {name!r} is served already: pick another name or remove it "
                         "with cluster.remove_adapter(name)")
    examples, skipped = data_mod.tokenize(data_mod.rows_of(data), pipeline.tokenizer,
                                          min(settings.max_length, pipeline.context_length))
    planned = plan_memory(pipeline, settings, max(len(e.ids) for e in examples))
    output_dir = Path(output_dir) if output_dir is not None else state_dir() / "adapters" / name
    job = FineTuneJob(cluster, examples, settings, name, output_dir, skipped, resume)
    job.planned_memory = planned
    return job.start()
