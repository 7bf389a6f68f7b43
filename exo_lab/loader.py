"""Cluster.load's steps: resolve, profile, plan, load shards on the engines, wire the data plane.

Kept apart from cluster.py so each reads in one sitting. On any error every stage that did load
is unloaded again, so a failed load leaves the engines as they were: empty and usable.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from . import engine as engine_side
from .errors import ClusterError, ExoLabError, ModelError
from .models import read_model_config, resolve_model
from .planner import NodeSpec, plan_layers
from .profile import profile_from_config
from .progress import progress_bar

logger = logging.getLogger(__name__)

DEFAULT_MAX_CONTEXT = 4096


def load_pipeline(cluster, model: str, *, dtype: str, max_context: int | None, max_batch: int,
                  objective: str, min_stages: int, progress: bool, timeout_s: float):
    from .cluster import _Pipeline

    started = time.perf_counter()
    model_id = _portable_model_id(model)
    model_dir = resolve_model(model_id, need_weights=False)
    config = read_model_config(model_dir)
    profile = profile_from_config(config, dtype=dtype, model_id=model_id)
    context_length = min(max_context or DEFAULT_MAX_CONTEXT, profile.max_position_embeddings)
    engines = cluster.engines()
    if not engines:
        raise ClusterError("no compute engine is available: start workers or Cluster.local(engines=N)")
    nodes = [NodeSpec(name=e.node, budget_bytes=e.budget_bytes, bandwidth_bytes_per_s=e.bandwidth_bytes_per_s,
                      kind=e.kind) for e in engines]
    plan = plan_layers(profile, nodes, max_context=context_length, max_batch=max_batch,
                       objective=objective, min_stages=min_stages)
    by_node = {e.node: e for e in engines}
    stage_engines = [by_node[stage.node] for stage in plan.stages]
    tokenizer = _load_tokenizer(model_dir)
    loaded: list = []
    try:
        addresses = _load_shards(cluster, model_id, profile.num_layers, dtype, plan, stage_engines,
                                 loaded, progress, timeout_s)
        scheduler = _connect_pipeline(cluster, tokenizer, config, context_length, addresses, stage_engines)
    except BaseException:
        _unload(cluster, loaded)
        raise
    logger.info("loaded %s in %.1f s over %d stage(s)", model_id, time.perf_counter() - started,
                len(plan.stages))
    return _Pipeline(model_id=model_id, model_dir=Path(model_dir), plan=plan, engines=stage_engines,
                     tokenizer=tokenizer, context_length=context_length, scheduler=scheduler,
                     load_s=time.perf_counter() - started)


def _portable_model_id(model: str) -> str:
    """Local folders travel to the engines as absolute paths; hub ids and "demo" as they are."""
    if not isinstance(model, str) or not model.strip():
        raise ModelError(f"model must be a folder, a Hugging Face hub id or 'demo', got {model!r}")
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def _load_tokenizer(model_dir):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as exc:  # transformers raises OSError/ValueError/... for a missing tokenizer
        raise ModelError(f"cannot load the tokenizer from {model_dir}: {exc}; the folder needs "
                         "tokenizer.json (or the tokenizer files of its model)") from exc


def _bind_hosts(cluster, info) -> tuple[str, str]:
    """(bind host, advertised host) for an engine's inbox."""
    if cluster._local_engines is not None or info.local:
        return "127.0.0.1", "127.0.0.1"
    device = next((d for d in cluster.config.devices if d.hostname == info.node.split("#")[0]), None)
    advertise = (device.address if device and device.address else info.probe.get("device_name")
                 or info.hostname)
    return "0.0.0.0", advertise


