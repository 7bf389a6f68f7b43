"""cluster.status(): one dict describing engines, model, plan and counters (CLI, API, widget)."""
from __future__ import annotations

import logging

from . import engine as engine_side
from .errors import ExoLabError

logger = logging.getLogger(__name__)

STATUS_TIMEOUT_S = 3.0


def cluster_status(cluster) -> dict:
    """A JSON-able snapshot. Engines that do not answer within 3 s show state "failed"."""
    if cluster.client is None:
        return {"cluster_name": cluster.config.cluster_name, "state": "stopped", "engines": [],
                "model": None, "plan": None, "metrics": None}
    pipeline = cluster._pipeline
    stages = {info.engine_id: (index, stage) for index, (info, stage)
              in enumerate(zip(pipeline.engines, pipeline.plan.stages))} if pipeline else {}
    engines = [_engine_row(cluster, engine_id, stages.get(engine_id)) for engine_id in sorted(cluster.client.ids)]
    return {
        "cluster_name": cluster.config.cluster_name,
        "state": "failed" if cluster._failure else ("ready" if pipeline else "no model"),
        "failure": cluster._failure,
        "engines": engines,
        "model": pipeline.model_id if pipeline else None,
        "load_s": pipeline.load_s if pipeline else None,
        "plan": pipeline.plan.to_json() if pipeline else None,
        "metrics": pipeline.scheduler.metrics.snapshot() if pipeline else None,
    }


def _engine_row(cluster, engine_id: int, stage_entry) -> dict:
    try:
        status = cluster._call(engine_id, engine_side.worker_status, timeout_s=STATUS_TIMEOUT_S,
                               what="reporting status")
        state = status.get("state", "idle") if status.get("loaded") else cluster._engine_state.get(engine_id, "idle")
    except ExoLabError as exc:
        # still registered but not answering: running something long (a %%px cell), not dead
        busy = engine_id in set(cluster.client.ids) and "did not answer" in str(exc)
        status, state = {"error": str(exc)}, ("busy" if busy else "failed")
    row = {"engine_id": engine_id, "state": state, **status}
    info = cluster._engine_infos.get(engine_id)
    if info is not None:
        row.update(node=info.node, hostname=info.hostname, device=info.device, kind=info.kind,
                   budget_bytes=info.budget_bytes, threads=info.threads)
    if stage_entry is not None:
        index, stage = stage_entry
        info = cluster._pipeline.engines[index]
        row.update(node=info.node, hostname=info.hostname, device=info.device, kind=info.kind,
                   stage_index=index, start_layer=stage.start_layer, stop_layer=stage.stop_layer,
                   budget_bytes=stage.budget_bytes, planned_bytes=stage.total_bytes, threads=info.threads)
    return row
