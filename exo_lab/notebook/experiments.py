"""Experiments on the live shards, through ipyparallel (the control plane), not the data plane.

Every engine that holds a stage has it in its namespace as ``exo_stage`` (a
:class:`exo_lab.engine.StageWorker`), so ``%%px`` reaches the live layers::

    view = cluster.control.view()
    view.activate()                 # enables %px / %%px in this notebook
    %px print(exo_stage.stage.spec, len(exo_stage.stage.layers))

Mind the live traffic: the stage worker thread keeps serving generations while ``%%px`` code
runs on the engine's main thread. A forward hook registered on ``exo_stage.stage.layers`` fires
for the data plane's forwards too, and a forward run by hand must use a KV cache of its own
(``cache=exo_stage.stage.new_cache(1, T)``), never the live requests' slots. Timings taken while a
generation runs measure the two competing for the CPU. :func:`stage_activations` does all this.
"""
from __future__ import annotations

import logging

from ..errors import ClusterError
from . import remote

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 120.0


def stage_engines(cluster) -> list[dict]:
    """The loaded stages in pipeline order, from ``cluster.status()``: one dict per stage with
    ``stage_index``, ``engine_id``, ``node``, ``hostname``, ``device``, ``start_layer``,
    ``stop_layer`` (half-open). Raises ClusterError when the cluster is stopped or has no model."""
    cluster.plan   # raises ClusterError with the fix when no model is loaded (or the cluster failed)
    rows = [row for row in cluster.status()["engines"] if row.get("stage_index") is not None]
    keys = ("stage_index", "engine_id", "node", "hostname", "device", "start_layer", "stop_layer")
    return [{key: row.get(key) for key in keys} for row in sorted(rows, key=lambda r: r["stage_index"])]


def stage_view(cluster):
    """An ipyparallel DirectView over the engines that hold a stage, in pipeline order (for
    ``%%px`` when some engines hold none): ``stage_view(cluster).activate()``."""
    return cluster.control.view([stage["engine_id"] for stage in stage_engines(cluster)])


def stage_activations(cluster, prompt, *, layer_stats: bool = True, return_tensors: bool = True,
                      timeout_s: float = DEFAULT_TIMEOUT_S) -> list[dict]:
    """Run ``prompt`` through the stages one after another via ipyparallel and report each.

    prompt: a string, token ids, or chat messages (a list of {"role", "content"} dicts, put
    through the chat template). Each stage runs one prefill in a private KV cache (dropped right
    after) and hands its output to the next through this process.

    Returns one dict per stage, in pipeline order: ``stage_index``, ``engine_id``, ``node``,
    ``hostname``, ``device``, ``start_layer``, ``stop_layer`` (half-open), ``output_kind``
    ("hidden_states" (1, T, hidden), or "logits" (1, vocab) of the last position on the last
    stage), ``output`` (the tensor; left out when return_tensors=False), ``output_stats`` (shape,
    mean, std, rms, absmax), ``forward_ms``, ``layers`` (per decoder layer: global ``layer``
    index and the same stats of its output; empty when layer_stats=False). The last stage adds
    ``next_token_id`` and ``next_token`` (the greedy next token).

    Raises ClusterError when no model is loaded or a stage fails. Safe while the cluster serves
    requests (the KV caches stay apart), but then ``forward_ms`` measures the two sharing cores.
    """
    import torch

    stages = stage_engines(cluster)
    hidden = torch.tensor([_prompt_ids(cluster, prompt)], dtype=torch.long)     # (1, T)
    results = []
    for stage in stages:
        out = _forward_on(cluster, stage, hidden, layer_stats, timeout_s)
        hidden = out.pop("output")
        entry = {**stage, "output_kind": "logits" if out["is_last"] else "hidden_states",
                 "output_stats": out["output_stats"], "forward_ms": out["forward_ms"], "layers": out["layers"]}
        if return_tensors:
            entry["output"] = hidden
        if out["is_last"]:
            token_id = int(hidden[0].argmax())
            entry.update(next_token_id=token_id, next_token=cluster.tokenizer.decode([token_id]))
        results.append(entry)
    return results


def _prompt_ids(cluster, prompt) -> list[int]:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
        return cluster.encode_chat(prompt)
    ids = cluster.encode(prompt)
    if not ids:
        raise ClusterError("the prompt has no tokens; pass some text or token ids")
    return ids


def _forward_on(cluster, stage: dict, inputs, layer_stats: bool, timeout_s: float) -> dict:
    import ipyparallel as ipp

    engine_id = stage["engine_id"]
    where = f"engine {engine_id} (stage {stage['stage_index']}, {stage['node']})"
    async_result = cluster.control.submit(engine_id, remote.experiment_forward, inputs,
                                                         layer_stats=layer_stats)
    try:
        return async_result.get(timeout_s)
    except ipp.error.TimeoutError as exc:
        raise ClusterError(f"{where} did not finish the experiment forward within {timeout_s:.0f} s; "
                           f"is it busy with a long %%px cell? pass a larger timeout_s") from exc
    except ipp.error.RemoteError as exc:
        raise ClusterError(f"{where} failed the experiment forward: {exc.ename}: {exc.evalue}") from None
    except ipp.error.EngineError as exc:
        raise ClusterError(f"{where} died during the experiment forward: {exc}") from exc