def _load_shards(cluster, model_id, num_layers, dtype, plan, stage_engines, loaded, progress, timeout_s):
    """Load every stage in parallel; returns their inbox addresses in pipeline order."""

    pending = {}
    for index, (stage, info) in enumerate(zip(plan.stages, stage_engines)):
        spec = {"model_id": model_id, "start_layer": stage.start_layer, "stop_layer": stage.stop_layer,
                "num_layers": num_layers, "dtype": dtype, "device": info.device}
        bind, advertise = _bind_hosts(cluster, info)
        cluster._engine_state[info.engine_id] = "loading"
        pending[index] = cluster.client[info.engine_id].apply_async(
            engine_side.load_stage, spec, index, len(plan.stages), bind, advertise)
        loaded.append(info)
    results = {}
    deadline = time.monotonic() + timeout_s
    total_layers = sum(s.stop_layer - s.start_layer for s in plan.stages)
    with progress_bar(total=total_layers, desc=f"loading {model_id}", unit="layer", enabled=progress) as bar:
        while pending:
            for index in [i for i, ar in pending.items() if ar.ready()]:
                results[index] = _result(cluster, pending.pop(index), stage_engines[index])
                stage = plan.stages[index]
                bar.update(stage.stop_layer - stage.start_layer)
                cluster._engine_state[stage_engines[index].engine_id] = "idle"
            _check_engines_alive(cluster, stage_engines)
            if time.monotonic() > deadline:
                raise ClusterError(f"loading did not finish within {timeout_s:.0f} s (stages still loading: "
                                   f"{sorted(pending)}); raise timeout_s for very large models")
            time.sleep(0.05)
    return [results[i]["address"] for i in range(len(plan.stages))]


def _result(cluster, async_result, info):
    import ipyparallel as ipp

    from .cluster import _remote_error

    try:
        return async_result.get(0)
    except ipp.error.RemoteError as exc:
        cluster._engine_state[info.engine_id] = "failed"
        raise _remote_error(info.engine_id, f"loading its shard on {info.node}", exc) from None
    except ipp.error.EngineError as exc:
        cluster._engine_state[info.engine_id] = "failed"
        raise ClusterError(f"engine {info.engine_id} ({info.node}) died while loading its shard") from exc


def _check_engines_alive(cluster, stage_engines) -> None:
    from .cluster import engine_is_gone

    registered = set(cluster.client.ids)
    for info in stage_engines:
        if engine_is_gone(info, registered):
            cluster._engine_state[info.engine_id] = "failed"
            raise ClusterError(f"engine {info.engine_id} ({info.node}) died while loading its shard; "
                               f"call load() again to re-plan on the engines left")


def _unload(cluster, loaded) -> None:
    alive = set(cluster.client.ids)
    for info in loaded:
        if info.engine_id in alive:
            try:
                cluster._call(info.engine_id, engine_side.unload_stage, timeout_s=30, what="unloading")
            except ExoLabError as exc:
                logger.warning("could not unload engine %d after a failed load: %s", info.engine_id, exc)


def _connect_pipeline(cluster, tokenizer, config, context_length, addresses, stage_engines):
    """Chain coordinator -> stage 0 -> ... -> last stage -> coordinator and start serving.

    The coordinator's sockets live on the cluster's loop; the ipyparallel calls that start the
    stage workers run here, in the caller's thread, so the loop (and an API server on it) never
    waits on the control plane."""
    scheduler = cluster._loop.run(_make_scheduler(cluster, tokenizer, config, context_length, addresses[0],
                                                  stage_engines))
    try:
        nexts = addresses[1:] + [scheduler.inbox.address]
        for info, next_address in zip(stage_engines, nexts):
            cluster._call(info.engine_id, engine_side.start_worker, next_address,
                          what="starting the stage worker")
        cluster._loop.run(_start(scheduler))
    except BaseException:
        cluster._loop.run(scheduler.close())
        raise
    return scheduler


async def _make_scheduler(cluster, tokenizer, config, context_length, first_address, stage_engines):
    from .dataplane import AsyncInbox, AsyncOutbox
    from .scheduler import Scheduler

    local = cluster._local_engines is not None or all(e.local for e in stage_engines)
    coordinator = cluster.config.coordinator
    advertise = "127.0.0.1" if local else (coordinator.address or coordinator.hostname)
    inbox = AsyncInbox(host="127.0.0.1" if local else "0.0.0.0", port=0, advertise_host=advertise)
    return Scheduler(inbox=inbox, outbox=AsyncOutbox(None, first_address), tokenizer=tokenizer,
                     eos_token_ids=_eos_token_ids(tokenizer, config), context_length=context_length,
                     check_alive=cluster._check_alive)


async def _start(scheduler) -> None:
    scheduler.start()


def _eos_token_ids(tokenizer, config: dict) -> set[int]:
    ids = set()
    for value in (config.get("eos_token_id"), tokenizer.eos_token_id, _generation_eos(tokenizer)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def _generation_eos(tokenizer):
    import json

    path = Path(tokenizer.name_or_path) / "generation_config.json"
    try:
        return json.loads(path.read_text()).get("eos_token_id")
    except (OSError, ValueError):
        return None
