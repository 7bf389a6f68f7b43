"""Cluster: the one object users hold. A thin facade over the coordinator's parts.

``EngineControl`` (coordinator/control.py) owns the ipyparallel control plane; the
``Supervisor`` (coordinator/supervisor.py) owns the cluster's life: load, re-plan, failover,
membership and stop, on a thread of its own; each loaded pipeline's ``Scheduler`` drives
requests over the data plane on the cluster's event-loop thread.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

from .config import ClusterConfig, config_from_dict, load_config
from .coordinator.control import DEFAULT_START_TIMEOUT_S, EngineControl, EngineInfo
from .coordinator.loop import LoopThread
from .coordinator.supervisor import DEFAULT_LOAD_TIMEOUT_S, EngineRuntime, Load, Replan, Supervisor, Unload
from .errors import ClusterError, ModelError
from .sampling import GenerationResult, SamplingParams, StreamEvent

if TYPE_CHECKING:
    from .coordinator.pipeline import Pipeline
    from .planning.planner import Plan

logger = logging.getLogger(__name__)

STOP_JOIN_S = 5.0     # stop(): how long a load or failover under way gets to end with the engines
_SAMPLING_ARGS = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos", "speculative",
                  "adapter")


class Cluster:
    """A pipeline of ipyparallel engines that runs one causal LM. docs/usage.md gives a tour.

    Use :meth:`local` for engines on this machine or :meth:`from_config` for a config.yaml
    cluster; then :meth:`start` (or ``with``), :meth:`load`, :meth:`generate` / :meth:`chat`,
    :meth:`serve`, :meth:`status`, :meth:`stop`.
    """

    def __init__(self, config: ClusterConfig, *, local_engines: int | None = None,
                 max_cores: int | None = None, max_memory_bytes: int | None = None,
                 profile_dir: str | os.PathLike | None = None,
                 start_timeout_s: float = DEFAULT_START_TIMEOUT_S):
        self.config = config
        self.control = EngineControl(config, local_engines=local_engines, max_cores=max_cores,
                                     max_memory_bytes=max_memory_bytes, profile_dir=profile_dir,
                                     start_timeout_s=start_timeout_s)
        self._runtime = EngineRuntime(self.control)
        self.supervisor = Supervisor(self._runtime, replan_auto=config.replan == "auto")
        self._server = None
        self._peer_service = None        # join / model files / advert (config clusters with a secret)

    # ------------------------------------------------------------ construction
    @classmethod
    def local(cls, engines: int = 2, *, max_cores: int | None = None, max_memory: str | int | None = None,
              replan: str = "manual", **kwargs) -> "Cluster":
        """A cluster of ``engines`` engines on this machine (no config file needed).

        max_cores: torch threads per engine (default: every core — one stream runs its stages one
        after another, so they do not compete; lower it when serving many requests at once).
        max_memory: cap on each engine's memory budget (default: free memory / engines).
        replan: "manual" or "auto" (re-plan when engines change, re-balance while serving when a
        stage runs slower or faster than planned: docs/config.md).
        """
        from .units import parse_size

        if not isinstance(engines, int) or isinstance(engines, bool) or engines < 1:
            raise ClusterError(f"engines must be an integer >= 1, got {engines!r}")
        config = config_from_dict({
            "cluster_name": "local",
            "devices": [{"hostname": "localhost", "roles": ["coordinator", "compute"], "engines": engines}],
            "network": {"discovery": "manual"},
            "replan": replan,
        }, source="Cluster.local()")
        budget = parse_size(max_memory, what="max_memory") if max_memory is not None else None
        return cls(config, local_engines=engines, max_cores=max_cores, max_memory_bytes=budget, **kwargs)

    @classmethod
    def from_config(cls, config: str | os.PathLike | ClusterConfig, **kwargs) -> "Cluster":
        """A cluster described by a config.yaml (every key: docs/config.md)."""
        if not isinstance(config, ClusterConfig):
            config = load_config(config)
        return cls(config, **kwargs)

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"{len(self.control.ids)} engines" if self.control.started else "stopped"
        model = f", model={self.pipeline.model_id!r}" if self.pipeline else ""
        return f"<exo_lab.Cluster {self.config.cluster_name!r}: {state}{model}>"

    # ------------------------------------------------------------ start / stop
    def start(self) -> "Cluster":
        """Start the controller (and this machine's engines) and wait for every compute engine."""
        if self.control.started:
            return self
        try:
            self._runtime.loop = LoopThread()
            self._started_at = time.time() - 1.0    # file mtimes may be a little coarse
            self.supervisor.start(lambda: self.control.start(on_controller=self._start_peer_service))
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def _loop(self) -> LoopThread | None:
        return self._runtime.loop

    def _start_peer_service(self) -> None:
        """With a cluster secret, other PCs join (and fetch model files) through this service."""
        from .membership.launch import public_connection_info
        from .membership.service import start_coordinator_service

        if self.control.is_local or self.control.secret is None:
            return
        connection = public_connection_info(self.control.profile_dir, newer_than=self._started_at)
        self._peer_service = self._loop.run(start_coordinator_service(
            self.config, self.control.secret, connection,
            on_address=lambda address: setattr(self.control, "lan_address", address)))

    def stop(self) -> None:
        """Stop serving, unload the model and end every process this cluster started."""
        self._stop_server()
        stopped = self.supervisor.stop()      # closes the pipeline, unless a load or failover runs
        if self._peer_service is not None:
            try:
                self._loop.run(self._peer_service.close(), timeout_s=10)
            except Exception:
                logger.exception("stopping the join/storage service failed")
            self._peer_service = None
        self.control.stop()
        if not stopped and not self.supervisor.join(STOP_JOIN_S):   # that work ends with the engines
            logger.warning("the cluster's supervisor did not finish within %.0f s of the stop", STOP_JOIN_S)
        loop, self._runtime.loop = self._runtime.loop, None
        if loop is not None:
            loop.stop()

    def _stop_server(self) -> None:
        if self._server is not None:
            try:
                self._server.stop()
            except Exception:  # stopping must go on whatever the server says
                logger.exception("stopping the API server failed")
            self._server = None

    @property
    def profile_dir(self):
        """The ipyparallel profile folder (connection files for workers and %%px, logs)."""
        return self.control.profile_dir

    def engines(self) -> list[EngineInfo]:
        """Probe every live engine and apply the config's limits (memory, cores, gpu)."""
        return self.control.probe()

    # ------------------------------------------------------------ load
    def load(self, model: str | None = None, *, dtype: str | None = None, max_context: int | None = None,
             max_batch: int | None = None, objective: str | None = None, min_stages: int | None = None,
             prefill_chunk: int | None = None, micro_batches: int | None = None, max_queued: int | None = None,
             speculation: str | None = None, draft_model: str | None = None, draft_dtype: str | None = None,
             progress: bool = True,
             timeout_s: float = DEFAULT_LOAD_TIMEOUT_S) -> Plan:
        """Plan the split of ``model`` over the live engines and load one shard per stage.

        Each option left None comes from config.yaml, else the default (exactly as
        ``exo-lab plan`` resolves them): model "demo", dtype "float32", max_context min(the
        model's max positions, 4096), max_batch 8 (KV slots: requests decoded together),
        objective "latency", min_stages 1, prefill_chunk 256 (prompt tokens per step),
        micro_batches one per stage (1 when stages sharing a PC oversubscribe its cores),
        max_queued 64, speculation "off" ("prompt_lookup": speculative decoding with drafts from the
        request's own tokens; "draft_model": drafts from ``draft_model``, default the served model,
        run whole on the coordinator at ``draft_dtype``, default "int8"), and the config's
        network.hop_latency_ms.
        Raises ConfigError, ModelError, PlanError or ClusterError; on error nothing stays loaded.
        """
        from .planning.options import resolve_load_options

        self.control.require_started()
        options = resolve_load_options(self.config, model=model, dtype=dtype, max_context=max_context,
                                       max_batch=max_batch, objective=objective, min_stages=min_stages,
                                       prefill_chunk=prefill_chunk, micro_batches=micro_batches,
                                       max_queued=max_queued, speculation=speculation,
                                       draft_model=draft_model, draft_dtype=draft_dtype)
        return self._ask(Load(options, progress=progress, timeout_s=timeout_s))

    def replan(self, *, progress: bool = True, timeout_s: float = DEFAULT_LOAD_TIMEOUT_S) -> Plan:
        """Plan the loaded model again over the engines registered now (a PC that joined after
        load shows as a spare until then; after a failure, the survivors) and load that plan
        when it beats the one in force, or whenever the pipeline failed. Nothing restarts: the
        engines stay up and only the stages are loaded again; requests running at that moment
        end with an error (``replan: auto`` waits for none to run). Returns the plan in force.
        Raises PlanError when the engines cannot hold the model, ClusterError without a model."""
        return self._ask(Replan(progress=progress, timeout_s=timeout_s))

    def unload(self) -> None:
        """Free every stage (the engines stay up); after a failure, the model no longer loads
        again by itself."""
        if self.control.started:
            self._ask(Unload())

    def _ask(self, command):
        """Hand a command to the supervisor and wait for its result (the errors it raises)."""
        self.control.require_started()
        if self._loop.in_loop:     # the work needs the loop: waiting on it there would hang
            raise RuntimeError("blocking cluster call made from the cluster's loop thread; call it from "
                               "another thread")
        return self.supervisor.ask(command)

    @property
    def state(self) -> str:
        """Where the cluster is in its life: stopped, starting, idle (no model), loading,
        serving, suspended, replanning (a failover or re-plan), failed or stopping."""
        return self.supervisor.state.value

    @property
    def pipeline(self) -> Pipeline | None:
        """The loaded model's pipeline (after a failure, the one that failed), or None."""
        return self.supervisor.pipeline

    @property
    def failure(self) -> str | None:
        """Why the model cannot be served (the survivors of a failure cannot hold it), or None."""
        return self.supervisor.failure

    @property
    def memory_note(self) -> str | None:
        """Why the stages hold fewer KV slots than planned (a PC got short of memory), or None."""
        return self.supervisor.memory_note

    @property
    def recovering(self) -> str | None:
        """The failure a failover under way recovers from, or None."""
        return self.supervisor.recovering

    @recovering.setter
    def recovering(self, reason: str | None) -> None:    # tests stand in for a reported failure
        self.supervisor.recovering = reason

    @property
    def plan(self) -> Plan:
        return self._require_pipeline().plan

    @property
    def model_id(self) -> str:
        return self._require_pipeline().model_id

    @property
    def tokenizer(self):
        return self._require_pipeline().tokenizer

    @property
    def context_length(self) -> int:
        return self._require_pipeline().context_length

    @property
    def loaded(self) -> bool:
        return self.pipeline is not None

    def _require_pipeline(self) -> Pipeline:
        if self.failure:
            raise ClusterError(self.failure)
        if self.pipeline is None:
            raise ClusterError("no model is loaded: call cluster.load('demo') (or a model folder / hub id)")
        return self.pipeline

    # ------------------------------------------------------------ generation
    def encode(self, prompt) -> list[int]:
        """Token ids for a prompt string (no special tokens added) or a list of ids (unchanged)."""
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        return [int(t) for t in prompt]

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation through the tokenizer's chat template."""
        from .coordinator.chat import apply_chat_template

        return apply_chat_template(self.tokenizer, messages)

    def astream(self, prompt_ids: list[int], params: SamplingParams, tenant=None,
                processor=None) -> AsyncIterator[StreamEvent]:
        """Async generation on the cluster's loop (the HTTP server uses this). Closing the
        returned generator (``aclose()``) cancels the request and frees its KV caches.
        ``tenant``: who asks (:class:`exo_lab.coordinator.tenants.Tenant`: fair share, caps,
        prefix isolation); None: this process's own requests. ``processor``: a
        :class:`exo_lab.sampling.LogitProcessor` (a grammar) shaping each token; the request ends
        with finish_reason "stop" once it is finished."""
        from .coordinator.tenants import LOCAL

        return self._require_pipeline().scheduler.stream(prompt_ids, params, tenant or LOCAL, processor)

    def astream_n(self, prompt_ids: list[int], params: SamplingParams, n: int, tenant=None,
                  processors=None) -> list[AsyncIterator[StreamEvent]]:
        """``n`` choices of one prompt (1 <= n <= max_batch), its prefill shared: one stream per
        choice, choice i seeded ``params.seed + i`` when seeded. ``processors``: None or one per
        choice. Submitted at once; close each stream to cancel its choice. Raises RequestError,
        QueueFull."""
        from .coordinator.tenants import LOCAL

        return self._require_pipeline().scheduler.stream_group(prompt_ids, params, n, tenant or LOCAL, processors)

    async def aembed(self, inputs: list[list[int]], pooling: str = "last", tenant=None) -> list:
        """Embeddings of token-id ``inputs``: one float32 tensor (hidden,) each, the final-norm
        hidden state of the last token ("last") or the mean over the tokens ("mean"), not
        normalized; prefill only, batched, no KV slot kept. Raises RequestError (bad pooling,
        empty input, longer than the context), QueueFull."""
        from .coordinator.tenants import LOCAL

        return await self._require_pipeline().scheduler.embed(inputs, pooling, tenant or LOCAL)

    def embed(self, inputs, pooling: str = "last") -> list:
        """:meth:`aembed` from a notebook; ``inputs``: strings or token-id lists."""
        return self._loop.run(self.aembed([self.encode(item) for item in inputs], pooling))

    async def _collect(self, prompt_ids: list[int], params: SamplingParams) -> GenerationResult:
        started = time.perf_counter()
        first = None
        text, tokens, finish = [], [], "length"
        async for event in self.astream(prompt_ids, params):
            if first is None:
                first = time.perf_counter() - started
            text.append(event.text)
            tokens.extend(event.token_ids)
            finish = event.finish_reason or finish
        return GenerationResult(text="".join(text), token_ids=tokens, finish_reason=finish,
                                prompt_tokens=len(prompt_ids), time_to_first_token_s=first or 0.0,
                                total_time_s=time.perf_counter() - started)

    def generate(self, prompt, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None, stop=None, ignore_eos: bool = False,
                 speculative: bool | str = True, adapter: str | None = None) -> GenerationResult:
        """Continue a prompt (a string, or token ids). Returns text, new token ids, finish reason
        and timings. temperature 0 is greedy; ``seed`` makes sampling reproducible; ``stop`` is a
        string or list of strings that end generation (not included in the text); ignore_eos
        generates past end-of-sequence tokens (benchmarks); speculative False decodes without
        drafts where the load speculates (the same tokens), "prompt_lookup" or "draft_model"
        picks that drafter for this request; ``adapter``: the name of a served LoRA adapter to
        answer with (default the base model). Raises RequestError for bad values."""
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                top_k=top_k, seed=seed, stop=stop or (), ignore_eos=ignore_eos,
                                speculative=speculative, adapter=self._adapter_id(adapter))
        return self._loop.run(self._collect(self.encode(prompt), params))

    def stream(self, prompt, **sampling) -> Iterator[StreamEvent]:
        """Like generate, yielding StreamEvents as tokens arrive; breaking out cancels the request."""
        unknown = set(sampling) - set(_SAMPLING_ARGS)
        if unknown:
            raise TypeError(f"unknown sampling argument(s) {sorted(unknown)}; allowed: {list(_SAMPLING_ARGS)}")
        params = SamplingParams(**{**sampling, "stop": sampling.get("stop") or (),
                                   "adapter": self._adapter_id(sampling.get("adapter"))})
        return self._loop.iterate(self.astream(self.encode(prompt), params))

    def chat(self, messages, stream: bool = False, **sampling):
        """Chat through the tokenizer's chat template. ``messages``: a list of {"role", "content"}
        dicts (or one user string). Returns a GenerationResult, or an iterator of StreamEvents
        when stream=True."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        prompt_ids = self.encode_chat(messages)
        if stream:
            return self.stream(prompt_ids, **sampling)
        return self.generate(prompt_ids, **sampling)

    # ------------------------------------------------------------ fine-tuning and adapters
    def finetune(self, data, *, name: str, output_dir=None, resume_from=None, init_from=None, **options):
        """Fine-tune a LoRA adapter of the loaded model through its stages; returns a running
        :class:`~exo_lab.coordinator.finetune.FineTuneJob` (a progress bar and a live loss plot
        in a notebook; ``job.wait()``, ``job.stop()``, ``job.history``).

        ``data``: chats (lists of messages; loss on the assistant turns), ``{"prompt",
        "completion"}`` or ``{"text"}`` rows, a DataFrame of those, or a JSONL path. ``name``:
        what the API serves the adapter as once the job ends (``model`` in a request). Options:
        r (8), alpha (16), dropout (0), target_modules (every linear of a layer), epochs (1),
        max_steps, learning_rate (2e-4), lr_schedule ("linear", "constant", "cosine"),
        warmup_steps (0), batch_size (8), micro_batch_size (2), max_length (512), seed (0),
        weight_decay (0), max_grad_norm (1.0; None: no clipping), save_every (a checkpoint every
        N steps; None: about every tenth of the run, at least every 10 steps; 0: only at the end), recompute (None: where activations would not fit), in_flight (micro-batches in the
        pipe; default one per stage), serving_share (0.5: while requests are served, training
        takes about that share of the stages' time). ``output_dir``: where checkpoints and the adapter go
        (default ``<state dir>/adapters/<name>``); ``resume_from``: a checkpoint folder (the
        job goes on from its step); ``init_from``: an adapter folder to start from (its shape).
        Raises ModelError for bad data or options, ClusterError without a model."""
        from .coordinator.finetune import start_job

        return start_job(self, data, name=name, output_dir=output_dir, resume_from=resume_from,
                         init_from=init_from, **options)

    @property
    def adapters(self):
        """The LoRA adapters served (:class:`~exo_lab.coordinator.adapters.AdapterRegistry`)."""
        return self._runtime.adapters

    def add_adapter(self, name: str, path) -> int:
        """Serve the peft LoRA adapter in folder ``path`` as model ``name`` (beside the base
        model; requests for different adapters share batches). Replaces an adapter of that name.
        Returns its id. Raises ModelError for a folder that is not a LoRA adapter of this model."""
        from .coordinator.adapters import layer_part, push, read

        pipeline = self._require_pipeline()
        settings, tensors, base = read(path)
        layers = pipeline.plan.stages[-1].stop_layer
        extra = sorted(set(tensors) - set(layer_part(tensors, 0, layers)))
        if extra:
            raise ModelError(f"adapter {path} has tensors for layers this model ({pipeline.model_id}, {layers} layers) "
                             f"lacks, e.g. {extra[0]}: it was trained for another base")
        if name in self.api_base_names():
            raise ModelError(f"{name!r} is the base model's name: serve the adapter under another name")
        self.adapters.for_model(pipeline.model_id)
        adapter = self.adapters.add(name, settings, tensors, path=path, base=base)
        push(self.control, [adapter], pipeline.plan, pipeline.engines)
        return adapter.adapter_id

    def _adapter_id(self, name: str | None) -> int:
        if name is None:
            return 0
        adapter_id = self.adapters.id_of(name)
        if not adapter_id:
            from .errors import RequestError

            served = ", ".join(self.adapters.names()) or "none"
            raise RequestError(f"no adapter named {name!r} is served (served: {served})", param="adapter")
        return adapter_id

    def remove_adapter(self, name: str) -> bool:
        """Stop serving adapter ``name`` (requests naming it then get 404)."""
        from .engine import training

        adapter = self.adapters.remove(name)
        pipeline = self.pipeline
        if adapter is None or pipeline is None:
            return adapter is not None
        for info in pipeline.engines:
            if not self.control.is_gone(info):
                self.control.call(info.engine_id, training.drop_adapter, adapter.adapter_id, what="removing an adapter")
        return True

    def api_base_names(self) -> tuple[str, ...]:
        """The names the base model answers to in the API (its served names, else its id)."""
        return tuple(self.config.served_model_names or ()) or ((self.model_id,) if self.loaded else ())

    def run_coroutine(self, coroutine, timeout_s: float | None = None):
        """Run ``coroutine`` on the cluster's event loop (where its requests and server live)
        and return its result; from a notebook, e.g. several :meth:`astream` calls gathered at
        once. ``timeout_s``: give up waiting (TimeoutError). Raises ClusterError when the cluster
        is not started."""
        self.control.require_started()
        return self._loop.run(coroutine, timeout_s=timeout_s)

    # ------------------------------------------------------------ API server
    def serve(self, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, limits=None,
              served_model_names=None):
        """Serve the OpenAI-compatible API from this process; returns at once (the server runs on
        the cluster's loop thread, so a notebook stays usable). Returns the server handle
        (``.url``, ``.stop()``). ``limits``: an :class:`exo_lab.api.ApiLimits` (connections,
        timeouts, extra Host names); default: the config's api section, else ApiLimits().
        ``served_model_names``: names clients may call the model by, the first the primary
        (default: the config's ``served_model_names``, else the model id). Raises ConfigError for
        a bad key or name."""
        from .api import start_server
        from .api.guard import limits_from_config

        self.control.require_started()
        if self._server is not None:
            self._server.stop()
            self._server = None
        limits = limits if limits is not None else limits_from_config(self.config)
        if served_model_names is None:
            served_model_names = self.config.served_model_names
        self._server = self._loop.run(start_server(self, host=host, port=port, api_key=api_key, limits=limits,
                                                   served_model_names=served_model_names))
        return self._server

    async def ahealth(self) -> tuple[bool, str]:
        """(True, "ok") when a model is loaded and every stage answers a ping through the pipe,
        else (False, why): no model, the failure in force, or the failover under way."""
        return await self.supervisor.health()

    @property
    def metrics(self):
        """The scheduler's counters (also after a failure, until the next load)."""
        if self.pipeline is None:
            raise ClusterError("no model is loaded: call cluster.load('demo') (or a model folder / hub id)")
        return self.pipeline.scheduler.metrics

    def metrics_source(self):
        """(metrics, model id) of the loaded model, or None (the /metrics collector reads this)."""
        pipeline = self.pipeline
        return (pipeline.scheduler.metrics, pipeline.model_id) if pipeline is not None else None

    # ------------------------------------------------------------ status
    def status(self) -> dict:
        """Engines (host, device, layers, memory, state), the model, the plan and the counters.
        Every engine is asked at once; the call takes at most about 3 s however many hang."""
        from .coordinator.status import cluster_status

        status = cluster_status(self.control, self.pipeline, self.failure, self.config.cluster_name)
        return {**status, "lifecycle": self.state, "memory": self.memory_note}

    def widget(self, **options):
        """An ipywidgets dashboard of this cluster (updates live; close() stops it). Options go
        to :class:`exo_lab.notebook.widget.ClusterWidget` (interval_s, metrics_interval_s)."""
        from .notebook.widget import ClusterWidget

        return ClusterWidget(self, **options)

