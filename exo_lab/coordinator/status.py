"""cluster.status(): one dict describing engines, model, plan and counters (CLI, API, widget)."""
from __future__ import annotations

from ..control_types import EngineState, EngineStatus, received
from ..engine import worker as engine_worker
from ..errors import ExoLabError
from .control import EngineControl, EngineTimeout

# Every engine is asked at once; the whole status waits at most this long, however many hang.
STATUS_TIMEOUT_S = 3.0


def cluster_status(control: EngineControl, pipeline, failure: str | None, cluster_name: str) -> dict:
    """A JSON-able snapshot. Each engine row's "state" is an EngineState's value. An engine that
    does not answer within STATUS_TIMEOUT_S shows "busy" while still registered (a long %%px
    cell), "failed" otherwise; an idle engine that holds no stage of the loaded model is a
    "spare" (it joined after load: cluster.replan()).
    ``clients``: the API clients with requests now, by opaque label, with their KV slots held
    ("running") and requests waiting ("queued"); never a prompt, an address or a key."""
    if not control.started:
        return {"cluster_name": cluster_name, "state": "stopped", "engines": [], "model": None,
                "plan": None, "metrics": None, "clients": []}
    ids = sorted(control.ids)
    answers = control.gather(ids, engine_worker.worker_status, timeout_s=STATUS_TIMEOUT_S,
                             what="reporting status")
    return {
        "cluster_name": cluster_name,
        "state": "failed" if failure else ("ready" if pipeline else "no model"),
        "failure": failure,
        "engines": [_engine_row(control, pipeline, eid, answers[eid]) for eid in ids],
        "model": pipeline.model_id if pipeline else None,
        "dtype": pipeline.options.dtype if pipeline else None,
        "load_s": pipeline.load_s if pipeline else None,
        "plan": pipeline.plan.to_json() if pipeline else None,
        "metrics": pipeline.scheduler.metrics.snapshot() if pipeline else None,
        "clients": list(pipeline.scheduler.metrics.clients) if pipeline else [],
    }


def _engine_row(control: EngineControl, pipeline, engine_id: int, answer) -> dict:
    status, state = _answer_fields(control, engine_id, answer)
    index = pipeline.stage_of(engine_id) if pipeline else None
    if pipeline is not None and index is None and state == EngineState.IDLE:
        state = EngineState.SPARE
    row = {"engine_id": engine_id, "state": state.value, **status}
    info = pipeline.engines[index] if index is not None else control.infos.get(engine_id)
    if info is not None:
        row.update(node=info.node, hostname=info.hostname, device=info.device, kind=info.kind,
                   budget_bytes=info.budget_bytes, threads=info.threads, gpu_name=info.gpu_name,
                   device_note=info.device_note)
    if index is not None:
        stage = pipeline.plan.stages[index]
        row.update(stage_index=index, start_layer=stage.start_layer, stop_layer=stage.stop_layer,
                   budget_bytes=stage.budget_bytes, planned_bytes=stage.total_bytes,
                   planned_ms=stage.ms_per_token, measured_ms=pipeline.scheduler.metrics.stage_mean_ms(index))
    return row


def _answer_fields(control: EngineControl, engine_id: int, answer) -> tuple[dict, EngineState]:
    """(the row's fields from the engine's answer but its state, the state): the stage's own
    state when one is loaded, else the one the coordinator set (loading, failed)."""
    if not isinstance(answer, ExoLabError):
        try:
            status = received(answer, EngineStatus, f"engine {engine_id}")
        except ExoLabError as exc:
            answer = exc
    if isinstance(answer, ExoLabError):
        busy = isinstance(answer, EngineTimeout) and engine_id in control.ids
        return {"error": str(answer)}, (EngineState.BUSY if busy else EngineState.FAILED)
    fields = status.to_dict()
    fields.pop("state", None)
    return fields, (status.stage.state if status.loaded else control.state(engine_id))
